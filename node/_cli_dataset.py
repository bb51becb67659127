"""``hansa dataset`` commands (registration placeholder until implemented)."""

from __future__ import annotations

import argparse

from hansa.protocol.errors import ConfigError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``dataset`` command group."""
    p = sub.add_parser("dataset", help="dataset commands")
    p.set_defaults(handler=_todo)


def _todo(args: argparse.Namespace) -> int:
    raise ConfigError("hansa dataset is not available yet")
