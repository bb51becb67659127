"""``hansa keygen`` (owned by the key-file work; placeholder registration)."""

from __future__ import annotations

import argparse

from hansa.protocol.errors import ConfigError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``keygen`` command."""
    p = sub.add_parser("keygen", help="create a node or analyst key file")
    p.set_defaults(handler=_keygen)


def _keygen(args: argparse.Namespace) -> int:
    raise ConfigError("keygen is not implemented yet")
