"""``hansa node`` commands: ``init``, ``serve``, ``trust`` and ``show``.

* ``hansa node init --data-dir DIR --city CITY [--port N] [--host H]
  [--passphrase-env VAR]`` creates the data directory (mode 0700), the node's
  signing key (``node.key``, mode 0600, unencrypted unless
  ``--passphrase-env`` names a variable holding a passphrase) and a
  commented ``node.toml``.
* ``hansa node serve --data-dir DIR [--host H] [--port N]`` runs the node
  until SIGTERM/SIGINT (see :mod:`hansa.node.server`).
* ``hansa node trust --data-dir DIR --principal ana@melbourne (--key HEX |
  --key-file PATH)`` adds a requester key to ``node.toml``.
* ``hansa node show --data-dir DIR`` prints the configuration.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from hansa.crypto.keyfile import read_public_key, write_key_file
from hansa.crypto.keys import SigningKey
from hansa.node.config import (
    DEFAULT_PORT,
    KEY_FILE,
    NodeConfig,
    add_trusted_key,
    config_path,
    load_config,
    render_config,
)
from hansa.protocol.errors import ConfigError

__all__ = ["init_node", "register"]

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
) -> NodeConfig:
    """Create a node's data directory, signing key and ``node.toml``.

    Args:
        data_dir: the directory to create (it may exist, but not hold a node.toml).
        city: the city id.
        host: listen address.
        port: listen port.
        passphrase: encrypt the key file under this passphrase.
        passphrase_env: the environment variable ``serve`` reads the passphrase from.

    Returns:
        The configuration written.

    Raises:
        ConfigError: a value is invalid or the directory already holds a node.
        KeyFileError: the key file exists or cannot be written.
    """
    # Render (and so validate) before touching the disk.
    text = render_config(
        city=city, host=host, port=port, key_file=KEY_FILE, key_passphrase_env=passphrase_env
    )
    path = config_path(data_dir)
    if path.exists():
        raise ConfigError(f"{path} already exists; this directory already holds a node")
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_key_file(data_dir / KEY_FILE, SigningKey.generate(), passphrase=passphrase)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return load_config(data_dir)


def _init(args: argparse.Namespace) -> int:
    passphrase: bytes | None = None
    if args.passphrase_env:
        value = os.environ.get(args.passphrase_env)
        if not value:
            raise ConfigError(f"environment variable {args.passphrase_env} is not set or empty")
        passphrase = value.encode()
    config = init_node(
        args.data_dir,
        city=args.city,
        host=args.host,
        port=args.port,
        passphrase=passphrase,
        passphrase_env=args.passphrase_env,
    )
    public = read_public_key(config.key_file)
    print(f"initialised node {config.city!r} in {config.data_dir}")
    print(f"  node key     {public.raw.hex()}")
    print(f"  key id       {public.key_id.hex()}")
    print(f"  config       {config_path(config.data_dir)}")
    print("next:")
    print(f"  hansa dataset add NAME FILE.csv --data-dir {args.data_dir}")
    print(f"  hansa node trust --data-dir {args.data_dir} --principal ana@{config.city} --key HEX")
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
    lines.append(f"trusted       {len(config.trusted)} key(s)")
    for t in config.trusted:
        lines.append(f"  {t.principal:<24}{t.public_key.raw.hex()}")
    print("\n".join(lines))
    return 0
