"""Node configuration: ``<data_dir>/node.toml`` as frozen dataclasses.

Theory of operation
-------------------
``hansa node init`` writes a commented ``node.toml`` (see
:func:`render_config`) in which every field is present with its unit and
default, so an operator never has to guess what a knob does. The node reads
it once at start-up with :func:`load_config`: the file is parsed with
:mod:`tomllib`, every table and key is checked (unknown keys are refused, so
a typo never silently falls back to a default), and the result is a
:class:`NodeConfig` that cannot be changed afterwards. Anything wrong raises
:class:`~hansa.protocol.errors.ConfigError` with a one-line message naming
the file, the field and what was expected.

Every resource limit is an explicit field of :class:`NodeLimits`
(aesthetics anchors §9.12).

Who may query the node (``spec/protocol.md`` §8.2) comes from one of two
places. With an ``[alliance]`` table naming a ``roster`` file and its
``pin``, the alliance roster is the authority and the ``[[trusted]]`` list is
ignored: only analyst keys the roster names may query, for the purposes it
allows them. Without a roster, the ``[[trusted]]`` tables are the authority
(roster-less, single-node use): each binds one Ed25519 public key to one
requester principal, and a request signed by that key must name that
principal.

The roster store
----------------
The trusted roster lives in the data directory: ``roster.bin`` (the
configured name) holds the current signed roster, and ``rosters/<N>.bin``
every version the node has accepted, so that at start-up the chain can be
walked from the pinned first roster to the current one with the TUF rules
(:func:`hansa.federation.roster.update_chain`, spec §15.1). Every write is
atomic (temporary file, fsync, rename): a crash leaves either the old or the
new roster, never a torn one. Expiry is not judged when the store is loaded:
a node with an expired roster starts, and refuses every query with
``EXPIRED`` until a newer roster is installed (:func:`install_roster`).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from hansa.crypto.keys import PublicKey
from hansa.federation.roster import (
    Roster,
    SignedRoster,
    decode_roster,
    decode_signed_roster,
    default_log_origin,
    roster_digest,
    update_chain,
    verify_roster,
)
from hansa.protocol.errors import ConfigError, ErrorCode, HansaError
from hansa.protocol.freshness import FreshnessLimits
from hansa.protocol.messages import CITY_ID_PATTERN, MAX_TEXT, PRINCIPAL_ID_PATTERN

__all__ = [
    "AUDIT_FILE",
    "CONFIG_FILE",
    "DEFAULT_PORT",
    "KEY_FILE",
    "LOG_KEY_FILE",
    "RETIRED_DIR",
    "ROSTER_FILE",
    "ROSTER_HISTORY_DIR",
    "WITNESS_KEY_FILE",
    "AllianceConfig",
    "AuditConfig",
    "NodeConfig",
    "NodeLimits",
    "TrustedKey",
    "TrustedRoster",
    "add_trusted_key",
    "check_first_roster",
    "config_path",
    "configure_alliance",
    "install_roster",
    "load_config",
    "load_roster_store",
    "parse_config",
    "parse_pin",
    "render_config",
    "retired_key_files",
]

CONFIG_FILE: Final = "node.toml"
"""Name of the configuration file inside the data directory."""
KEY_FILE: Final = "node.key"
"""Default name of the node's signing key file inside the data directory."""
DEFAULT_PORT: Final = 8470
"""Default TCP port of a node (unassigned by IANA)."""
ROSTER_FILE: Final = "roster.bin"
"""Default name of the current alliance roster file inside the data directory."""
ROSTER_HISTORY_DIR: Final = "rosters"
"""Directory (inside the data directory) keeping every accepted roster version."""
MAX_MIN_PARTICIPANTS: Final = 1000
LOG_KEY_FILE: Final = "log.key"
"""Default name of the key that signs the audit log's checkpoints."""
WITNESS_KEY_FILE: Final = "witness.key"
"""Default name of the witness cosigning key (only for a witnessing city)."""
RETIRED_DIR: Final = "retired"
"""Beside a key file: the keys it replaced (``hansa node rotate-key``), one file each."""
AUDIT_FILE: Final = "audit.sqlite"
"""Name of the audit log store inside the data directory."""

_T = TypeVar("_T")

KIB: Final = 1024
MIB: Final = 1024 * KIB

# The same shapes as the wire types (hansa.protocol.messages CityId / PrincipalId),
# so a configured id is always one the protocol can carry.
# The wire's own shapes (spec §5.3), matched whole: ``$`` would let "city\n" through.
_CITY_RE: Final = re.compile(CITY_ID_PATTERN)
_PRINCIPAL_RE: Final = re.compile(PRINCIPAL_ID_PATTERN)
# DuckDB's memory_limit syntax: a number and a unit.
_MEMORY_RE: Final = re.compile(r"^[0-9]+(?:\.[0-9]+)?\s*(?:B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$")
_ENV_VAR_RE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_HOST_RE: Final = re.compile(r"^[A-Za-z0-9.:\-\[\]]{1,253}$")


