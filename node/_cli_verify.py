"""``hansa verify``: check an evidence bundle offline.

::

    hansa verify BUNDLE [--roster TRUSTED_ROSTER_FILE] [--pin SHA256_HEX]

Re-checks every signature of the bundle against its roster, re-does the
combination over the verified answers and prints a verdict with one line
per city (:func:`hansa.federation.evidence.verify_bundle`). Without
``--roster`` or ``--pin`` the roster is trusted on its own signatures only,
and the output says so.

Exit status: 0 when the bundle is valid; :data:`~hansa.node.cli.EXIT_VERIFY_FAILED`
when it is not (an undecodable bundle included); 1 (one line on standard
error) when a file cannot be read or an option is malformed.
"""

from __future__ import annotations

import argparse
import sys
import time

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hansa.federation.evidence import MAX_BUNDLE_SIZE, Verdict, verify_bundle
from hansa.federation.roster import (
    MAX_ROSTER_SIGNATURES,
    MAX_ROSTER_SIZE,
    SignedRoster,
    decode_signed_roster,
)
from hansa.node._cli_io import printable, read_limited
from hansa.node.cli import EXIT_VERIFY_FAILED
from hansa.protocol.errors import ConfigError, ProtocolError

__all__ = ["register"]

_MAX_ROSTER_FILE = MAX_ROSTER_SIZE + 65 * MAX_ROSTER_SIGNATURES + 1024


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``verify`` command."""
    p = sub.add_parser(
        "verify",
        help="verify an evidence bundle offline",
        description="Re-check every signature of an evidence bundle against the alliance "
        "roster, re-do the combination offline, and print a verdict per city.",
    )
    p.add_argument("bundle", metavar="BUNDLE", help="the evidence bundle file")
    p.add_argument(
        "--roster",
        metavar="FILE",
        help="a roster file you trust: the bundle's roster must be it or its next version",
    )
    p.add_argument(
        "--pin", metavar="HEX", help="SHA-256 (64 hex digits) the bundle's roster body must have"
    )
    p.set_defaults(handler=_verify)


def _shown(text: str) -> str:
    """``text`` safe to print: rich markup escaped, terminal controls as ``\\xNN``.

    Every string of a verdict may echo bytes of the (hostile) bundle: unsigned
    statuses and details, and decoder messages quoting a tag it did not expect.
    """
    return escape(printable(text))


def _trusted(path: str) -> SignedRoster:
    data = read_limited(path, _MAX_ROSTER_FILE)
    try:
        return decode_signed_roster(data)
    except ProtocolError as exc:
        # The decoder's message may quote bytes of the file: keep them off the terminal.
        raise ProtocolError(
            f"{path} is not a roster file: {printable(exc.message)}", exc.code
        ) from exc


def _pin(text: str) -> bytes:
    try:
        pin = bytes.fromhex(text)
    except ValueError:
        pin = b""
    if len(pin) != 32:
        raise ConfigError("--pin must be 64 hex digits (a SHA-256)")
    return pin


def _verify(args: argparse.Namespace) -> int:
    pin = _pin(args.pin) if args.pin else None
    trusted = _trusted(args.roster) if args.roster else None
    data = read_limited(args.bundle, MAX_BUNDLE_SIZE)
    verdict = verify_bundle(
        data, trusted_roster=trusted, pin=pin, now_ms=time.time_ns() // 1_000_000
    )
    _print(verdict, args.bundle)
    return 0 if verdict.ok else EXIT_VERIFY_FAILED


def _print(verdict: Verdict, path: str) -> None:
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    if verdict.alliance is not None:
        console.print(
            f"bundle {_shown(path)}: alliance [bold]{_shown(verdict.alliance)}[/bold], "
            f"roster version {verdict.roster_version}, {verdict.answered} verified answer(s)"
        )
    if verdict.request:
        ok = all(c.ok for c in verdict.request)
        names = ", ".join(c.name for c in verdict.request if c.ok)
        console.print(
            f"request (one, sent to every city): "
            f"{'[green]✓[/green]' if ok else '[red]✗[/red]'} {_shown(names)}"
        )
    if verdict.cities:
        table = Table(title="cities")
        for column in ("city", "status", "evidence", "checks", "problems"):
            table.add_column(column)
        for line in verdict.cities:
            passed = sum(c.ok for c in line.checks)
            evidence = "signed" if line.signed else "unsigned claim"
            table.add_row(
                _shown(line.city),
                _shown(line.status),
                evidence,
                f"{passed}/{len(line.checks)} passed",
                _shown("; ".join(line.failures)) or "-",
                style=None if line.ok else "red",
            )
        console.print(table)
    for note in verdict.notes:
        console.print(f"note: {_shown(note)}")
    for failure in verdict.failures:
        console.print(f"[red]FAIL[/red] {_shown(failure)}")
    if verdict.ok:
        console.print(
            "[bold green]VALID[/bold green]: every signature, status and value checks out"
        )
    else:
        console.print(f"[bold red]INVALID[/bold red]: {len(verdict.failures)} problem(s) found")
