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
import os
import re
import stat
import sys
import time
from pathlib import Path

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
from hansa.node.cli import EXIT_VERIFY_FAILED
from hansa.protocol.errors import ConfigError, ErrorCode, ProtocolError

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


_CHUNK = 1024 * 1024

# Characters a terminal acts on (C0, DEL, C1: ESC starts cursor movement and colour,
# CR and BS overwrite a line) and the Unicode line separators and bidi controls that
# reorder what is shown. Rich strips BEL, BS and CR but passes ESC through.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def _read_limited(path: str, limit: int) -> bytes:
    """Read a whole file of at most ``limit`` bytes, refusing larger ones without reading them.

    The bundle is the analyst's, so hostile: a 10 GB (sparse) file used to be read
    up to ``limit + 1`` bytes (512 MiB) before it was refused, and a character
    device such as /dev/zero never ends. A regular file is judged by its size and
    read in one piece of that size; a pipe (``/dev/stdin``) is read in chunks up to
    the limit; anything else (a device, a socket) is refused.

    Raises:
        ProtocolError: ``TOO_LARGE`` over the limit, ``INVALID_FIELD`` for a file
            that is neither a regular file nor a pipe.
        OSError: the file cannot be opened or read (a directory, a missing file).
    """
    with Path(path).open("rb") as fh:
        info = os.fstat(fh.fileno())
        if stat.S_ISREG(info.st_mode):
            if info.st_size > limit:
                raise ProtocolError(
                    f"{path} is larger than {limit} bytes ({info.st_size})", ErrorCode.TOO_LARGE
                )
            expected = info.st_size
        elif stat.S_ISFIFO(info.st_mode):
            expected = _CHUNK
        else:
            raise ProtocolError(f"{path} is not a regular file or a pipe", ErrorCode.INVALID_FIELD)
        parts: list[bytes] = []
        size = 0
        want = expected + 1  # one more than the size: a file that grew is still noticed
        while size <= limit and (part := fh.read(min(want, limit + 1 - size))):
            parts.append(part)
            size += len(part)
            want = _CHUNK
    if size > limit:
        raise ProtocolError(f"{path} is larger than {limit} bytes", ErrorCode.TOO_LARGE)
    return b"".join(parts)


def _shown(text: str) -> str:
    """``text`` safe to print: rich markup escaped, terminal controls as ``\\xNN``.

    Every string of a verdict may echo bytes of the (hostile) bundle: unsigned
    statuses and details, and decoder messages quoting a tag it did not expect.
    """
    return escape(_UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode(), text))


def _trusted(path: str) -> SignedRoster:
    data = _read_limited(path, _MAX_ROSTER_FILE)
    try:
        return decode_signed_roster(data)
    except ProtocolError as exc:
        # The decoder's message may quote bytes of the file: keep them off the terminal.
        raise ProtocolError(
            f"{path} is not a roster file: {_UNPRINTABLE.sub('?', exc.message)}", exc.code
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
    data = _read_limited(args.bundle, MAX_BUNDLE_SIZE)
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