@dataclass(frozen=True, slots=True)
class NodeLimits:
    """Every resource limit of a node, with its unit.

    Attributes:
        max_request_bytes: largest accepted ``POST /v1/query`` body, in bytes
            (also aiohttp's ``client_max_size``). Default 256 KiB.
        query_timeout_s: wall-clock limit for one query in the engine, in seconds.
        memory_limit: DuckDB memory limit, a number and a unit (``"1GB"``).
        engine_threads: DuckDB worker threads per query.
        max_concurrent_queries: queries executed at the same time (thread pool size).
        max_queued_queries: queries allowed to wait for a free slot; beyond
            this the node refuses with ``UNAVAILABLE`` instead of queueing.
        shutdown_timeout_s: on SIGTERM/SIGINT, how long in-flight requests may
            take to finish before they are cancelled, in seconds.
        max_skew_ms: tolerated clock skew for a future-dated ``issued_at``, in ms.
        max_validity_ms: largest accepted ``expires_at - issued_at``, in ms.
        replay_capacity: most unexpired requests remembered by the replay cache.
        max_connections: most client connections open at once; one more is answered
            ``503`` and closed before anything is read from it.
    """

    max_request_bytes: int = 256 * KIB
    query_timeout_s: float = 10.0
    memory_limit: str = "1GB"
    engine_threads: int = 2
    max_concurrent_queries: int = 2
    max_queued_queries: int = 256
    shutdown_timeout_s: float = 30.0
    max_skew_ms: int = 30_000
    max_validity_ms: int = 300_000
    replay_capacity: int = 100_000
    max_connections: int = 1024

    def __post_init__(self) -> None:
        _check_int("limits", "max_request_bytes", self.max_request_bytes, KIB, 4 * MIB)
        _check_float("limits", "query_timeout_s", self.query_timeout_s, 0.01, 3600.0)
        if not _MEMORY_RE.fullmatch(self.memory_limit):
            raise ConfigError(
                f"[limits] memory_limit must be a size such as '512MB' or '2GB', "
                f"got {self.memory_limit!r}"
            )
        _check_int("limits", "engine_threads", self.engine_threads, 1, 256)
        _check_int("limits", "max_concurrent_queries", self.max_concurrent_queries, 1, 1024)
        _check_int("limits", "max_queued_queries", self.max_queued_queries, 0, 1_000_000)
        _check_float("limits", "shutdown_timeout_s", self.shutdown_timeout_s, 0.0, 3600.0)
        _check_int("limits", "max_skew_ms", self.max_skew_ms, 0, 3_600_000)
        _check_int("limits", "max_validity_ms", self.max_validity_ms, 1, 86_400_000)
        _check_int("limits", "replay_capacity", self.replay_capacity, 1, 100_000_000)
        # At most 65,536: each accept counts the open connections (a list of them).
        _check_int("limits", "max_connections", self.max_connections, 1, 65_536)

    def freshness(self) -> FreshnessLimits:
        """Return the freshness parameters for :class:`~hansa.protocol.ReplayGuard`."""
        return FreshnessLimits(
            max_skew_ms=self.max_skew_ms,
            max_validity_ms=self.max_validity_ms,
            capacity=self.replay_capacity,
        )


@dataclass(frozen=True, slots=True)
class TrustedKey:
    """A requester key this node accepts, bound to one principal.

    Attributes:
        principal: the requester principal id (``ana@melbourne``) the key speaks for.
        public_key: the validated Ed25519 public key.
    """

    principal: str
    public_key: PublicKey


@dataclass(frozen=True, slots=True)
class AllianceConfig:
    """The ``[alliance]`` table: roster trust and the node's own quorum minimum.

    Attributes:
        roster_file: the current roster file (absolute), or None for a
            roster-less node (the ``[[trusted]]`` keys are then the authority).
        pin: SHA-256 of the body of the first roster this node trusts
            (required with ``roster_file``).
        min_participants: the fewest cities a request may target, and the
            smallest quorum it may ask for (spec §8.2); 1 accepts any request.
    """

    roster_file: Path | None = None
    pin: bytes | None = None
    min_participants: int = 1

    def __post_init__(self) -> None:
        if (self.roster_file is None) != (self.pin is None):
            raise ConfigError("[alliance] roster and pin must be given together")
        if self.pin is not None and len(self.pin) != 32:
            raise ConfigError("[alliance] pin must be a SHA-256 digest (64 hex digits)")
        _check_int("alliance", "min_participants", self.min_participants, 1, MAX_MIN_PARTICIPANTS)

    @property
    def has_roster(self) -> bool:
        """Whether the alliance roster (not ``[[trusted]]``) is the authority."""
        return self.roster_file is not None


