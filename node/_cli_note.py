"""``hansa note verify``: check a C2SP signed note against trusted verifier keys.

Usage::

    hansa note verify --vkey VKEY [--vkey VKEY ...] [FILE]

The note is read from ``FILE`` (or standard input when absent or ``-``). A
``--vkey`` value is either a vkey string ``<name>+<hex8 id>+<base64>`` or
``@path`` naming a file with one vkey per line (blank lines and lines
starting with ``#`` are skipped). On success the verified note text is
written to standard output and the exit status is 0. A note that is
malformed or does not verify gives one line on standard error and
:data:`~hansa.node.cli.EXIT_VERIFY_FAILED`; a bad command line input (an
unparsable vkey, an unreadable file) gives one line and exit status 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import BinaryIO

from hansa.crypto.note import MAX_NOTE_SIZE, NoteVerifier, verify_note
from hansa.node.cli import EXIT_VERIFY_FAILED
from hansa.protocol.errors import NoteError, SignatureError

__all__ = ["register"]

_MAX_VKEY_FILE = 1 << 20  # bytes; a vkey list is a few lines, refuse anything absurd


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``note`` command group and its ``verify`` subcommand."""
    group = sub.add_parser("note", help="C2SP signed notes and checkpoints")
    commands = group.add_subparsers(dest="note_command", metavar="SUBCOMMAND")
    commands.required = True
    verify = commands.add_parser(
        "verify",
        help="verify a signed note and print its text",
        description=(
            "Verify a C2SP signed note (c2sp.org/signed-note@v1.0.0) and print its text. "
            "Signatures from keys not given are ignored; a given key whose signature fails "
            "rejects the note; at least one given key must verify."
        ),
    )
    verify.add_argument(
        "--vkey",
        action="append",
        required=True,
        metavar="VKEY",
        help="trusted verifier key <name>+<hex id>+<base64>, or @FILE with one per line",
    )
    verify.add_argument(
        "file",
        nargs="?",
        default="-",
        metavar="FILE",
        help="the signed note (default: standard input)",
    )
    verify.set_defaults(handler=_verify)


def _read_bounded(stream: BinaryIO, limit: int, what: str) -> bytes:
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise NoteError(f"{what} is larger than {limit} bytes")
    return data


def _load_verifiers(values: list[str]) -> list[NoteVerifier]:
    verifiers: list[NoteVerifier] = []
    for value in values:
        if not value.startswith("@"):
            verifiers.append(NoteVerifier.from_vkey(value))
            continue
        path = Path(value[1:])
        with path.open("rb") as fh:
            raw = _read_bounded(fh, _MAX_VKEY_FILE, f"vkey file {path}")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise NoteError(f"vkey file {path} is not UTF-8") from exc
        found = 0
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                verifiers.append(NoteVerifier.from_vkey(line))
            except (NoteError, SignatureError) as exc:
                raise type(exc)(f"{path}:{number}: {exc.message}", exc.code) from exc
            found += 1
        if not found:
            raise NoteError(f"vkey file {path} holds no vkey")
    return verifiers


def _verify(args: argparse.Namespace) -> int:
    verifiers = _load_verifiers(args.vkey)
    try:
        if args.file == "-":
            data = _read_bounded(sys.stdin.buffer, MAX_NOTE_SIZE, "note")
        else:
            with Path(args.file).open("rb") as fh:
                data = _read_bounded(fh, MAX_NOTE_SIZE, "note")
        verified = verify_note(data, verifiers)
    except NoteError as exc:
        print(f"hansa: note does not verify: {exc.message} [{exc.code.name}]", file=sys.stderr)
        return EXIT_VERIFY_FAILED
    sys.stdout.flush()
    sys.stdout.buffer.write(verified.text.encode("utf-8"))
    sys.stdout.buffer.flush()
    return 0
