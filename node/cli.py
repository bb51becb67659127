"""The ``hansa`` command line.

Each command group lives in its own module (``_cli_*.py``) exposing
``register(subparsers)``; this module wires them together and turns every
:class:`~hansa.protocol.errors.HansaError` (and any other failure) into one
readable line on stderr and a non-zero exit — never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from hansa import __version__
from hansa.node._cli_io import printable
from hansa.protocol.errors import HansaError

__all__ = [
    "EXIT_ERROR",
    "EXIT_QUORUM_NOT_MET",
    "EXIT_USAGE",
    "EXIT_VERIFY_FAILED",
    "build_parser",
    "main",
]

EXIT_ERROR = 1
"""A command failed (bad input, unreadable file, verification failure)."""
EXIT_USAGE = 2
"""The command line itself was wrong (argparse's convention)."""
EXIT_VERIFY_FAILED = 3
"""A verification command ran and the thing verified is not valid."""
EXIT_QUORUM_NOT_MET = 4
"""``hansa query`` ran but fewer cities answered than the quorum (evidence is still written)."""

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    """Return the parser for every ``hansa`` command."""
    parser = argparse.ArgumentParser(
        prog="hansa",
        description="Federated, signed aggregate queries for alliances of cities.",
    )
    parser.add_argument("--version", action="version", version=f"hansa {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    from hansa.node import (
        _cli_alliance,
        _cli_audit,
        _cli_dataset,
        _cli_keys,
        _cli_node,
        _cli_note,
        _cli_query,
        _cli_verify,
        _cli_witness,
    )

    for module in (
        _cli_keys,
        _cli_note,
        _cli_dataset,
        _cli_node,
        _cli_alliance,
        _cli_query,
        _cli_verify,
        _cli_witness,
        _cli_audit,
    ):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except HansaError as exc:
        # The message may quote bytes of a hostile file: no terminal controls.
        print(f"hansa: error: {printable(exc.message)} [{exc.code.name}]", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("hansa: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        where = f": {printable(str(exc.filename))}" if exc.filename else ""
        print(f"hansa: error: {printable(str(exc.strerror or exc))}{where}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:
        print(
            f"hansa: internal error: {type(exc).__name__}: {printable(str(exc))}", file=sys.stderr
        )
        return EXIT_ERROR