@dataclass(frozen=True, slots=True)
class AuditConfig:
    """The ``[audit]`` table: the tamper-evident log (spec §16).

    Attributes:
        log_key_file: the log's checkpoint-signing key (relative paths are
            resolved against the data directory by :meth:`NodeConfig.path`).
        witness_key_file: the witness cosigning key, or None when this city
            does not witness other cities' logs.
        origin: the log's checkpoint origin; empty means ``hansa/<alliance>/<city>``
            (``hansa/local/<city>`` without a roster). It must never change once
            the log holds entries.
        checkpoint_seconds: sign a checkpoint at least this often (seconds)
            while the log grows.
        checkpoint_entries: and after at most this many new entries.
        durable: fsync every append before replying. Only benchmarks turn it off.
    """

    log_key_file: Path = Path(LOG_KEY_FILE)
    witness_key_file: Path | None = None
    origin: str = ""
    checkpoint_seconds: float = 10.0
    checkpoint_entries: int = 1000
    durable: bool = True

    def __post_init__(self) -> None:
        _check_float("audit", "checkpoint_seconds", self.checkpoint_seconds, 0.01, 86_400.0)
        _check_int("audit", "checkpoint_entries", self.checkpoint_entries, 1, 100_000_000)
        if self.origin and not _ORIGIN_RE.fullmatch(self.origin):
            raise ConfigError(
                f"[audit] origin must be printable with no spaces or '+', got {self.origin!r}"
            )


_ORIGIN_RE: Final = re.compile(r"[!-*,-~]{1,200}")


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """A node's whole configuration.

    Attributes:
        data_dir: the node's data directory (absolute).
        city: this node's city id (requests must list it among their targets).
        host: address to listen on.
        port: TCP port to listen on (0 = any free port, printed at start-up).
        key_file: path of the node's signing key file (absolute).
        key_passphrase_env: name of the environment variable holding the key
            file's passphrase, or ``None`` for an unencrypted key file.
        access_log: whether to write one log line per HTTP request.
        limits: resource limits.
        trusted: requester keys allowed to query this node when no alliance
            roster is configured (ignored when one is).
        alliance: roster trust and the node's minimum of participating cities.
        audit: the audit log's keys, origin and checkpoint policy.
    """

    data_dir: Path
    city: str
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    key_file: Path = Path(KEY_FILE)
    key_passphrase_env: str | None = None
    access_log: bool = False
    limits: NodeLimits = field(default_factory=NodeLimits)
    trusted: tuple[TrustedKey, ...] = ()
    alliance: AllianceConfig = field(default_factory=AllianceConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)

    def __post_init__(self) -> None:
        if not _CITY_RE.fullmatch(self.city):
            raise ConfigError(
                f"[node] city must be a lower-case id like 'melbourne' or 'cape-town', "
                f"got {self.city!r}"
            )
        if not _HOST_RE.fullmatch(self.host):
            raise ConfigError(f"[node] host must be a host name or IP address, got {self.host!r}")
        _check_int("node", "port", self.port, 0, 65535)
        if self.key_passphrase_env is not None and not _ENV_VAR_RE.fullmatch(
            self.key_passphrase_env
        ):
            raise ConfigError(
                f"[node] key_passphrase_env must be an environment variable name, "
                f"got {self.key_passphrase_env!r}"
            )
        seen: dict[bytes, str] = {}
        for t in self.trusted:
            other = seen.get(t.public_key.raw)
            if other is not None:
                raise ConfigError(
                    f"[[trusted]] key {t.public_key.raw.hex()} is listed for both "
                    f"{other!r} and {t.principal!r}; a key speaks for one principal"
                )
            seen[t.public_key.raw] = t.principal

    def path(self, name: Path) -> Path:
        """Return ``name`` resolved against the data directory (absolute paths stay)."""
        return name if name.is_absolute() else self.data_dir / name

    def log_origin(self, alliance: str | None) -> str:
        """Return the audit log's checkpoint origin (spec §16.1).

        Args:
            alliance: the trusted roster's alliance name, or None without a roster.

        Returns:
            ``[audit] origin`` when set, else ``hansa/<alliance>/<city>`` with the
            alliance name's white space and ``+`` replaced by ``-``.
        """
        if self.audit.origin:
            return self.audit.origin
        return default_log_origin(alliance, self.city)

    def key_lookup(self) -> dict[bytes, PublicKey]:
        """Return the trusted requester keys by key id (for ``open_envelope``)."""
        return {t.public_key.key_id: t.public_key for t in self.trusted}

    def principals(self) -> dict[bytes, str]:
        """Return the principal each trusted key id speaks for."""
        return {t.public_key.key_id: t.principal for t in self.trusted}

    def passphrase(self) -> bytes | None:
        """Return the key file passphrase from the environment, if one is configured.

        Raises:
            ConfigError: the configured environment variable is not set.
        """
        if self.key_passphrase_env is None:
            return None
        value = os.environ.get(self.key_passphrase_env)
        if value is None:
            raise ConfigError(
                f"the key file passphrase variable {self.key_passphrase_env} is not set"
            )
        return value.encode()


# --- loading -----------------------------------------------------------------------


def config_path(data_dir: Path) -> Path:
    """Return the path of ``node.toml`` inside ``data_dir``."""
    return data_dir / CONFIG_FILE


def load_config(data_dir: Path) -> NodeConfig:
    """Read and validate ``<data_dir>/node.toml``.

    Args:
        data_dir: the node's data directory.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: the file is missing, not valid TOML, or any field is invalid;
            the message is one line and names the file.
    """
    path = config_path(data_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path} not found (run 'hansa node init' first)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    return parse_config(text, data_dir, source=str(path))


