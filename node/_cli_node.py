"""``hansa node`` commands: ``init``, ``serve``, ``trust``, ``roster``, ``rotate-key``, ``show``.

* ``hansa node init --data-dir DIR --city CITY [--port N] [--host H]
  [--passphrase-env VAR] [--roster FILE --pin HEX] [--min-participants N]``
  creates the data directory (mode 0700), the node's signing key
  (``node.key``, mode 0600, unencrypted unless ``--passphrase-env`` names a
  variable holding a passphrase) and a commented ``node.toml``. With
  ``--roster`` the node trusts that alliance roster (checked against the
  SHA-256 ``--pin`` obtained out of band, its own signature threshold, its
  expiry and this city's membership), which then replaces ``[[trusted]]``
  as the authority on who may query.
* ``hansa node roster install --data-dir DIR FILE`` verifies FILE as the
  successor of the node's current roster and replaces it (offline; a running
  node takes it up on SIGHUP, or POST the file to ``/v1/roster`` instead).
* ``hansa node serve --data-dir DIR [--host H] [--port N]`` runs the node
  until SIGTERM/SIGINT (see :mod:`hansa.node.server`).
* ``hansa node trust --data-dir DIR --principal ana@melbourne (--key HEX |
  --key-file PATH)`` adds a requester key to ``node.toml``.
* ``hansa node rotate-key --data-dir DIR [--key node|log|witness]`` replaces
  the node key (default), the audit log key or the witness key with a fresh one
  (same passphrase protection) and keeps the old key file under ``retired/``
  beside it. The node logs ``key_rotated`` when it next starts (spec §16.2) and
  still checks the checkpoints the old log key signed under the kept one; the
  alliance names the new key with ``hansa alliance set-key``.
* ``hansa node show --data-dir DIR`` prints the configuration.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path
from typing import Final

from hansa.crypto.keyfile import read_key_file, read_public_key, write_key_file
from hansa.crypto.keys import SigningKey
from hansa.node.config import (
    DEFAULT_PORT,
    KEY_FILE,
    LOG_KEY_FILE,
    RETIRED_DIR,
    WITNESS_KEY_FILE,
    NodeConfig,
    add_trusted_key,
    check_first_roster,
    config_path,
    configure_alliance,
    install_roster,
    load_config,
    load_roster_store,
    parse_pin,
    render_config,
)
from hansa.protocol.errors import ConfigError, HansaError

__all__ = [
    "ROTATABLE",
    "init_node",
    "install_roster_file",
    "key_file_of",
    "register",
    "rotate_key",
]

_DATA_DIR_ENV = "HANSA_DATA_DIR"


def _data_dir_arg(p: argparse.ArgumentParser) -> None:
    default = os.environ.get(_DATA_DIR_ENV)
    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path(default) if default else None,
        required=not default,
        metavar="DIR",
        help=f"the node's data directory (default: ${_DATA_DIR_ENV})",
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``node`` command group."""
    p = sub.add_parser("node", help="run and configure a city node")
    node_sub = p.add_subparsers(dest="node_command", metavar="NODE_COMMAND")
    node_sub.required = True

    init = node_sub.add_parser("init", help="create a data directory, node key and node.toml")
    _data_dir_arg(init)
    init.add_argument("--city", required=True, help="this node's city id, e.g. melbourne")
    init.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    init.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"listen port (default {DEFAULT_PORT})"
    )
    init.add_argument(
        "--passphrase-env",
        metavar="VAR",
        help="encrypt the node key with the passphrase in environment variable VAR "
        "(default: unencrypted, protected by file permissions)",
    )
    init.add_argument(
        "--roster",
        type=Path,
        metavar="FILE",
        help="trust this signed alliance roster (needs --pin); it replaces [[trusted]]",
    )
    init.add_argument(
        "--pin",
        metavar="HEX",
        help="SHA-256 of the roster body (64 hex digits), obtained out of band",
    )
    init.add_argument(
        "--min-participants",
        type=int,
        default=1,
        metavar="N",
        help="refuse requests targeting fewer than N cities or with a quorum below N (default 1)",
    )
    init.add_argument(
        "--witness",
        action="store_true",
        help="this city witnesses other cities' audit logs: also create witness.key",
    )
    init.set_defaults(handler=_init)

    serve = node_sub.add_parser("serve", help="run the node until SIGTERM or SIGINT")
    _data_dir_arg(serve)
    serve.add_argument("--host", help="override the configured listen address")
    serve.add_argument("--port", type=int, help="override the configured port (0 = any free)")
    serve.set_defaults(handler=_serve)

    trust = node_sub.add_parser("trust", help="allow a requester key to query this node")
    _data_dir_arg(trust)
    trust.add_argument("--principal", required=True, help="requester id, e.g. ana@melbourne")
    which = trust.add_mutually_exclusive_group(required=True)
    which.add_argument("--key", metavar="HEX", help="Ed25519 public key, 64 hex digits")
    which.add_argument("--key-file", type=Path, metavar="PATH", help="read the public key here")
    trust.set_defaults(handler=_trust)

    roster = node_sub.add_parser("roster", help="manage the node's trusted alliance roster")
    roster_sub = roster.add_subparsers(dest="roster_command", metavar="ROSTER_COMMAND")
    roster_sub.required = True
    install = roster_sub.add_parser(
        "install", help="verify a newer roster against the current one and replace it"
    )
    _data_dir_arg(install)
    install.add_argument("file", type=Path, metavar="FILE", help="the signed roster file")
    install.set_defaults(handler=_roster_install)
    first = roster_sub.add_parser(
        "set", help="make a node without a roster trust its alliance's first roster (pinned)"
    )
    _data_dir_arg(first)
    first.add_argument("file", type=Path, metavar="FILE", help="the signed roster file")
    first.add_argument(
        "--pin",
        required=True,
        metavar="HEX",
        help="SHA-256 of the roster body (hansa alliance show)",
    )
    first.add_argument(
        "--min-participants", type=int, metavar="N", help="the node's minimum of cities per query"
    )
    first.set_defaults(handler=_roster_set)

    rotate = node_sub.add_parser(
        "rotate-key",
        help="replace the node, log or witness key (the old one is kept under retired/ "
        "beside it); the node logs the change when it next starts",
    )
    _data_dir_arg(rotate)
    rotate.add_argument(
        "--key",
        dest="role",
        choices=ROTATABLE,
        default="node",
        help="which key: node (signs answers; default), log (signs the audit log's "
        "checkpoints) or witness (cosigns other cities' checkpoints)",
    )
    rotate.set_defaults(handler=_rotate_key)

    show = node_sub.add_parser("show", help="print the node's configuration")
    _data_dir_arg(show)
    show.set_defaults(handler=_show)


