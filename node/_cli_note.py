"""``hansa note verify`` (owned by the signed-note work; placeholder registration)."""

from __future__ import annotations

import argparse

from hansa.protocol.errors import NoteError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``note`` command group."""
    p = sub.add_parser("note", help="C2SP signed notes and checkpoints")
    p.set_defaults(handler=_verify)


def _verify(args: argparse.Namespace) -> int:
    raise NoteError("note verify is not implemented yet")