def parse_config(text: str, data_dir: Path, *, source: str = CONFIG_FILE) -> NodeConfig:
    """Parse and validate the text of a ``node.toml``.

    Args:
        text: the TOML document.
        data_dir: the data directory relative paths are resolved against.
        source: a name for error messages.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: invalid TOML, an unknown or mistyped key, or a value out of range.
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {_one_line(str(exc))}") from exc
    try:
        return _from_document(doc, data_dir.resolve())
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc.message}") from exc
    except HansaError as exc:  # e.g. an invalid public key in [[trusted]]
        raise ConfigError(f"{source}: {exc.message}") from exc


_TOP_KEYS: Final = frozenset({"node", "limits", "trusted", "alliance", "audit"})
_AUDIT_KEYS: Final = frozenset(
    {"log_key", "witness_key", "origin", "checkpoint_seconds", "checkpoint_entries", "durable"}
)
_ALLIANCE_KEYS: Final = frozenset({"roster", "pin", "min_participants"})
_NODE_KEYS: Final = frozenset(
    {"city", "host", "port", "key_file", "key_passphrase_env", "access_log"}
)
_LIMIT_FIELDS: Final[Mapping[str, type]] = {
    "max_request_bytes": int,
    "query_timeout_s": float,
    "memory_limit": str,
    "engine_threads": int,
    "max_concurrent_queries": int,
    "max_queued_queries": int,
    "shutdown_timeout_s": float,
    "max_skew_ms": int,
    "max_validity_ms": int,
    "replay_capacity": int,
    "max_connections": int,
}


def _from_document(doc: dict[str, Any], data_dir: Path) -> NodeConfig:
    _no_unknown("top level", doc, _TOP_KEYS)
    node = _table(doc, "node")
    _no_unknown("[node]", node, _NODE_KEYS)
    if "city" not in node:
        raise ConfigError("[node] city is required")
    city = _typed("node", "city", node["city"], str)
    host = _typed("node", "host", node.get("host", "127.0.0.1"), str)
    port = _typed("node", "port", node.get("port", DEFAULT_PORT), int)
    key_file_text = _typed("node", "key_file", node.get("key_file", KEY_FILE), str)
    if not key_file_text:
        raise ConfigError("[node] key_file must not be empty")
    passphrase_env = _typed("node", "key_passphrase_env", node.get("key_passphrase_env", ""), str)
    access_log = _typed("node", "access_log", node.get("access_log", False), bool)

    limits_table = _table(doc, "limits")
    _no_unknown("[limits]", limits_table, frozenset(_LIMIT_FIELDS))
    limit_values: dict[str, Any] = {}
    for name, kind in _LIMIT_FIELDS.items():
        if name in limits_table:
            limit_values[name] = _typed("limits", name, limits_table[name], kind)
    limits = NodeLimits(**limit_values)

    raw_trusted = doc.get("trusted", [])
    if not isinstance(raw_trusted, list):
        raise ConfigError("[[trusted]] must be an array of tables")
    trusted = tuple(_trusted_key(i, entry) for i, entry in enumerate(raw_trusted))
    alliance = _alliance(_table(doc, "alliance"), data_dir)
    audit = _audit(_table(doc, "audit"), data_dir)

    key_file = Path(key_file_text)
    return NodeConfig(
        data_dir=data_dir,
        city=city,
        host=host,
        port=port,
        key_file=key_file if key_file.is_absolute() else data_dir / key_file,
        key_passphrase_env=passphrase_env or None,
        access_log=access_log,
        limits=limits,
        trusted=trusted,
        alliance=alliance,
        audit=audit,
    )


def _audit(table: dict[str, Any], data_dir: Path) -> AuditConfig:
    _no_unknown("[audit]", table, _AUDIT_KEYS)
    log_key = _typed("audit", "log_key", table.get("log_key", LOG_KEY_FILE), str)
    if not log_key:
        raise ConfigError("[audit] log_key must not be empty")
    witness_key = _typed("audit", "witness_key", table.get("witness_key", ""), str)
    defaults = AuditConfig()
    seconds = table.get("checkpoint_seconds", defaults.checkpoint_seconds)
    return AuditConfig(
        log_key_file=data_dir / log_key,
        witness_key_file=data_dir / witness_key if witness_key else None,
        origin=_typed("audit", "origin", table.get("origin", ""), str),
        checkpoint_seconds=_typed("audit", "checkpoint_seconds", seconds, float),
        checkpoint_entries=_typed(
            "audit",
            "checkpoint_entries",
            table.get("checkpoint_entries", defaults.checkpoint_entries),
            int,
        ),
        durable=_typed("audit", "durable", table.get("durable", True), bool),
    )


def _alliance(table: dict[str, Any], data_dir: Path) -> AllianceConfig:
    _no_unknown("[alliance]", table, _ALLIANCE_KEYS)
    min_participants = _typed("alliance", "min_participants", table.get("min_participants", 1), int)
    roster_text = _typed("alliance", "roster", table.get("roster", ""), str)
    pin_text = _typed("alliance", "pin", table.get("pin", ""), str)
    if not roster_text and not pin_text:
        return AllianceConfig(min_participants=min_participants)
    if not roster_text or not pin_text:
        raise ConfigError("[alliance] roster and pin must be given together")
    pin = parse_pin(pin_text, "[alliance] pin")
    roster = Path(roster_text)
    return AllianceConfig(
        roster_file=roster if roster.is_absolute() else data_dir / roster,
        pin=pin,
        min_participants=min_participants,
    )


def parse_pin(value: str, where: str = "pin") -> bytes:
    """Parse a SHA-256 roster pin given as 64 hex digits.

    Args:
        value: the text.
        where: a name for the error message.

    Returns:
        The 32-byte digest.

    Raises:
        ConfigError: not 64 hex digits.
    """
    if not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        raise ConfigError(f"{where} must be a SHA-256 digest, 64 hex digits")
    return bytes.fromhex(value)


def _trusted_key(index: int, entry: object) -> TrustedKey:
    where = f"[[trusted]] entry {index + 1}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} must be a table")
    _no_unknown(where, entry, frozenset({"principal", "key"}))
    if "principal" not in entry or "key" not in entry:
        raise ConfigError(f"{where} needs both 'principal' and 'key'")
    principal = _typed("trusted", "principal", entry["principal"], str)
    if not _PRINCIPAL_RE.fullmatch(principal):
        raise ConfigError(
            f"{where}: principal must look like 'ana@melbourne' (lower-case), got {principal!r}"
        )
    return TrustedKey(principal=principal, public_key=parse_public_key_hex(entry["key"], where))


def parse_public_key_hex(value: object, where: str = "key") -> PublicKey:
    """Parse a 64-hex-digit Ed25519 public key.

    Args:
        value: the configured value.
        where: a name for the error message.

    Returns:
        The validated key.

    Raises:
        ConfigError: not 64 hex digits, or not a valid Ed25519 public key.
    """
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        raise ConfigError(f"{where}: key must be 64 hex digits (an Ed25519 public key)")
    try:
        return PublicKey(bytes.fromhex(value))
    except HansaError as exc:
        raise ConfigError(f"{where}: {exc.message}") from exc


def _table(doc: dict[str, Any], name: str) -> dict[str, Any]:
    value = doc.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{name}] must be a table")
    return value


def _no_unknown(where: str, table: Mapping[str, object], allowed: frozenset[str]) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})"
        )


def _typed(section: str, name: str, value: object, kind: type[_T]) -> _T:
    # TOML integers are acceptable where a float is expected; booleans are
    # never numbers (bool is a subclass of int in Python).
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"[{section}] {name} must be a {kind.__name__}, got a boolean")
    if not isinstance(value, kind):
        raise ConfigError(
            f"[{section}] {name} must be a {kind.__name__}, got {type(value).__name__}"
        )
    return value


def _check_int(section: str, name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"[{section}] {name} must be an integer in {low}..{high}, got {value!r}")


def _check_float(section: str, name: str, value: object, low: float, high: float) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not low <= float(value) <= high
    ):
        raise ConfigError(f"[{section}] {name} must be a number in {low}..{high}, got {value!r}")


def _one_line(text: str) -> str:
    return " ".join(text.split())[:MAX_TEXT]


# --- writing -----------------------------------------------------------------------


def render_config(
    *,
    city: str,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    key_file: str = KEY_FILE,
    key_passphrase_env: str | None = None,
    limits: NodeLimits | None = None,
    roster_file: str | None = None,
    pin: bytes | None = None,
    min_participants: int = 1,
    witness: bool = False,
    audit: AuditConfig | None = None,
) -> str:
    """Return a complete, commented ``node.toml``.

    Every field is written with its value, unit and meaning, so the file is
    its own documentation. The values are validated first.

    Args:
        city: the city id.
        host: listen address.
        port: listen port.
        key_file: key file path, relative to the data directory.
        key_passphrase_env: environment variable with the key passphrase, if any.
        limits: resource limits (defaults when ``None``).
        roster_file: the alliance roster file, relative to the data directory
            (None: roster-less, ``[[trusted]]`` is the authority).
        pin: SHA-256 of the first trusted roster's body (with ``roster_file``).
        min_participants: the node's minimum of participating cities.
        witness: the city witnesses other cities' logs (writes ``witness_key``).
        audit: the audit-log settings (defaults when ``None``; key paths are
            written relative to the data directory as given).

    Returns:
        The TOML text.

    Raises:
        ConfigError: a value is invalid.
    """
    lim = limits or NodeLimits()
    aud = audit or AuditConfig()
    # Validate through the dataclass so init can never write a file load rejects.
    NodeConfig(
        data_dir=Path("."),
        city=city,
        host=host,
        port=port,
        key_passphrase_env=key_passphrase_env,
        limits=lim,
        alliance=AllianceConfig(
            roster_file=None if roster_file is None else Path(roster_file),
            pin=pin,
            min_participants=min_participants,
        ),
        audit=aud,
    )
    q = _toml_str
    witness_key = WITNESS_KEY_FILE if witness else ""
    if aud.witness_key_file is not None:
        witness_key = str(aud.witness_key_file)
    if roster_file is not None and pin is not None:
        roster_lines = f"roster = {q(roster_file)}\npin = {q(pin.hex())}"
    else:
        roster_lines = f'# roster = "{ROSTER_FILE}"\n# pin = "<64 hex digits>"'
    return f"""\