def init_node(
    data_dir: Path,
    *,
    city: str,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    passphrase: bytes | None = None,
    passphrase_env: str | None = None,
    roster: bytes | None = None,
    pin: bytes | None = None,
    min_participants: int = 1,
    now_ms: int | None = None,
    witness: bool = False,
) -> NodeConfig:
    """Create a node's data directory, signing keys and ``node.toml``.

    Besides the node key it writes ``log.key`` (signs the audit log's
    checkpoints, spec §16.1) and, for a witnessing city, ``witness.key``.

    Args:
        data_dir: the directory to create (it may exist, but not hold a node.toml).
        city: the city id.
        host: listen address.
        port: listen port.
        passphrase: encrypt the key file under this passphrase.
        passphrase_env: the environment variable ``serve`` reads the passphrase from.
        roster: signed bytes of the first alliance roster to trust (with ``pin``).
        pin: SHA-256 of that roster's body.
        min_participants: the node's minimum of participating cities.
        now_ms: the current time for the roster's expiry (default: the wall clock).
        witness: the city witnesses other cities' logs (writes ``witness.key``).

    Returns:
        The configuration written.

    Raises:
        ConfigError: a value is invalid, the directory already holds a node,
            or the roster does not verify (pin, threshold, expiry, membership).
        KeyFileError: the key file exists or cannot be written.
    """
    if (roster is None) != (pin is None):
        raise ConfigError("--roster and --pin must be given together")
    now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    # Render and check (and so validate) before touching the disk.
    text = render_config(
        city=city,
        host=host,
        port=port,
        key_file=KEY_FILE,
        key_passphrase_env=passphrase_env,
        min_participants=min_participants,
        witness=witness,
    )
    if roster is not None and pin is not None:
        check_first_roster(roster, pin, city, now)
    path = config_path(data_dir)
    if path.exists():
        raise ConfigError(f"{path} already exists; this directory already holds a node")
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_key_file(data_dir / KEY_FILE, SigningKey.generate(), passphrase=passphrase)
    # The log and witness keys are unencrypted: the node signs checkpoints unattended.
    write_key_file(data_dir / LOG_KEY_FILE, SigningKey.generate())
    if witness:
        write_key_file(data_dir / WITNESS_KEY_FILE, SigningKey.generate())
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    if roster is not None and pin is not None:
        return configure_alliance(data_dir, roster, pin, now)
    return load_config(data_dir)


