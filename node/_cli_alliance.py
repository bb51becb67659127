"""``hansa alliance``: create, edit, sign, verify and show alliance roster files.

A roster file holds one :class:`~hansa.federation.roster.SignedRoster` as
binary MessagePack. Editing commands write a new file::

    hansa alliance init --name NAME --out FILE --threshold T --expires-days D
        --member CITY=ENDPOINT:KEYFILE [--member ...] [--root-key CITY=KEYFILE ...]
        [--roles CITY=member,witness ...] [--purpose TOKEN ...] [--witness-quorum Q]
        [--log-key CITY=KEYFILE ...] [--witness-key CITY=KEYFILE ...]
    hansa alliance add-member FILE --out OUT --city CITY --endpoint URL --key KEYFILE
        [--name NAME] [--roles member,witness] [--root-key KEYFILE] [--threshold T]
        [--log-key KEYFILE] [--witness-key KEYFILE]
    hansa alliance set-key FILE --out OUT --city CITY [--key KEYFILE]
        [--log-key KEYFILE] [--witness-key KEYFILE]
    hansa alliance remove-member FILE --out OUT --city CITY [--threshold T]
    hansa alliance add-analyst FILE --out OUT --principal ID --key KEYFILE
        --home-city CITY --purposes a,b
    hansa alliance remove-analyst FILE --out OUT --principal ID
    hansa alliance sign FILE --key KEYFILE [--previous PREVIOUS] [--out OUT]
    hansa alliance verify FILE [FILE ...] [--trusted PREVIOUS] [--pin SHA256]
    hansa alliance show FILE

``init`` writes version 1 unsigned. Each city's root (governance) key is
its ``--root-key`` file, or its node key when no ``--root-key`` is given
for any city. An edit of a roster whose own threshold is met produces
version N+1 without signatures; an edit of a draft (threshold not met)
keeps its version and drops the signatures it had. ``--expires-days``
on an edit renews the expiry from now. A city's ``--log-key`` and
``--witness-key`` are its node's ``log.key`` and ``witness.key`` (key files;
only the public key is read): a roster naming them ends trust on first use of
the city's ``GET /v1/log/keys`` (spec §16.1), and ``set-key`` records their
rotation like the node key's. ``sign`` adds one signature; the
signer must be a root key of the roster or of ``--previous`` (version N
signs the rotation to N+1). ``verify`` checks the files as a chain, oldest
first (``spec/protocol.md``, roster): the first is trusted on its own
threshold (and ``--pin``), or ``--trusted`` is; each next one needs both
thresholds and exactly the next version; the last must not be expired.
A roster that does not verify gives one line on standard error and
:data:`~hansa.node.cli.EXIT_VERIFY_FAILED`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import getpass
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Final

from rich.console import Console
from rich.table import Table

from hansa.crypto.keyfile import is_encrypted, read_key_file, read_public_key
from hansa.crypto.keys import SigningKey, key_id
from hansa.federation.roster import (
    MAX_ROSTER_SIGNATURES,
    MAX_ROSTER_SIZE,
    Analyst,
    Member,
    Role,
    RootKey,
    Roster,
    SignedRoster,
    decode_roster,
    decode_signed_roster,
    encode_signed_roster,
    roster_digest,
    sign_roster,
    signed_by,
    unsigned,
    update_chain,
)
from hansa.node.cli import EXIT_VERIFY_FAILED
from hansa.protocol.errors import (
    ConfigError,
    ErrorCode,
    FreshnessError,
    ProtocolError,
    SignatureError,
)

__all__ = ["register"]

_DAY_MS: Final = 86_400_000
_MAX_FILE: Final = MAX_ROSTER_SIZE + 65 * MAX_ROSTER_SIGNATURES + 1024
_MAX_PASSPHRASE_FILE: Final = 4096


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``alliance`` command group."""
    group = sub.add_parser(
        "alliance",
        help="create, sign, verify and show alliance roster files",
        description="Manage the alliance roster: a versioned, expiring, threshold-signed "
        "list of member cities, analysts, keys and roles.",
    )
    cmds = group.add_subparsers(dest="alliance_command", metavar="SUBCOMMAND")
    cmds.required = True

    p = cmds.add_parser("init", help="write version 1 of a new roster (unsigned)")
    p.add_argument("--name", required=True, help="the alliance's name")
    p.add_argument("--out", required=True, metavar="FILE", help="roster file to write")
    p.add_argument(
        "--threshold", type=int, required=True, metavar="T", help="root signatures needed"
    )
    _expires_arg(p, required=True)
    p.add_argument(
        "--member",
        action="append",
        required=True,
        metavar="CITY=ENDPOINT:KEYFILE",
        help="a member city, its node URL and node key file (repeat per city)",
    )
    p.add_argument(
        "--root-key",
        action="append",
        default=[],
        metavar="CITY=KEYFILE",
        help="a city's governance key (default: every city's node key)",
    )
    p.add_argument(
        "--roles",
        action="append",
        default=[],
        metavar="CITY=ROLES",
        help="a city's comma-separated roles (default: member)",
    )
    p.add_argument(
        "--purpose", action="append", default=[], metavar="TOKEN", help="a purpose (repeat)"
    )
    p.add_argument("--witness-quorum", type=int, metavar="Q", help="witness cosignatures needed")
    p.add_argument(
        "--log-key",
        action="append",
        default=[],
        metavar="CITY=KEYFILE",
        help="a city's log key file (its node's log.key; repeat per city)",
    )
    p.add_argument(
        "--witness-key",
        action="append",
        default=[],
        metavar="CITY=KEYFILE",
        help="a witness city's cosigning key file (its node's witness.key; repeat per city)",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    p.set_defaults(handler=_init)

    p = cmds.add_parser("add-member", help="add a member city (next version, unsigned)")
    _edit_args(p)
    p.add_argument("--city", required=True, help="the city id")
    p.add_argument("--endpoint", required=True, metavar="URL", help="its node's http(s) URL")
    p.add_argument("--key", required=True, metavar="KEYFILE", help="its node key file")
    p.add_argument("--name", dest="display_name", help="display name (default: the city id)")
    p.add_argument(
        "--roles",
        default=Role.MEMBER.value,
        help="comma-separated roles: member, analyst, auditor, witness (default: member)",
    )
    p.add_argument("--root-key", metavar="KEYFILE", help="the city's governance key file")
    _audit_key_args(p)
    p.set_defaults(handler=_add_member)

    p = cmds.add_parser(
        "set-key",
        help="name a member city's new node, log or witness key (next version, unsigned)",
    )
    _edit_args(p)
    p.add_argument("--city", required=True, help="the city id")
    p.add_argument("--key", metavar="KEYFILE", help="its new node key (hansa node rotate-key)")
    _audit_key_args(p)
    p.set_defaults(handler=_set_key)

    p = cmds.add_parser("remove-member", help="remove a member city (next version, unsigned)")
    _edit_args(p)
    p.add_argument("--city", required=True, help="the city id")
    p.set_defaults(handler=_remove_member)

    p = cmds.add_parser("add-analyst", help="add an analyst (next version, unsigned)")
    _edit_args(p)
    p.add_argument("--principal", required=True, metavar="ID", help="the analyst's id")
    p.add_argument("--key", required=True, metavar="KEYFILE", help="the analyst's key file")
    p.add_argument("--home-city", required=True, metavar="CITY", help="the vouching city")
    p.add_argument(
        "--purposes",
        required=True,
        help="comma-separated purposes (added to the vocabulary if new)",
    )
    p.set_defaults(handler=_add_analyst)

    p = cmds.add_parser("remove-analyst", help="remove an analyst (next version, unsigned)")
    _edit_args(p)
    p.add_argument("--principal", required=True, metavar="ID", help="the analyst's id")
    p.set_defaults(handler=_remove_analyst)

    p = cmds.add_parser("sign", help="add a root key's signature to a roster")
    p.add_argument("file", metavar="FILE", help="the roster file")
    p.add_argument("--key", required=True, metavar="KEYFILE", help="a root key file")
    p.add_argument(
        "--previous",
        metavar="FILE",
        help="the previous version, whose root keys may sign this one",
    )
    p.add_argument("--out", metavar="FILE", help="where to write (default: FILE in place)")
    secret = p.add_mutually_exclusive_group()
    secret.add_argument("--passphrase-file", metavar="FILE", help="key file passphrase file")
    secret.add_argument("--passphrase-env", metavar="VAR", help="key file passphrase variable")
    p.set_defaults(handler=_sign)

    p = cmds.add_parser("verify", help="verify a roster or a chain of roster versions")
    p.add_argument("files", nargs="+", metavar="FILE", help="roster versions, oldest first")
    p.add_argument("--trusted", metavar="FILE", help="the roster version already trusted")
    p.add_argument("--pin", metavar="SHA256", help="pinned SHA-256 (hex) of the first roster")
    p.set_defaults(handler=_verify)

    p = cmds.add_parser("show", help="print a roster as tables")
    p.add_argument("file", metavar="FILE", help="the roster file")
    p.set_defaults(handler=_show)


def _expires_arg(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument(
        "--expires-days",
        type=float,
        required=required,
        metavar="D",
        help="expiry, in days from now" + ("" if required else " (default: unchanged)"),
    )


def _audit_key_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-key", metavar="KEYFILE", help="the city's log key file (log.key)")
    p.add_argument(
        "--witness-key",
        metavar="KEYFILE",
        help="the city's witness key file (witness.key; a witness city only)",
    )


def _edit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="the roster file to start from")
    p.add_argument("--out", required=True, metavar="FILE", help="roster file to write")
    p.add_argument("--threshold", type=int, metavar="T", help="new signing threshold")
    _expires_arg(p, required=False)


# --- files -----------------------------------------------------------------------


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _expires(days: float) -> int:
    if not 0 <= days <= 36_600:
        raise ConfigError(f"--expires-days must be between 0 and 36600, got {days}")
    return _now_ms() + round(days * _DAY_MS)


def _read(path: str) -> SignedRoster:
    target = Path(path)
    with target.open("rb") as fh:
        data = fh.read(_MAX_FILE + 1)
    if len(data) > _MAX_FILE:
        raise ProtocolError(f"{target} is too large to be a roster file", ErrorCode.TOO_LARGE)
    try:
        return decode_signed_roster(data)
    except ProtocolError as exc:
        raise ProtocolError(f"{target} is not a roster file: {exc.message}", exc.code) from exc


def _write(path: str, signed: SignedRoster, *, overwrite: bool = True) -> None:
    target = Path(path)
    if not overwrite and target.exists():
        raise ConfigError(f"{target} already exists; use --force to replace it")
    tmp = target.parent / f".{target.name}.{secrets.token_hex(8)}.tmp"
    try:
        tmp.write_bytes(encode_signed_roster(signed))
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _split(text: str, sep: str, what: str) -> tuple[str, str]:
    head, found, tail = text.partition(sep)
    if not found or not head or not tail:
        raise ConfigError(f"expected {what}, got {text!r}")
    return head, tail


def _roles(text: str) -> tuple[Role, ...]:
    roles: list[Role] = []
    for part in text.split(","):
        try:
            role = Role(part.strip())
        except ValueError:
            names = ", ".join(r.value for r in Role)
            raise ConfigError(f"unknown role {part.strip()!r} (one of: {names})") from None
        if role not in roles:
            roles.append(role)
    return tuple(roles)


def _build(make: type[Roster], **fields: object) -> SignedRoster:
    """Build a roster, turning a broken rule into one readable error."""
    try:
        roster = make(**fields)  # type: ignore[arg-type]
    except (ValueError, TypeError) as exc:
        raise ProtocolError(f"invalid roster: {exc}", ErrorCode.INVALID_FIELD) from exc
    return unsigned(roster)


def _fields(roster: Roster) -> dict[str, object]:
    return {name: getattr(roster, name) for name in roster.__struct_fields__}


# --- commands --------------------------------------------------------------------


def _keys_by_city(specs: list[str], option: str) -> dict[str, bytes]:
    """Read ``CITY=KEYFILE`` options: the public key of each file, by city."""
    keys: dict[str, bytes] = {}
    for spec in specs:
        city, keyfile = _split(spec, "=", "CITY=KEYFILE")
        if city in keys:
            raise ConfigError(f"{option} names {city!r} twice")
        keys[city] = read_public_key(keyfile).raw
    return keys


def _init(args: argparse.Namespace) -> int:
    roles: dict[str, tuple[Role, ...]] = {}
    for spec in args.roles:
        city, text = _split(spec, "=", "CITY=ROLES")
        roles[city] = _roles(text)
    log_keys = _keys_by_city(args.log_key, "--log-key")
    witness_keys = _keys_by_city(args.witness_key, "--witness-key")
    members: list[Member] = []
    for spec in args.member:
        city, rest = _split(spec, "=", "CITY=ENDPOINT:KEYFILE")
        endpoint, keyfile = rest.rsplit(":", 1) if ":" in rest else ("", rest)
        if not endpoint or not keyfile:
            raise ConfigError(f"expected CITY=ENDPOINT:KEYFILE, got {spec!r}")
        key = read_public_key(keyfile)
        members.append(
            _member(
                city,
                city,
                key.raw,
                endpoint,
                roles.pop(city, (Role.MEMBER,)),
                log_key=log_keys.pop(city, None),
                witness_key=witness_keys.pop(city, None),
            )
        )
    for option, left in (
        ("--roles", roles),
        ("--log-key", log_keys),
        ("--witness-key", witness_keys),
    ):
        if left:
            raise ConfigError(f"{option} names {sorted(left)[0]!r}, which is no --member")
    if args.root_key:
        roots = []
        for spec in args.root_key:
            city, keyfile = _split(spec, "=", "CITY=KEYFILE")
            roots.append(_root(city, read_public_key(keyfile).raw))
    else:
        roots = [_root(m.city, m.public_key) for m in members]
    signed = _build(
        Roster,
        alliance=args.name,
        version=1,
        expires_ms=_expires(args.expires_days),
        threshold=args.threshold,
        root_keys=tuple(roots),
        members=tuple(members),
        analysts=(),
        purposes=tuple(args.purpose),
        witness_quorum=args.witness_quorum,
    )
    _write(args.out, signed, overwrite=args.force)
    _report(args.out, signed)
    return 0


def _member(
    city: str,
    name: str,
    key: bytes,
    endpoint: str,
    roles: tuple[Role, ...],
    *,
    log_key: bytes | None = None,
    witness_key: bytes | None = None,
) -> Member:
    try:
        return Member(
            city=city,
            name=name,
            public_key=key,
            endpoint=endpoint,
            roles=roles,
            log_key=log_key,
            witness_key=witness_key,
        )
    except (ValueError, TypeError) as exc:
        raise ProtocolError(f"invalid member {city!r}: {exc}", ErrorCode.INVALID_FIELD) from exc


def _root(city: str, key: bytes) -> RootKey:
    try:
        return RootKey(city=city, public_key=key)
    except (ValueError, TypeError) as exc:
        raise ProtocolError(
            f"invalid root key of {city!r}: {exc}", ErrorCode.INVALID_FIELD
        ) from exc


def _edit(args: argparse.Namespace, **changes: object) -> int:
    """Write the roster in ``args.file`` with ``changes``, as a draft of the right version."""
    signed = _read(args.file)
    roster = decode_roster(signed.body)
    fields = _fields(roster)
    published = len(signed_by(signed, roster.root_key_ids)) >= roster.threshold
    if published:
        fields["version"] = roster.version + 1
    if args.expires_days is not None:
        fields["expires_ms"] = _expires(args.expires_days)
    fields.update(changes)
    if args.threshold is not None:
        fields["threshold"] = args.threshold
    root_count = len(fields["root_keys"])  # type: ignore[arg-type]
    if args.threshold is None and roster.threshold > root_count:
        raise ConfigError(
            f"the threshold {roster.threshold} exceeds the {root_count} root keys left; "
            "give --threshold"
        )
    result = _build(Roster, **fields)
    _write(args.out, result)
    _report(args.out, result)
    return 0


def _add_member(args: argparse.Namespace) -> int:
    roster = decode_roster(_read(args.file).body)
    if roster.member(args.city) is not None:
        raise ConfigError(f"{args.city!r} is already a member")
    key = read_public_key(args.key).raw
    member = _member(
        args.city,
        args.display_name or args.city,
        key,
        args.endpoint,
        _roles(args.roles),
        log_key=_public(args.log_key),
        witness_key=_public(args.witness_key),
    )
    roots = roster.root_keys
    if args.root_key is not None:
        roots = (*roots, _root(args.city, read_public_key(args.root_key).raw))
    return _edit(args, members=(*roster.members, member), root_keys=roots)


def _public(keyfile: str | None) -> bytes | None:
    return None if keyfile is None else read_public_key(keyfile).raw


def _set_key(args: argparse.Namespace) -> int:
    roster = decode_roster(_read(args.file).body)
    old = roster.member(args.city)
    if old is None:
        raise ConfigError(f"{args.city!r} is not a member")
    if args.key is None and args.log_key is None and args.witness_key is None:
        raise ConfigError("give at least one of --key, --log-key and --witness-key")
    changes: dict[str, bytes] = {}
    for name, keyfile, what in (
        ("public_key", args.key, "node"),
        ("log_key", args.log_key, "log"),
        ("witness_key", args.witness_key, "witness"),
    ):
        if keyfile is None:
            continue
        key = read_public_key(keyfile).raw
        if key == getattr(old, name):
            raise ConfigError(
                f"the roster already names this key for {args.city!r} (as its {what} key)"
            )
        changes[name] = key
    # Only the named keys change: the city's root (governance) key, if it was the old
    # node key, stays until the alliance replaces it, so the city can still sign.
    member = _member(
        old.city,
        old.name,
        changes.get("public_key", old.public_key),
        old.endpoint,
        old.roles,
        log_key=changes.get("log_key", old.log_key),
        witness_key=changes.get("witness_key", old.witness_key),
    )
    members = tuple(member if m.city == args.city else m for m in roster.members)
    return _edit(args, members=members)


def _remove_member(args: argparse.Namespace) -> int:
    roster = decode_roster(_read(args.file).body)
    if roster.member(args.city) is None:
        raise ConfigError(f"{args.city!r} is not a member")
    dropped = [a.principal for a in roster.analysts if a.home_city == args.city]
    if dropped:
        # Analysts are vouched for by their home city; they leave with it.
        print(f"removing analysts homed in {args.city}: {', '.join(dropped)}", file=sys.stderr)
    return _edit(
        args,
        members=tuple(m for m in roster.members if m.city != args.city),
        root_keys=tuple(k for k in roster.root_keys if k.city != args.city),
        analysts=tuple(a for a in roster.analysts if a.home_city != args.city),
    )


def _add_analyst(args: argparse.Namespace) -> int:
    roster = decode_roster(_read(args.file).body)
    if roster.analyst(args.principal) is not None:
        raise ConfigError(f"analyst {args.principal!r} is already in the roster")
    purposes = tuple(dict.fromkeys(p.strip() for p in args.purposes.split(",") if p.strip()))
    try:
        analyst = Analyst(
            principal=args.principal,
            public_key=read_public_key(args.key).raw,
            home_city=args.home_city,
            purposes=purposes,
        )
    except (ValueError, TypeError) as exc:
        raise ProtocolError(f"invalid analyst: {exc}", ErrorCode.INVALID_FIELD) from exc
    vocabulary = (*roster.purposes, *(p for p in purposes if p not in roster.purposes))
    return _edit(args, analysts=(*roster.analysts, analyst), purposes=vocabulary)


def _remove_analyst(args: argparse.Namespace) -> int:
    roster = decode_roster(_read(args.file).body)
    if roster.analyst(args.principal) is None:
        raise ConfigError(f"analyst {args.principal!r} is not in the roster")
    return _edit(args, analysts=tuple(a for a in roster.analysts if a.principal != args.principal))


def _sign(args: argparse.Namespace) -> int:
    signed = _read(args.file)
    roster = decode_roster(signed.body)
    allowed = dict(roster.root_key_ids)
    if args.previous is not None:
        allowed.update(decode_roster(_read(args.previous).body).root_key_ids)
    public = read_public_key(args.key)
    if public.key_id not in allowed:
        raise SignatureError(
            f"{args.key} is not a root key of this roster"
            + (" or of the previous one" if args.previous else ""),
            ErrorCode.UNKNOWN_KEY,
        )
    key = _signing_key(args)
    result = sign_roster(signed, key)
    out = args.out or args.file
    _write(out, result)
    _report(out, result)
    return 0


def _signing_key(args: argparse.Namespace) -> SigningKey:
    if not is_encrypted(args.key):
        return read_key_file(args.key)
    if args.passphrase_file is not None:
        path = Path(args.passphrase_file)
        with path.open("rb") as fh:
            data = fh.read(_MAX_PASSPHRASE_FILE + 1)
        if len(data) > _MAX_PASSPHRASE_FILE:
            raise ConfigError(f"passphrase file {path} is too large")
        passphrase = data.removesuffix(b"\n").removesuffix(b"\r")
    elif args.passphrase_env is not None:
        value = os.environ.get(args.passphrase_env)
        if not value:
            raise ConfigError(f"environment variable {args.passphrase_env} is not set or empty")
        passphrase = value.encode("utf-8", "surrogateescape")
    elif sys.stdin.isatty():
        passphrase = getpass.getpass(f"Passphrase for {args.key}: ").encode(
            "utf-8", "surrogateescape"
        )
    else:
        raise ConfigError(f"{args.key} is encrypted; use --passphrase-file or --passphrase-env")
    return read_key_file(args.key, passphrase=passphrase)


def _verify(args: argparse.Namespace) -> int:
    pin: bytes | None = None
    if args.pin is not None:
        try:
            pin = bytes.fromhex(args.pin)
        except ValueError:
            pin = b""
        if len(pin) != 32:
            raise ConfigError("--pin must be 64 hex digits (a SHA-256)")
    paths = ([args.trusted] if args.trusted else []) + args.files
    try:
        chain = [_read(path) for path in paths]
        roster = update_chain(None, chain, _now_ms(), pin=pin)
    except (SignatureError, FreshnessError, ProtocolError) as exc:
        print(f"hansa: roster does not verify: {exc.message} [{exc.code.name}]", file=sys.stderr)
        return EXIT_VERIFY_FAILED
    last = chain[-1]
    signers = sorted(
        k.city for k in roster.root_keys if _kid(k) in signed_by(last, roster.root_key_ids)
    )
    print(f"alliance: {roster.alliance}")
    print(f"version: {roster.version}")
    print(f"expires: {_iso(roster.expires_ms)}")
    print(f"sha256: {roster_digest(last).hex()}")
    print(f"signed-by: {', '.join(signers)} ({len(signers)} of threshold {roster.threshold})")
    print("verdict: OK")
    return 0


def _kid(key: RootKey) -> bytes:
    return key_id(key.public_key)


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).isoformat(timespec="seconds")