# Hansa node configuration (node.toml), read once when `hansa node serve` starts.
# Every limit is explicit; units are in the comments. Unknown keys are an error.

[node]
# This node's city id: lower-case letters, digits, '.' and '-'. Requests must be
# addressed to it (listed in their `targets`), and it names the node in every signed answer.
city = {q(city)}
# Address to listen on. Keep 127.0.0.1 unless a reverse proxy or firewall
# fronts the node.
host = {q(host)}
# TCP port to listen on; 0 picks a free port and prints it at start-up.
port = {port}
# The node's Ed25519 signing key, relative to this directory (written 0600).
key_file = {q(key_file)}
# Name of an environment variable holding the key file's passphrase; "" means the
# key file is not encrypted (the default for unattended servers: protect it with
# file permissions instead).
key_passphrase_env = {q(key_passphrase_env or "")}
# Log one line per HTTP request (off by default: it costs throughput).
access_log = false

[limits]
# Largest POST /v1/query body accepted, in bytes (1 KiB .. 4 MiB). Larger bodies
# get HTTP 413 TOO_LARGE before any parsing.
max_request_bytes = {lim.max_request_bytes}
# Wall-clock limit for one query in the engine, in seconds. Exceeding it gives a
# signed QUERY_TIMEOUT refusal.
query_timeout_s = {lim.query_timeout_s!r}
# DuckDB memory limit for query execution: a number and a unit (MB, GB, ...).
memory_limit = {q(lim.memory_limit)}
# DuckDB worker threads per query.
engine_threads = {lim.engine_threads}
# Queries executed at the same time (size of the query thread pool).
max_concurrent_queries = {lim.max_concurrent_queries}
# Queries allowed to wait for a free slot; beyond this the node answers with a
# signed UNAVAILABLE refusal instead of queueing more work.
max_queued_queries = {lim.max_queued_queries}
# On SIGTERM/SIGINT: seconds in-flight requests may take to finish before cancelling.
shutdown_timeout_s = {lim.shutdown_timeout_s!r}
# Freshness (spec §8): tolerated clock skew for a future-dated issued_at, in ms.
max_skew_ms = {lim.max_skew_ms}
# Largest accepted expires_at - issued_at of a request, in ms.
max_validity_ms = {lim.max_validity_ms}
# Most unexpired requests the replay cache remembers (entries). When it is full
# of unexpired entries the node refuses with REPLAY_CACHE_FULL rather than forget.
replay_capacity = {lim.replay_capacity}
# Most client connections open at once (each holds a file descriptor; keep it below
# the process's open-file limit). One more is answered 503 and closed unread.
max_connections = {lim.max_connections}