def install_roster_file(data_dir: Path, data: bytes, now_ms: int | None = None) -> int:
    """Verify ``data`` as the successor of the node's roster and make it current (offline).

    Args:
        data_dir: the node's data directory.
        data: the new signed roster's bytes.
        now_ms: the current time (default: the wall clock).

    Returns:
        The installed roster version.

    Raises:
        ConfigError: the node has no roster configured, or its stored chain is broken.
        HansaError: the roster does not verify as the next version (codes as
            :func:`hansa.federation.roster.verify_roster`).
    """
    config = load_config(data_dir)
    current = load_roster_store(config.data_dir, config.alliance)
    if current is None:
        raise ConfigError(
            f"{config_path(data_dir)} names no [alliance] roster "
            "(set one up with 'hansa node init --roster FILE --pin HEX')"
        )
    now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    return install_roster(config.data_dir, config.alliance, data, current, now).version


def _init(args: argparse.Namespace) -> int:
    passphrase: bytes | None = None
    if args.passphrase_env:
        value = os.environ.get(args.passphrase_env)
        if not value:
            raise ConfigError(f"environment variable {args.passphrase_env} is not set or empty")
        passphrase = value.encode()
    roster: bytes | None = None
    pin: bytes | None = None
    if (args.roster is None) != (args.pin is None):
        raise ConfigError("--roster and --pin must be given together")
    if args.roster is not None:
        pin = parse_pin(args.pin, "--pin")
        roster = _read_roster(args.roster)
    config = init_node(
        args.data_dir,
        city=args.city,
        host=args.host,
        port=args.port,
        passphrase=passphrase,
        passphrase_env=args.passphrase_env,
        roster=roster,
        pin=pin,
        min_participants=args.min_participants,
        witness=args.witness,
    )
    public = read_public_key(config.key_file)
    print(f"initialised node {config.city!r} in {config.data_dir}")
    print(f"  node key     {public.raw.hex()}")
    print(f"  key id       {public.key_id.hex()}")
    print(f"  log key      {read_public_key(config.path(config.audit.log_key_file)).raw.hex()}")
    if config.audit.witness_key_file is not None:
        witness_pk = read_public_key(config.path(config.audit.witness_key_file))
        print(f"  witness key  {witness_pk.raw.hex()}")
    print(f"  config       {config_path(config.data_dir)}")
    if config.alliance.pin is not None:
        print(f"  roster pin   {config.alliance.pin.hex()} (only keys it names may query)")
    print("next:")
    print(f"  hansa dataset add NAME FILE.csv --data-dir {args.data_dir}")
    if config.alliance.pin is None:
        print(
            f"  hansa node trust --data-dir {args.data_dir} --principal ana@{config.city} --key HEX"
        )
    print(f"  hansa node serve --data-dir {args.data_dir}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from hansa.node.server import configure_logging, run

    config = load_config(args.data_dir)
    overrides: dict[str, object] = {}
    if args.host is not None:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    if overrides:
        config = dataclasses.replace(config, **overrides)  # type: ignore[arg-type]  # validated in __post_init__
    configure_logging()
    run(config)
    return 0


def _trust(args: argparse.Namespace) -> int:
    key_hex: str = args.key if args.key is not None else read_public_key(args.key_file).raw.hex()
    config = add_trusted_key(args.data_dir, args.principal, key_hex)
    added = config.trusted[-1]
    print(
        f"trusted {added.principal} (key id {added.public_key.key_id.hex()[:16]}…) "
        f"on node {config.city!r}; restart the node to apply"
    )
    return 0


def _read_roster(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _roster_set(args: argparse.Namespace) -> int:
    data = _read_roster(args.file)
    pin = parse_pin(args.pin, "--pin")
    now = time.time_ns() // 1_000_000
    config = configure_alliance(
        args.data_dir, data, pin, now, min_participants=args.min_participants
    )
    print(
        f"node {config.city!r} now trusts the alliance roster pinned {pin.hex()[:16]}…; "
        "restart the node to apply"
    )
    return 0


def _roster_install(args: argparse.Namespace) -> int:
    data = _read_roster(args.file)
    try:
        version = install_roster_file(args.data_dir, data)
    except ConfigError:
        raise
    except HansaError as exc:
        raise ConfigError(f"roster refused ({exc.code.name}): {exc.message}") from exc
    print(
        f"installed roster version {version}; a running node takes it up on SIGHUP "
        "(or POST the file to /v1/roster)"
    )
    return 0


ROTATABLE: Final = ("node", "log", "witness")
"""The keys ``hansa node rotate-key`` replaces (``--key``)."""


def rotate_key(config: NodeConfig, role: str = "node") -> tuple[SigningKey, SigningKey, Path]:
    """Replace one of the node's keys with a fresh one; keep the old file under ``retired/``.

    The new key is written with the same passphrase protection as the old one (the
    node key's passphrase, if any; the audit keys have none). A running node keeps
    signing with the key it loaded; when it next starts it logs a ``key_rotated`` entry
    (spec §16.2) before it signs anything with the new key. The node reads retired log
    keys back to check the checkpoints they signed.

    Args:
        config: the node's configuration.
        role: ``"node"``, ``"log"`` or ``"witness"``.

    Returns:
        The old key, the new key, and where the old key file was kept.

    Raises:
        KeyFileError: a key file cannot be read or written.
        ConfigError: the passphrase variable is not set, the role is unknown, or the
            node has no witness key.
    """
    key_file = key_file_of(config, role)
    passphrase = config.passphrase() if role == "node" else None
    old = read_key_file(key_file, passphrase=passphrase)
    new = SigningKey.generate()
    retired = key_file.parent / RETIRED_DIR
    retired.mkdir(mode=0o700, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    kept = retired / f"{key_file.stem}-{stamp}-{old.public_key.key_id.hex()[:16]}.key"
    # The old key is written (0600, atomically) before the new one replaces it, so a
    # crash between the two loses no key.
    write_key_file(kept, old, passphrase=passphrase)
    write_key_file(key_file, new, passphrase=passphrase, overwrite=True)
    return old, new, kept


def key_file_of(config: NodeConfig, role: str) -> Path:
    """The file of the node's ``role`` key (``"node"``, ``"log"`` or ``"witness"``).

    Raises:
        ConfigError: the role is unknown, or the node has no witness key.
    """
    if role == "node":
        return config.key_file
    if role == "log":
        return config.path(config.audit.log_key_file)
    if role == "witness":
        if config.audit.witness_key_file is None:
            raise ConfigError("this node has no witness key ([audit] witness_key in node.toml)")
        return config.path(config.audit.witness_key_file)
    raise ConfigError(f"unknown key {role!r}: one of {', '.join(ROTATABLE)}")


_SET_KEY_FLAG: Final = {"node": "--key", "log": "--log-key", "witness": "--witness-key"}
"""The ``hansa alliance set-key`` flag that names each rotated key."""


def _rotate_key(args: argparse.Namespace) -> int:
    config = load_config(args.data_dir)
    role = args.role
    old, new, kept = rotate_key(config, role)
    new_file = key_file_of(config, role)
    print(f"rotated the {role} key of {config.city!r}")
    print(f"  old key      {old.public_key.raw.hex()} (kept in {kept})")
    print(f"  new key      {new.public_key.raw.hex()}")
    print(f"  key id       {new.public_key.key_id.hex()}")
    print("next:")
    print(
        f"  the alliance names the new key: hansa alliance set-key ROSTER --out NEXT "
        f"--city {config.city} {_SET_KEY_FLAG[role]} {new_file}, then signs and installs NEXT"
    )
    print(
        f"  restart the node (hansa node serve --data-dir {args.data_dir}): it logs the "
        "rotation and signs with the new key from then on"
    )
    return 0


def _show(args: argparse.Namespace) -> int:
    config = load_config(args.data_dir)
    public = read_public_key(config.key_file)
    lines = [
        f"city          {config.city}",
        f"listen        {config.host}:{config.port}",
        f"data dir      {config.data_dir}",
        f"key file      {config.key_file}"
        + (f" (passphrase from ${config.key_passphrase_env})" if config.key_passphrase_env else ""),
        f"node key      {public.raw.hex()}",
        f"key id        {public.key_id.hex()}",
        "limits",
    ]
    for f in dataclasses.fields(config.limits):
        lines.append(f"  {f.name:<24}{getattr(config.limits, f.name)}")
    alliance = config.alliance
    lines.append(f"min participants {alliance.min_participants}")
    if alliance.roster_file is not None and alliance.pin is not None:
        lines.append(f"roster        {alliance.roster_file} (pin {alliance.pin.hex()})")
        lines.append("trusted       ignored: the alliance roster is the authority")
    lines.append(f"trusted       {len(config.trusted)} key(s)")
    for t in config.trusted:
        lines.append(f"  {t.principal:<24}{t.public_key.raw.hex()}")
    print("\n".join(lines))
    return 0