def _report(path: str, signed: SignedRoster) -> None:
    roster = decode_roster(signed.body)
    valid = len(signed_by(signed, roster.root_key_ids))
    print(f"file: {path}")
    print(f"version: {roster.version}")
    print(f"signatures: {valid} of threshold {roster.threshold}")
    print(f"sha256: {roster_digest(signed).hex()}")


def _show(args: argparse.Namespace) -> int:
    signed = _read(args.file)
    roster = decode_roster(signed.body)
    valid = signed_by(signed, roster.root_key_ids)
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    now = _now_ms()
    state = "EXPIRED" if now >= roster.expires_ms else "valid"
    console.print(f"[bold]{roster.alliance}[/bold]  roster version {roster.version}")
    console.print(f"expires: {_iso(roster.expires_ms)} ({state})")
    console.print(f"sha256: {roster_digest(signed).hex()}")
    console.print(
        f"signatures: {len(valid)} valid of threshold {roster.threshold} "
        f"({len(signed.signatures)} present)"
    )
    if roster.witness_quorum is not None:
        console.print(f"witness quorum: {roster.witness_quorum}")
    console.print(f"purposes: {', '.join(roster.purposes) or '(none)'}")

    table = Table(title="members")
    columns = ("city", "name", "endpoint", "roles", "node key id", "log key id", "witness key id")
    for col in (*columns, "root key", "signed"):
        table.add_column(col)
    roots = {k.city: k for k in roster.root_keys}
    for m in roster.members:
        root = roots.get(m.city)
        table.add_row(
            m.city,
            m.name,
            m.endpoint,
            ",".join(m.roles),
            _short(key_id(m.public_key)),
            _short(key_id(m.log_key)) if m.log_key is not None else "-",
            _short(key_id(m.witness_key)) if m.witness_key is not None else "-",
            _short(_kid(root)) if root else "-",
            ("yes" if _kid(root) in valid else "no") if root else "-",
        )
    console.print(table)
    unpinned = [m.city for m in roster.members if m.log_key is None]
    unpinned += [
        f"{m.city} (witness)"
        for m in roster.members
        if Role.WITNESS in m.roles and m.witness_key is None
    ]
    if unpinned:
        console.print(
            "keys the roster does not name (trusted on first use from GET /v1/log/keys): "
            + ", ".join(unpinned)
        )
    if roster.analysts:
        table = Table(title="analysts")
        for col in ("principal", "home city", "purposes", "key id"):
            table.add_column(col)
        for a in roster.analysts:
            table.add_row(
                a.principal, a.home_city, ",".join(a.purposes), _short(key_id(a.public_key))
            )
        console.print(table)
    return 0


def _short(kid: bytes) -> str:
    return kid.hex()[:16]