[alliance]
# The alliance roster (spec §15.1), relative to this directory, and the SHA-256 (64 hex
# digits) of the body of the first roster this node trusts, given out of band. When set,
# the roster is the authority on who may query this node and the [[trusted]] list below
# is ignored; newer rosters are taken up at run time (POST /v1/roster, SIGHUP, or
# `hansa node roster install`). Leave both unset for a roster-less node.
{roster_lines}
# The fewest participating cities this node accepts: a request must list at least this
# many targets and ask for at least this quorum, else QUORUM_TOO_SMALL (1 = any).
min_participants = {min_participants}

[audit]
# The tamper-evident audit log (spec §16), kept in audit.sqlite in this directory. Every
# verified request, decision and reply is appended (fsynced) before the node replies.
# The key that signs the log's checkpoints, relative to this directory (written 0600).
log_key = {q(str(aud.log_key_file))}
# The key this city cosigns other cities' checkpoints with when it is a witness
# (`hansa node init --witness`); "" means this city does not witness.
witness_key = {q(witness_key)}
# The log's checkpoint origin; "" means hansa/<alliance>/<city>. Never change it once
# the log holds entries (the store is bound to its origin).
origin = {q(aud.origin)}
# Sign a checkpoint at least every this many seconds while the log grows...
checkpoint_seconds = {aud.checkpoint_seconds!r}
# ...and after at most this many new entries.
checkpoint_entries = {aud.checkpoint_entries}
# fsync every append before the reply is sent. Turn off only for benchmarks: a crash
# could then lose entries the node had acted on.
durable = {"true" if aud.durable else "false"}

