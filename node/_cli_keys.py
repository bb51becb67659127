"""``hansa keygen`` and ``hansa key show``: create and inspect key files.

``keygen`` writes a new Ed25519 key file (format in
:mod:`hansa.crypto.keyfile`) and prints, one ``name: value`` per line::

    file: <path>
    encrypted: yes|no
    public-key: <64 hex>
    key-id: <64 hex, hansa.crypto.keys.key_id>
    vkey: <C2SP signed-note verifier key for --name>

``key show PATH`` prints the same lines for an existing file without
asking for its passphrase.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path
from typing import Final

from hansa.crypto.keyfile import inspect_key_file, write_key_file
from hansa.crypto.keys import PublicKey, SigningKey
from hansa.crypto.note import NoteVerifier, validate_key_name
from hansa.protocol.errors import ConfigError, KeyFileError

__all__ = ["register"]

DEFAULT_KEY_PATH: Final = "hansa.key"
_MAX_PASSPHRASE_FILE: Final = 4096


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``keygen`` and ``key`` commands."""
    p = sub.add_parser(
        "keygen",
        help="create a node or analyst key file",
        description="Create a new Ed25519 key file (mode 0600) and print its public key, "
        "key id and C2SP vkey.",
    )
    p.add_argument(
        "--out",
        default=DEFAULT_KEY_PATH,
        metavar="PATH",
        help=f"where to write the key file (default: ./{DEFAULT_KEY_PATH})",
    )
    p.add_argument(
        "--name",
        metavar="NAME",
        help="signed-note key name for the printed vkey (default: the file name without suffix)",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing key file")
    secret = p.add_mutually_exclusive_group()
    secret.add_argument(
        "--passphrase-file",
        metavar="FILE",
        help="read the passphrase from FILE (one trailing newline is ignored)",
    )
    secret.add_argument(
        "--passphrase-env", metavar="VAR", help="read the passphrase from environment variable VAR"
    )
    secret.add_argument(
        "--no-passphrase",
        action="store_true",
        help="store the seed unencrypted (protected only by the file mode)",
    )
    p.set_defaults(handler=_keygen)

    key = sub.add_parser("key", help="inspect key files")
    key_sub = key.add_subparsers(dest="key_command", metavar="SUBCOMMAND")
    key_sub.required = True
    show = key_sub.add_parser(
        "show", help="print a key file's public key, key id and vkey (no passphrase needed)"
    )
    show.add_argument("path", metavar="PATH", help="the key file")
    show.add_argument(
        "--name",
        metavar="NAME",
        help="signed-note key name for the printed vkey (default: the file name without suffix)",
    )
    show.set_defaults(handler=_show)


def _keygen(args: argparse.Namespace) -> int:
    out = Path(args.out)
    name = args.name if args.name is not None else out.stem
    validate_key_name(name)
    if out.exists() and not args.force:
        # Before asking for a passphrase that would only be thrown away.
        raise KeyFileError(f"key file {out} already exists; use --force to replace it")
    passphrase = _passphrase(args)
    key = SigningKey.generate()
    write_key_file(out, key, passphrase=passphrase, overwrite=args.force)
    _print_summary(out, key.public_key, encrypted=passphrase is not None, name=name)
    return 0


def _show(args: argparse.Namespace) -> int:
    path = Path(args.path)
    name = args.name if args.name is not None else path.stem
    validate_key_name(name)
    info = inspect_key_file(path)
    _print_summary(path, info.public_key, encrypted=info.encrypted, name=name)
    return 0


def _print_summary(path: Path, public_key: PublicKey, *, encrypted: bool, name: str) -> None:
    print(f"file: {path}")
    print(f"encrypted: {'yes' if encrypted else 'no'}")
    print(f"public-key: {public_key.raw.hex()}")
    print(f"key-id: {public_key.key_id.hex()}")
    # c2sp.org/signed-note verifier key, as hansa.crypto.note formats it.
    print(f"vkey: {NoteVerifier(name, public_key).vkey}")


def _passphrase(args: argparse.Namespace) -> bytes | None:
    if args.no_passphrase:
        return None
    if args.passphrase_file is not None:
        return _passphrase_from_file(Path(args.passphrase_file))
    if args.passphrase_env is not None:
        value = os.environ.get(args.passphrase_env)
        if value is None:
            raise ConfigError(f"environment variable {args.passphrase_env} is not set")
        if not value:
            raise ConfigError(f"environment variable {args.passphrase_env} is empty")
        return value.encode("utf-8", "surrogateescape")
    if not sys.stdin.isatty():
        raise ConfigError(
            "no passphrase given and stdin is not a terminal; "
            "use --passphrase-file, --passphrase-env or --no-passphrase"
        )
    first = getpass.getpass("Passphrase for the new key (empty for none): ")
    if not first:
        print("hansa: warning: the key will be stored unencrypted", file=sys.stderr)
        return None
    if getpass.getpass("Repeat the passphrase: ") != first:
        raise ConfigError("the two passphrases do not match")
    return first.encode("utf-8", "surrogateescape")


def _passphrase_from_file(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_PASSPHRASE_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read passphrase file {path}: {exc.strerror}") from exc
    if len(data) > _MAX_PASSPHRASE_FILE:
        raise ConfigError(f"passphrase file {path} is larger than {_MAX_PASSPHRASE_FILE} bytes")
    # Files written by editors or `echo` end in a newline that is not part of it.
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        raise ConfigError(f"passphrase file {path} is empty")
    return data
