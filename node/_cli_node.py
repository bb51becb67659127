"""``hansa node`` commands (registration placeholder until implemented)."""

from __future__ import annotations

import argparse

from hansa.protocol.errors import ConfigError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``node`` command group."""
    p = sub.add_parser("node", help="node commands")
    p.set_defaults(handler=_todo)


def _todo(args: argparse.Namespace) -> int:
    raise ConfigError("hansa node is not available yet")