# Requester keys allowed to query this node, one [[trusted]] table each. Without an
# alliance roster (roster-less, single-node use) this list is the authority.
# `principal` is the requester id the key speaks for (a request signed by the key must
# name it); `key` is the Ed25519 public key as 64 hex digits. Add entries with `hansa node trust`.
#
# [[trusted]]
# principal = "ana@melbourne"
# key = "<64 hex digits>"
"""


def add_trusted_key(data_dir: Path, principal: str, public_key_hex: str) -> NodeConfig:
    """Append a ``[[trusted]]`` entry to ``node.toml``, keeping the rest of the file.

    The new file is validated before it replaces the old one (atomically), so a
    bad entry never leaves a broken configuration behind.

    Args:
        data_dir: the node's data directory.
        principal: the requester principal id the key speaks for.
        public_key_hex: the requester's Ed25519 public key, 64 hex digits.

    Returns:
        The configuration after the change.

    Raises:
        ConfigError: the file is invalid, the entry is invalid, or the key is
            already trusted (for this or another principal).
    """
    current = load_config(data_dir)
    key = parse_public_key_hex(public_key_hex, "--key")
    for t in current.trusted:
        if t.public_key == key:
            raise ConfigError(f"key {key.raw.hex()} is already trusted for {t.principal!r}")
    path = config_path(data_dir)
    text = path.read_text(encoding="utf-8")
    if not text.endswith("\n"):
        text += "\n"
    text += f"\n[[trusted]]\nprincipal = {_toml_str(principal)}\nkey = {_toml_str(key.raw.hex())}\n"
    updated = parse_config(text, data_dir, source=str(path))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return updated


def _toml_str(value: str) -> str:
    # A TOML basic string; the values written here are validated ids, paths and
    # sizes, but escape anyway so the file always parses.
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    escaped = "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in escaped)
    return f'"{escaped}"'


# --- the alliance roster store -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TrustedRoster:
    """The roster a node trusts: exact file bytes, decoded roster and digest.

    Attributes:
        data: the exact signed-roster bytes (what ``GET /v1/roster`` returns).
        signed: the decoded signed roster.
        roster: the verified roster body.
    """

    data: bytes
    signed: SignedRoster
    roster: Roster

    @property
    def version(self) -> int:
        """The roster's version."""
        return self.roster.version

    @property
    def digest(self) -> bytes:
        """SHA-256 of the roster body (spec §15.1)."""
        return roster_digest(self.signed)


# Expiry is judged per request (a node with an expired roster refuses with
# EXPIRED, it does not fail to start), so the stored chain is verified at a
# time before every possible expiry.
_BEFORE_ANY_EXPIRY_MS: Final = -1


def _history_dir(data_dir: Path) -> Path:
    return data_dir / ROSTER_HISTORY_DIR


def _read_roster_file(path: Path) -> tuple[bytes, SignedRoster]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read roster {path}: {exc.strerror or exc}") from exc
    try:
        return data, decode_signed_roster(data)
    except HansaError as exc:
        raise ConfigError(f"{path} is not a signed roster: {exc.message}") from exc


def load_roster_store(data_dir: Path, alliance: AllianceConfig) -> TrustedRoster | None:
    """Load and verify the node's current roster, walking the chain from the pin.

    The pinned first roster is ``roster.bin`` itself or one of the versions
    kept in ``rosters/``; every version after it up to the current one must
    be there, and the chain must verify step by step (spec §15.1). Expiry is
    not checked here (see the module docstring).

    Args:
        data_dir: the node's data directory.
        alliance: the ``[alliance]`` configuration.

    Returns:
        The trusted roster, or None when no roster is configured.

    Raises:
        ConfigError: a file is missing or unreadable, no stored version
            matches the pin, or the chain does not verify.
    """
    if alliance.roster_file is None or alliance.pin is None:
        return None
    pin = alliance.pin
    data, current = _read_roster_file(alliance.roster_file)
    chain: list[SignedRoster]
    if roster_digest(current) == pin:
        chain = [current]
    else:
        by_version: dict[int, SignedRoster] = {}
        history = _history_dir(data_dir)
        paths = sorted(history.glob("*.bin")) if history.is_dir() else []
        for path in paths:
            _, signed = _read_roster_file(path)
            try:
                by_version[_decode_version(signed)] = signed
            except HansaError as exc:
                raise ConfigError(f"{path}: {exc.message}") from exc
        first = next((v for v, s in by_version.items() if roster_digest(s) == pin), None)
        if first is None:
            raise ConfigError(
                f"neither {alliance.roster_file} nor any roster in {history} matches the "
                f"pinned SHA-256 {pin.hex()}"
            )
        try:
            last = _decode_version(current)
        except HansaError as exc:
            raise ConfigError(f"{alliance.roster_file}: {exc.message}") from exc
        chain = []
        for version in range(first, last):
            step = by_version.get(version)
            if step is None:
                raise ConfigError(f"roster version {version} is missing from {history}")
            chain.append(step)
        chain.append(current)
    try:
        roster = update_chain(None, chain, _BEFORE_ANY_EXPIRY_MS, pin=pin)
    except HansaError as exc:
        raise ConfigError(f"{alliance.roster_file}: {exc.message}") from exc
    return TrustedRoster(data=data, signed=current, roster=roster)


def _decode_version(signed: SignedRoster) -> int:
    return decode_roster(signed.body).version


def install_roster(
    data_dir: Path, alliance: AllianceConfig, data: bytes, current: TrustedRoster, now_ms: int
) -> TrustedRoster:
    """Verify ``data`` as the successor of ``current`` and persist it.

    TUF's rules (spec §15.1): same alliance, version exactly one more,
    thresholds of the current and of its own root keys, not expired. The new
    roster is written to ``rosters/<version>.bin`` and then replaces the
    current roster file, each atomically.

    Args:
        data_dir: the node's data directory.
        alliance: the ``[alliance]`` configuration (must name a roster file).
        data: the candidate signed-roster bytes.
        current: the roster trusted now.
        now_ms: the current time, milliseconds since the epoch.

    Returns:
        The newly trusted roster.

    Raises:
        ProtocolError: the bytes are not a valid signed roster.
        SignatureError: a threshold is not met, or another alliance
            (``BAD_SIGNATURE`` / ``ROSTER_MISMATCH``).
        FreshnessError: rollback or skipped version (``ROSTER_MISMATCH``),
            expired (``EXPIRED``).
        ConfigError: no roster is configured, or the files cannot be written.
    """
    if alliance.roster_file is None:
        raise ConfigError("this node has no [alliance] roster configured")
    signed = decode_signed_roster(data)
    roster = verify_roster(signed, current.roster, now_ms)
    # The exact bytes that verified are kept (and served by GET /v1/roster).
    _write_roster(data_dir, alliance.roster_file, roster.version, data)
    return TrustedRoster(data=data, signed=signed, roster=roster)


def _write_roster(data_dir: Path, roster_file: Path, version: int, data: bytes) -> None:
    history = _history_dir(data_dir)
    try:
        history.mkdir(mode=0o700, exist_ok=True)
        _atomic_write(history / f"{version:010d}.bin", data)
        _atomic_write(roster_file, data)
    except OSError as exc:
        raise ConfigError(f"cannot write roster {roster_file}: {exc.strerror or exc}") from exc


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temporary file, fsync, rename, fsync dir."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def check_first_roster(data: bytes, pin: bytes, city: str, now_ms: int) -> Roster:
    """Verify a node's first roster: pinned, own threshold, unexpired, names ``city``.

    Args:
        data: the signed roster bytes.
        pin: SHA-256 of its body, obtained out of band.
        city: this node's city id.
        now_ms: the current time, milliseconds since the epoch.

    Returns:
        The verified roster.

    Raises:
        ConfigError: any of these checks fails (the message says which).
    """
    try:
        roster = verify_roster(decode_signed_roster(data), None, now_ms, pin=pin)
    except HansaError as exc:
        raise ConfigError(f"roster refused: {exc.message}") from exc
    if roster.member(city) is None:
        raise ConfigError(
            f"city {city!r} is not a member of alliance {roster.alliance!r} "
            f"(roster version {roster.version})"
        )
    return roster


def configure_alliance(
    data_dir: Path,
    data: bytes,
    pin: bytes,
    now_ms: int,
    *,
    min_participants: int | None = None,
) -> NodeConfig:
    """Make a roster-less node trust an alliance roster (``hansa node init --roster``).

    The roster must match ``pin``, carry its own threshold of signatures, not
    be expired and name this node's city as a member. It is copied to
    ``roster.bin`` (and ``rosters/``), and ``node.toml`` gains the
    ``roster``/``pin`` settings (validated before it replaces the file).

    Args:
        data_dir: the node's data directory (holding a ``node.toml``).
        data: the first roster's signed bytes.
        pin: SHA-256 of its body, obtained out of band.
        now_ms: the current time, milliseconds since the epoch.
        min_participants: also set the node's minimum of participating cities.

    Returns:
        The configuration after the change.

    Raises:
        ConfigError: a roster is already configured, the roster is invalid,
            does not match the pin, is expired or does not name this city.
    """
    current = load_config(data_dir)
    if current.alliance.has_roster:
        raise ConfigError(
            f"{config_path(data_dir)} already names a roster; "
            "use 'hansa node roster install' to update it"
        )
    roster = check_first_roster(data, pin, current.city, now_ms)
    path = config_path(data_dir)
    text = path.read_text(encoding="utf-8")
    settings = f"roster = {_toml_str(ROSTER_FILE)}\npin = {_toml_str(pin.hex())}\n"
    placeholder = f'# roster = "{ROSTER_FILE}"\n# pin = "<64 hex digits>"\n'
    if placeholder in text:
        text = text.replace(placeholder, settings, 1)
    elif re.search(r"(?m)^\[alliance\]\s*$", text):
        text = re.sub(
            r"(?m)^\[alliance\]\s*$", "[alliance]\n" + settings.rstrip("\n"), text, count=1
        )
    else:
        text = text.rstrip("\n") + "\n\n[alliance]\n" + settings
    if min_participants is not None:
        line = f"min_participants = {min_participants}"
        text, count = re.subn(r"(?m)^min_participants\s*=.*$", line, text, count=1)
        if count == 0:
            text = text.replace(settings, settings + line + "\n", 1)
    updated = parse_config(text, data_dir, source=str(path))
    if updated.alliance.roster_file is None:  # pragma: no cover — the edit above sets it
        raise ConfigError(f"{path}: could not add the roster settings", ErrorCode.INTERNAL)
    _write_roster(data_dir, updated.alliance.roster_file, roster.version, data)
    _atomic_write(path, text.encode("utf-8"))
    return updated


def retired_key_files(key_file: Path) -> list[Path]:
    """The files of the keys ``key_file`` replaced, oldest first.

    ``hansa node rotate-key`` keeps each under ``retired/`` beside the key file, named
    ``<stem>-<UTC time>-<key id prefix>.key``.

    Args:
        key_file: the key file in use.

    Returns:
        The retired key files (none when there is no ``retired/`` directory).
    """
    return sorted((key_file.parent / RETIRED_DIR).glob(f"{key_file.stem}-*.key"))
