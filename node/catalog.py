"""The dataset catalog: what a city publishes, stored in DuckDB and described in TOML.

Theory of operation
-------------------
A node's data directory holds two files (``spec/protocol.md`` §6.1, §8):

``datasets.duckdb``
    One DuckDB table per dataset, named exactly like the dataset, plus the
    catalog's own bookkeeping table ``_hansa_meta`` (a leading underscore can
    never clash with a dataset name, which must start with a letter). The
    meta row of a dataset holds its data version, row count and source and is
    written *in the same transaction* as the data, so the version an answer
    cites always describes the rows it was computed from.

``datasets.toml``
    The human-editable description: per dataset its columns (logical
    :class:`~hansa.protocol.messages.ColumnType` and
    :class:`~hansa.protocol.messages.ColumnRole`, optionally the aggregates
    offered) and its disclosure settings. Hansa writes it with comments; an
    operator may edit roles, aggregates and disclosure settings and then
    :meth:`Catalog.reload`. Column names and types must keep matching the
    stored data; anything unknown or inconsistent is a :class:`ConfigError`
    (fail closed: a typo never silently falls back to a default).

Loading a file (:meth:`Catalog.add`) is atomic. Inside one DuckDB
transaction the file is read into a staging table — with every column cast
to one of six storage types (BIGINT, DOUBLE, VARCHAR, BOOLEAN, DATE,
TIMESTAMP) — and then swapped in (``create``/``replace``) or inserted
(``append``) and the meta row is bumped. Any failure rolls the whole
transaction back, leaving the previous data and version untouched. Only then
is ``datasets.toml`` rewritten (atomically, via a temporary file).

Versions
--------
*Data version* — ``"v<counter>-<12 hex>"``. ``counter`` counts the loads of
the dataset (1 for the first ``create``, +1 per ``replace``/``append``); the
hex is a prefix of a SHA-256 hash chain over the mode, the stored schema and
the SHA-256 of every file loaded (an append chains onto the previous hash).
Loading the same file into a fresh dataset gives the same version.

*Disclosure version* — an integer in ``datasets.toml`` next to a
``fingerprint`` (SHA-256 of the canonical published settings: roles, offered
aggregates, k, p, group cap, purposes). Whenever the fingerprint no longer
matches the settings — an operator edit or :meth:`Catalog.configure` — the
catalog bumps the version and rewrites those two lines, keeping the
operator's other lines and comments.

Concurrency: DuckDB lets one process write a database file, or many
processes read it. The node's query engine opens the catalog read-only, so
``hansa dataset list``/``show`` work while a node serves, but ``add`` and
``remove`` need the node stopped (they fail with a clear ConfigError).
"""

from __future__ import annotations

import builtins
import contextlib
import datetime as dt
import enum
import hashlib
import json
import os
import re
import tempfile
import threading
import tomllib
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal

import duckdb

from hansa.protocol.errors import ConfigError, ErrorCode, HansaError, QueryError
from hansa.protocol.messages import (
    IDENTIFIER_PATTERN,
    MAX_COLUMNS,
    MAX_GROUPS,
    TOKEN_PATTERN,
    ColumnInfo,
    ColumnRole,
    ColumnType,
    DatasetInfo,
    DisclosureProfile,
)

__all__ = [
    "DB_FILE",
    "DEFAULT_PURPOSES",
    "ROLE_AGGREGATES",
    "ROLE_TYPES",
    "TOML_FILE",
    "AggregateKind",
    "Catalog",
    "DatasetSpec",
    "DisclosureSettings",
    "LoadMode",
    "infer_role",
    "quote_identifier",
    "sanitize_column_names",
]

DB_FILE: Final = "datasets.duckdb"
TOML_FILE: Final = "datasets.toml"
META_TABLE: Final = "_hansa_meta"
_STAGING: Final = "_hansa_staging"
_FORMAT: Final = 1

_NAME_RE: Final = re.compile(IDENTIFIER_PATTERN)
_TOKEN_RE: Final = re.compile(TOKEN_PATTERN)
# Default-role heuristics (fail closed): an "id"/"key"/"uuid" token marks an
# identifier; obvious personal-data names are hidden until the operator says otherwise.
_IDENTIFIER_RE: Final = re.compile(r"(?:^|_)(?:id|uuid|key)(?:$|_)", re.IGNORECASE)
_PERSONAL_RE: Final = re.compile(
    r"(?:^|_)(?:name|email|e_mail|phone|address|licen[cs]e|ssn|passport)(?:$|_)", re.IGNORECASE
)

LoadMode = Literal["create", "replace", "append"]

DEFAULT_PURPOSES: Final[tuple[str, ...]] = ("planning", "research", "statistics")
"""Purposes a freshly added dataset accepts (operator-editable in datasets.toml)."""
DEFAULT_MIN_GROUP_SIZE: Final = 5
DEFAULT_DOMINANCE_P: Final = 80.0
DEFAULT_MAX_GROUPS: Final = 1000


class AggregateKind(enum.StrEnum):
    """Aggregate names as published in a disclosure profile (the query's wire tags)."""

    COUNT = "count"
    SUM = "sum"
    MEAN = "mean"
    MIN = "min"
    MAX = "max"
    VARIANCE = "variance"
    STDDEV = "stddev"
    HISTOGRAM = "histogram"
    QUANTILES = "quantiles"


ROLE_AGGREGATES: Final[Mapping[ColumnRole, frozenset[AggregateKind]]] = {
    ColumnRole.MEASURE: frozenset(AggregateKind),
    # Counting non-null values of a dimension, time or identifier column
    # releases no value; anything else on them would (spec §6.1).
    ColumnRole.DIMENSION: frozenset({AggregateKind.COUNT}),
    ColumnRole.TIME: frozenset({AggregateKind.COUNT}),
    ColumnRole.IDENTIFIER: frozenset({AggregateKind.COUNT}),
    ColumnRole.HIDDEN: frozenset(),
}
"""The aggregates a role can ever offer; a column's offer is a subset."""

ROLE_TYPES: Final[Mapping[ColumnRole, frozenset[ColumnType]]] = {
    ColumnRole.MEASURE: frozenset({ColumnType.INTEGER, ColumnType.FLOAT}),
    ColumnRole.TIME: frozenset({ColumnType.DATE, ColumnType.TIMESTAMP}),
    ColumnRole.DIMENSION: frozenset(ColumnType),
    ColumnRole.IDENTIFIER: frozenset(ColumnType),
    ColumnRole.HIDDEN: frozenset(ColumnType),
}
"""The logical types each role accepts."""

_STORAGE: Final[Mapping[ColumnType, str]] = {
    ColumnType.INTEGER: "BIGINT",
    ColumnType.FLOAT: "DOUBLE",
    ColumnType.TEXT: "VARCHAR",
    ColumnType.BOOLEAN: "BOOLEAN",
    ColumnType.DATE: "DATE",
    ColumnType.TIMESTAMP: "TIMESTAMP",
}
_FROM_STORAGE: Final[Mapping[str, ColumnType]] = {v: k for k, v in _STORAGE.items()}
_INTEGER_TYPES: Final = frozenset(
    {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT"}
    | {"HUGEINT", "UHUGEINT"}
)
_FLOAT_TYPES: Final = frozenset({"FLOAT", "DOUBLE", "REAL"})
_TIMESTAMP_TYPES: Final = frozenset(
    {"TIMESTAMP", "TIMESTAMP_S", "TIMESTAMP_MS", "TIMESTAMP_NS", "DATETIME"}
)


def quote_identifier(name: str) -> str:
    """Quote a SQL identifier for DuckDB (double quotes, embedded quotes doubled).

    Args:
        name: an identifier; for datasets and columns it has already matched
            the wire ``Identifier`` pattern, so quoting is belt and braces.

    Returns:
        The quoted identifier.
    """
    return '"' + name.replace('"', '""') + '"'


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def sanitize_column_names(raw: Sequence[str]) -> tuple[str, ...]:
    """Turn file headers into unique wire identifiers (``^[A-Za-z][A-Za-z0-9_]{0,62}$``).

    Lower-cases, folds accents, replaces runs of other characters with ``_``,
    prefixes ``c_`` when the result does not start with a letter, truncates
    to 63 characters and de-duplicates with ``_2``, ``_3``, … (DuckDB column
    names are case-insensitive, so lower-casing also avoids collisions).

    Args:
        raw: the column names as read from the file.

    Returns:
        One identifier per input name, in order.
    """
    taken: set[str] = set()
    out: list[str] = []
    for name in raw:
        ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
        base = re.sub(r"[^a-z0-9]+", "_", ascii_name.lower()).strip("_")
        if not base or not base[0].isalpha():
            base = "c_" + base if base else "column"
        base = base[:63]
        candidate, n = base, 1
        while candidate in taken:
            n += 1
            suffix = f"_{n}"
            candidate = base[: 63 - len(suffix)] + suffix
        taken.add(candidate)
        out.append(candidate)
    return tuple(out)


def infer_role(name: str, ctype: ColumnType, *, supported: bool = True) -> ColumnRole:
    """Return the default role of a column (the operator overrides it with ``--role``).

    Rules, in order: a type Hansa cannot query (``supported=False``) and
    names that look like personal data (``name``, ``email``, ``phone``,
    ``address``, ``license``, …) are ``hidden``; names with an ``id``,
    ``uuid`` or ``key`` token (``id``, ``host_id``, ``id_card``) are
    ``identifier``; then text and booleans are ``dimension``, numbers
    ``measure``, dates and timestamps ``time``.

    Args:
        name: the (sanitised) column name.
        ctype: its logical type.
        supported: False when the source type had to be turned into text.

    Returns:
        The default role.
    """
    if not supported or _PERSONAL_RE.search(name):
        return ColumnRole.HIDDEN
    if _IDENTIFIER_RE.search(name):
        return ColumnRole.IDENTIFIER
    if ctype in (ColumnType.INTEGER, ColumnType.FLOAT):
        return ColumnRole.MEASURE
    if ctype in (ColumnType.DATE, ColumnType.TIMESTAMP):
        return ColumnRole.TIME
    return ColumnRole.DIMENSION


# --- settings and specs -------------------------------------------------------------


@dataclass(frozen=True)
class DisclosureSettings:
    """A dataset's first-level disclosure control settings (spec §8).

    Attributes:
        version: the disclosure version answers cite; bumped on every change.
        min_group_size: k — a cell with fewer rows is suppressed (``min_group_size``).
        dominance_p: p — a cell is suppressed when its largest contributor
            exceeds p % of the sum of absolute values of a Sum/Mean/Variance/
            Stddev column (``dominance``); 100 disables the rule.
        max_groups: the most cells (released plus suppressed) one answer may have.
        purposes: request purposes that are allowed (anything else is refused).
        aggregates: per column, the aggregates offered on it (hidden columns
            offer none and are omitted).
    """

    version: int = 1
    min_group_size: int = DEFAULT_MIN_GROUP_SIZE
    dominance_p: float = DEFAULT_DOMINANCE_P
    max_groups: int = DEFAULT_MAX_GROUPS
    purposes: tuple[str, ...] = DEFAULT_PURPOSES
    aggregates: tuple[tuple[str, frozenset[AggregateKind]], ...] = ()

    def allowed(self, column: str) -> frozenset[AggregateKind]:
        """Return the aggregates offered on ``column`` (empty for unknown or hidden columns).

        Args:
            column: a column name.

        Returns:
            The offered aggregate kinds.
        """
        for name, kinds in self.aggregates:
            if name == column:
                return kinds
        return frozenset()

    def profile(self) -> DisclosureProfile:
        """Return the published, wire form of these settings.

        Returns:
            The :class:`~hansa.protocol.messages.DisclosureProfile`.
        """
        return DisclosureProfile(
            version=self.version,
            min_group_size=self.min_group_size,
            dominance_p=float(self.dominance_p),
            max_groups=self.max_groups,
            purposes=tuple(sorted(self.purposes)),
            aggregates=tuple(
                (name, tuple(sorted(k.value for k in kinds))) for name, kinds in self.aggregates
            ),
        )


@dataclass(frozen=True)
class DatasetSpec:
    """One published dataset: schema, data version and disclosure settings.

    Attributes:
        name: the dataset name (also its DuckDB table name).
        version: the data version answers cite (module docstring, "Versions").
        columns: every column, including hidden ones, in storage order.
        disclosure: the disclosure settings.
        row_count: rows stored.
        source: the file the data was last loaded from (informational).
        loaded_at: when, as an ISO-8601 UTC timestamp.
    """

    name: str
    version: str
    columns: tuple[ColumnInfo, ...]
    disclosure: DisclosureSettings
    row_count: int
    source: str = ""
    loaded_at: str = ""
    _by_name: Mapping[str, ColumnInfo] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {c.name: c for c in self.columns})

    def column(self, name: str) -> ColumnInfo | None:
        """Return the column called ``name``, or None.

        Args:
            name: a column name.

        Returns:
            Its :class:`ColumnInfo`, or None when the dataset has no such column.
        """
        return self._by_name.get(name)

    def info(self) -> DatasetInfo:
        """Return the wire description published in the capability document.

        Hidden columns are not published at all.

        Returns:
            The :class:`~hansa.protocol.messages.DatasetInfo`.
        """
        return DatasetInfo(
            name=self.name,
            version=self.version,
            columns=tuple(c for c in self.columns if c.role is not ColumnRole.HIDDEN),
            disclosure=self.disclosure.profile(),
        )


def _fingerprint(columns: Sequence[ColumnInfo], settings: DisclosureSettings) -> str:
    """SHA-256 over everything a disclosure version stands for (roles included)."""
    doc = {
        "roles": [[c.name, c.role.value] for c in columns],
        "k": settings.min_group_size,
        "p": float(settings.dominance_p),
        "max_groups": settings.max_groups,
        "purposes": sorted(settings.purposes),
        "aggregates": [[n, sorted(k.value for k in ks)] for n, ks in settings.aggregates],
    }
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# --- the TOML document ----------------------------------------------------------------


@dataclass(frozen=True)
class _ColumnEntry:
    name: str
    type: ColumnType
    role: ColumnRole
    aggregates: frozenset[AggregateKind] | None  # None: the role's default


@dataclass(frozen=True)
class _DatasetEntry:
    name: str
    source: str
    version: int
    fingerprint: str
    min_group_size: int
    dominance_p: float
    max_groups: int
    purposes: tuple[str, ...]
    columns: tuple[_ColumnEntry, ...]

    def settings(self) -> DisclosureSettings:
        offered = []
        for c in self.columns:
            if c.role is ColumnRole.HIDDEN:
                continue
            kinds = ROLE_AGGREGATES[c.role] if c.aggregates is None else c.aggregates
            offered.append((c.name, kinds))
        return DisclosureSettings(
            version=self.version,
            min_group_size=self.min_group_size,
            dominance_p=self.dominance_p,
            max_groups=self.max_groups,
            purposes=self.purposes,
            aggregates=tuple(offered),
        )

    def infos(self) -> tuple[ColumnInfo, ...]:
        return tuple(ColumnInfo(name=c.name, type=c.type, role=c.role) for c in self.columns)

    def current_fingerprint(self) -> str:
        return _fingerprint(self.infos(), self.settings())


_HEADER = """\
# Hansa dataset catalog.
#
# Written by `hansa dataset add`. You may edit, per dataset, the column roles,
# the aggregates offered per column and the disclosure settings, then reload
# the node (or restart it). Column names and types must match the stored data:
# change those only by loading the data again (`hansa dataset add NAME PATH --replace`).
#
# Roles: dimension  - may be grouped by and filtered on
#        measure    - may be aggregated and filtered on (numeric columns)
#        time       - may be bucketed (hour/day/week/month/year, day_of_week,
#                     hour_of_day) and filtered on (date/timestamp columns)
#        identifier - never grouped, filtered or released; only counted
#        hidden     - never touched, not even published
# aggregates (optional, per column): a subset of what the role allows —
#   measure: count sum mean min max variance stddev histogram quantiles;
#   dimension, time, identifier: count; hidden: none. Omitted = all the role allows.
#
# Hansa bumps a dataset's disclosure `version` whenever its settings change
# (it compares them with `fingerprint`); answers cite that version.
"""


def _toml_str(text: str) -> str:
    # A JSON string with ASCII escapes is a valid TOML basic string.
    return json.dumps(text, ensure_ascii=True)


def _toml_list(items: Sequence[str]) -> str:
    return "[" + ", ".join(_toml_str(i) for i in items) + "]"


def _render_toml(entries: Sequence[_DatasetEntry], meta: Mapping[str, _Meta]) -> str:
    lines = [_HEADER, f"format = {_FORMAT}", ""]
    for e in entries:
        m = meta.get(e.name)
        lines.append(f"[datasets.{e.name}]")
        if m is not None:
            lines.append(
                f"# data {m.version} · {len(e.columns)} columns · {m.row_count} rows"
                f" · loaded {m.loaded_at} (managed by hansa; informational)"
            )
        lines.append(f"source = {_toml_str(e.source)}  # informational")
        lines.append("")
        lines.append(f"[datasets.{e.name}.disclosure]")
        lines.append(f"version = {e.version}  # bumped by hansa when the settings below change")
        lines.append(f"fingerprint = {_toml_str(e.fingerprint)}  # managed by hansa; do not edit")
        lines.append(
            f"min_group_size = {e.min_group_size}  # k: cells with fewer rows are suppressed"
        )
        lines.append(
            f"dominance_p = {float(e.dominance_p)!r}  # suppress a cell when one row is more than"
            " p% of a sum/mean (100 = off)"
        )
        lines.append(f"max_groups = {e.max_groups}  # most cells one answer may have")
        lines.append(
            f"purposes = {_toml_list(sorted(e.purposes))}  # allowed request purposes (lower-case)"
        )
        lines.append("")
        lines.append(f"[datasets.{e.name}.columns]")
        for c in e.columns:
            body = f"type = {_toml_str(c.type.value)}, role = {_toml_str(c.role.value)}"
            if c.aggregates is not None:
                body += f", aggregates = {_toml_list(sorted(k.value for k in c.aggregates))}"
            lines.append(f"{c.name} = {{ {body} }}")
        lines.append("")
    return "\n".join(lines)


def _fail(where: str, message: str) -> ConfigError:
    return ConfigError(f"{TOML_FILE}: {where}: {message}", ErrorCode.CONFIG)


def _expect_int(value: object, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _fail(where, f"must be an integer in [{low}, {high}], got {value!r}")
    return value


def _expect_str(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise _fail(where, f"must be a string, got {value!r}")
    return value


def _check_keys(table: Mapping[str, object], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise _fail(
            where, f"unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})"
        )


def _parse_column(name: str, value: object, where: str) -> _ColumnEntry:
    if not _NAME_RE.fullmatch(name):
        raise _fail(where, f"invalid column name {name!r}")
    if not isinstance(value, dict):
        raise _fail(where, 'must be a table like { type = "integer", role = "measure" }')
    _check_keys(value, {"type", "role", "aggregates"}, where)
    try:
        ctype = ColumnType(_expect_str(value.get("type"), f"{where}.type"))
    except ValueError:
        raise _fail(
            f"{where}.type", f"unknown type {value.get('type')!r} ({', '.join(ColumnType)})"
        ) from None
    try:
        role = ColumnRole(_expect_str(value.get("role"), f"{where}.role"))
    except ValueError:
        raise _fail(
            f"{where}.role", f"unknown role {value.get('role')!r} ({', '.join(ColumnRole)})"
        ) from None
    if ctype not in ROLE_TYPES[role]:
        raise _fail(where, f"role {role.value!r} does not fit type {ctype.value!r}")
    aggregates: frozenset[AggregateKind] | None = None
    if "aggregates" in value:
        raw = value["aggregates"]
        if not isinstance(raw, list):
            raise _fail(f"{where}.aggregates", "must be a list of aggregate names")
        kinds: set[AggregateKind] = set()
        for item in raw:
            try:
                kinds.add(AggregateKind(_expect_str(item, f"{where}.aggregates")))
            except ValueError:
                raise _fail(
                    f"{where}.aggregates",
                    f"unknown aggregate {item!r} ({', '.join(AggregateKind)})",
                ) from None
        extra = kinds - ROLE_AGGREGATES[role]
        if extra:
            raise _fail(
                f"{where}.aggregates",
                f"{', '.join(sorted(extra))} not possible for role {role.value!r}",
            )
        aggregates = frozenset(kinds)
    return _ColumnEntry(name=name, type=ctype, role=role, aggregates=aggregates)


def _parse_dataset(name: str, value: object) -> _DatasetEntry:
    where = f"datasets.{name}"
    if not _NAME_RE.fullmatch(name):
        raise _fail(where, "invalid dataset name (letter, then letters, digits, _; at most 63)")
    if not isinstance(value, dict):
        raise _fail(where, "must be a table")
    _check_keys(value, {"source", "disclosure", "columns"}, where)
    source = _expect_str(value.get("source", ""), f"{where}.source")
    disc = value.get("disclosure")
    if not isinstance(disc, dict):
        raise _fail(f"{where}.disclosure", "missing table")
    dw = f"{where}.disclosure"
    _check_keys(
        disc,
        {"version", "fingerprint", "min_group_size", "dominance_p", "max_groups", "purposes"},
        dw,
    )
    for required in ("version", "min_group_size", "dominance_p", "max_groups", "purposes"):
        if required not in disc:
            raise _fail(dw, f"missing {required!r}")
    version = _expect_int(disc["version"], f"{dw}.version", 0, 2**53)
    k = _expect_int(disc["min_group_size"], f"{dw}.min_group_size", 1, 1_000_000)
    p_raw = disc["dominance_p"]
    if isinstance(p_raw, bool) or not isinstance(p_raw, int | float) or not 0 < p_raw <= 100:
        raise _fail(f"{dw}.dominance_p", f"must be a number in (0, 100], got {p_raw!r}")
    max_groups = _expect_int(disc["max_groups"], f"{dw}.max_groups", 1, MAX_GROUPS)
    purposes_raw = disc["purposes"]
    if not isinstance(purposes_raw, list):
        raise _fail(f"{dw}.purposes", "must be a list of strings")
    purposes: list[str] = []
    for item in purposes_raw:
        if not isinstance(item, str) or not _TOKEN_RE.fullmatch(item):
            raise _fail(
                f"{dw}.purposes", f"{item!r} is not a purpose token (lower-case, at most 32)"
            )
        if item in purposes:
            raise _fail(f"{dw}.purposes", f"{item!r} listed twice")
        purposes.append(item)
    fingerprint = _expect_str(disc.get("fingerprint", ""), f"{dw}.fingerprint")
    cols = value.get("columns")
    if not isinstance(cols, dict) or not cols:
        raise _fail(f"{where}.columns", "missing or empty table")
    if len(cols) > MAX_COLUMNS:
        raise _fail(f"{where}.columns", f"more than {MAX_COLUMNS} columns")
    columns = tuple(_parse_column(n, v, f"{where}.columns.{n}") for n, v in cols.items())
    if all(c.role is ColumnRole.HIDDEN for c in columns):
        raise _fail(f"{where}.columns", "every column is hidden; nothing could be published")
    return _DatasetEntry(
        name=name,
        source=source,
        version=version,
        fingerprint=fingerprint,
        min_group_size=k,
        dominance_p=float(p_raw),
        max_groups=max_groups,
        purposes=tuple(purposes),
        columns=columns,
    )


def _parse_toml(text: str) -> dict[str, _DatasetEntry]:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{TOML_FILE}: not valid TOML: {exc}", ErrorCode.CONFIG) from exc
    _check_keys(doc, {"format", "datasets"}, "top level")
    fmt = doc.get("format", _FORMAT)
    if fmt != _FORMAT:
        raise _fail("format", f"unsupported format {fmt!r} (this hansa reads {_FORMAT})")
    datasets = doc.get("datasets", {})
    if not isinstance(datasets, dict):
        raise _fail("datasets", "must be a table")
    return {name: _parse_dataset(name, value) for name, value in datasets.items()}


def _bump_in_text(text: str, name: str, version: int, fingerprint: str) -> str | None:
    """Rewrite ``version``/``fingerprint`` of one disclosure table, keeping every other line.

    Returns None when the lines cannot be found (the caller re-renders the file).
    """
    lines = text.splitlines(keepends=True)
    header = re.compile(rf"^\s*\[\s*datasets\s*\.\s*{re.escape(name)}\s*\.\s*disclosure\s*\]")
    start = next((i for i, line in enumerate(lines) if header.match(line)), None)
    if start is None:
        return None
    found = {"version": False, "fingerprint": False}
    for i in range(start + 1, len(lines)):
        if re.match(r"^\s*\[", lines[i]):
            break
        for key, value in (("version", str(version)), ("fingerprint", _toml_str(fingerprint))):
            m = re.match(rf"^(\s*{key}\s*=\s*)(\"[0-9a-f]*\"|[0-9]+)(.*)$", lines[i], re.DOTALL)
            if m and not found[key]:
                lines[i] = m.group(1) + value + m.group(3)
                found[key] = True
    if not all(found.values()):
        return None
    return "".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --- the DuckDB side --------------------------------------------------------------------


@dataclass(frozen=True)
class _Meta:
    counter: int
    chain: str
    row_count: int
    loaded_at: str
    source: str

    @property
    def version(self) -> str:
        return f"v{self.counter}-{self.chain[:12]}"


def _storage_plan(duck_type: str) -> tuple[ColumnType, str, bool]:
    """Map a DuckDB source type to (logical type, cast template, supported)."""
    t = duck_type.upper()
    if t == "BOOLEAN":
        return ColumnType.BOOLEAN, "CAST({c} AS BOOLEAN)", True
    if t in _INTEGER_TYPES:
        return ColumnType.INTEGER, "CAST({c} AS BIGINT)", True
    if t in _FLOAT_TYPES or t.startswith("DECIMAL"):
        # NaN and infinities would poison sums and merging: store them as NULL.
        return (
            ColumnType.FLOAT,
            "CASE WHEN isfinite(CAST({c} AS DOUBLE)) THEN CAST({c} AS DOUBLE) END",
            True,
        )
    if t == "VARCHAR" or t.startswith("ENUM("):
        return ColumnType.TEXT, "CAST({c} AS VARCHAR)", True
    if t == "DATE":
        return ColumnType.DATE, "CAST({c} AS DATE)", True
    if t in _TIMESTAMP_TYPES:
        return ColumnType.TIMESTAMP, "CAST({c} AS TIMESTAMP)", True
    if t in ("TIMESTAMP WITH TIME ZONE", "TIMESTAMPTZ"):
        # Stored as naive UTC (the loading connection's TimeZone is UTC).
        return ColumnType.TIMESTAMP, "CAST(timezone('UTC', {c}) AS TIMESTAMP)", True
    return ColumnType.TEXT, "CAST({c} AS VARCHAR)", False


def _reader(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".parquet", ".pq"):
        return "read_parquet($1)"
    if suffixes and (suffixes[-1] in (".csv", ".tsv", ".txt") or suffixes[-2:-1] == [".csv"]):
        # sample_size=-1: infer types from the whole file, so a late odd row
        # cannot break a type guessed from the first rows.
        return "read_csv($1, auto_detect = true, sample_size = -1)"
    raise ConfigError(
        f"{path}: unsupported file type (use .csv, .tsv, .csv.gz or .parquet)", ErrorCode.CONFIG
    )


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


class Catalog:
    """The datasets of one node's data directory.

    Thread-safe: readers see an immutable snapshot (:meth:`get`, :meth:`list`);
    writers (:meth:`add`, :meth:`remove`, :meth:`configure`, :meth:`reload`)
    serialise on a lock.

    Args:
        data_dir: the node's data directory (created when writable).
        read_only: open DuckDB read-only (the query engine does); writes then
            raise ConfigError.
        duckdb_config: extra DuckDB configuration for the connection
            (e.g. ``memory_limit``, ``threads``, ``enable_external_access``).

    Raises:
        ConfigError: ``datasets.toml`` is invalid or does not match the
            stored data, or the database is locked by another process.
    """

    def __init__(
        self,
        data_dir: Path | str,
        *,
        read_only: bool = False,
        duckdb_config: Mapping[str, str | int | bool] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.read_only = read_only
        self._duckdb_config = dict(duckdb_config or {})
        self._lock = threading.RLock()
        self._con: duckdb.DuckDBPyConnection | None = None
        self._specs: dict[str, DatasetSpec] = {}
        self._unregistered: tuple[str, ...] = ()
        if not read_only:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        self._open()
        try:
            self.reload()
        except BaseException:
            self.close()
            raise

    # -- paths and connection ------------------------------------------------------

    @property
    def db_path(self) -> Path:
        """The DuckDB file holding the data."""
        return self.data_dir / DB_FILE

    @property
    def toml_path(self) -> Path:
        """The human-editable catalog description."""
        return self.data_dir / TOML_FILE

    @property
    def unregistered(self) -> tuple[str, ...]:
        """Tables in the database with no entry in datasets.toml (not published)."""
        return self._unregistered

    def _open(self) -> None:
        if self._con is not None:
            return
        if self.read_only and not self.db_path.exists():
            return  # nothing stored yet; reload() opens it once it exists
        try:
            self._con = duckdb.connect(
                str(self.db_path), read_only=self.read_only, config=dict(self._duckdb_config)
            )
        except duckdb.Error as exc:
            hint = ""
            if isinstance(exc, duckdb.IOException) and "lock" in str(exc).lower():
                hint = " (is a node or another `hansa dataset` command using it? stop it first)"
            elif isinstance(exc, duckdb.ConnectionException):
                hint = " (already open in this process with different settings)"
            raise ConfigError(f"cannot open {self.db_path}{hint}: {exc}", ErrorCode.CONFIG) from exc
        if not self.read_only:
            self._con.execute(
                f"CREATE TABLE IF NOT EXISTS {META_TABLE} (dataset VARCHAR NOT NULL,"
                " counter BIGINT NOT NULL, chain VARCHAR NOT NULL, row_count BIGINT NOT NULL,"
                " loaded_at VARCHAR NOT NULL, source VARCHAR NOT NULL)"
            )

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """Return a new DuckDB cursor (its own connection to the same database).

        Returns:
            A cursor the caller must close.

        Raises:
            HansaError: ``UNAVAILABLE`` when no data has been stored yet or the
                catalog is closed.
        """
        con = self._con
        if con is None:
            raise HansaError("no dataset store is open", ErrorCode.UNAVAILABLE)
        return con.cursor()

    def close(self) -> None:
        """Close the DuckDB connection (idempotent)."""
        with self._lock:
            if self._con is not None:
                self._con.close()
                self._con = None

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _writable(self) -> duckdb.DuckDBPyConnection:
        if self.read_only:
            raise ConfigError("the catalog is open read-only", ErrorCode.CONFIG)
        if self._con is None:
            raise ConfigError("the catalog is closed", ErrorCode.CONFIG)
        return self._con

    # -- reading -------------------------------------------------------------------

    def get(self, name: str) -> DatasetSpec:
        """Return the published dataset ``name``.

        Args:
            name: a dataset name.

        Returns:
            Its spec.

        Raises:
            QueryError: ``UNKNOWN_DATASET`` when there is no such dataset.
        """
        spec = self._specs.get(name)
        if spec is None:
            raise QueryError(f"no dataset named {name!r}", ErrorCode.UNKNOWN_DATASET)
        return spec

    def list(self) -> list[DatasetSpec]:
        """Return every published dataset, sorted by name.

        Returns:
            The specs.
        """
        specs = self._specs
        return [specs[n] for n in sorted(specs)]

    def _read_meta(self) -> dict[str, _Meta]:
        con = self._con
        if con is None:
            return {}
        cur = con.cursor()
        try:
            exists = cur.execute(
                "SELECT count(*) FROM information_schema.tables"
                " WHERE table_schema = 'main' AND table_name = $1",
                [META_TABLE],
            ).fetchone()
            if not exists or not exists[0]:
                return {}
            rows = cur.execute(
                f"SELECT dataset, counter, chain, row_count, loaded_at, source FROM {META_TABLE}"  # noqa: S608 (quoted, validated identifiers)
            ).fetchall()
        finally:
            cur.close()
        return {r[0]: _Meta(int(r[1]), str(r[2]), int(r[3]), str(r[4]), str(r[5])) for r in rows}

    def _read_schemas(self) -> dict[str, builtins.list[tuple[str, str]]]:
        con = self._con
        if con is None:
            return {}
        cur = con.cursor()
        try:
            rows = cur.execute(
                "SELECT table_name, column_name, data_type FROM information_schema.columns"
                " WHERE table_schema = 'main' ORDER BY table_name, ordinal_position"
            ).fetchall()
        finally:
            cur.close()
        out: dict[str, builtins.list[tuple[str, str]]] = {}
        for table, column, dtype in rows:
            out.setdefault(str(table), []).append((str(column), str(dtype)))
        return out

    def _read_entries(self) -> tuple[str, dict[str, _DatasetEntry]]:
        try:
            text = self.toml_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return "", {}
        except OSError as exc:
            raise ConfigError(f"cannot read {self.toml_path}: {exc}", ErrorCode.CONFIG) from exc
        return text, _parse_toml(text)

    def reload(self) -> None:
        """Re-read ``datasets.toml`` and the stored versions, and publish the result.

        A changed disclosure setting bumps that dataset's disclosure version,
        which is written back to ``datasets.toml``.

        Raises:
            ConfigError: the file is invalid or does not match the stored data
                (the previously loaded catalog stays in effect).
        """
        with self._lock:
            self._open()
            text, entries = self._read_entries()
            meta = self._read_meta()
            schemas = self._read_schemas()
            specs: dict[str, DatasetSpec] = {}
            bumped: list[_DatasetEntry] = []
            for name, entry in entries.items():
                if name not in meta or name not in schemas:
                    raise _fail(
                        f"datasets.{name}",
                        "no stored data for this dataset; load it with"
                        f" `hansa dataset add {name} PATH` or remove the entry",
                    )
                stored = schemas[name]
                self._check_columns(entry, stored)
                current = entry.current_fingerprint()
                if entry.fingerprint != current:
                    # NOTE: a fresh entry (empty fingerprint) keeps its version.
                    version = entry.version + 1 if entry.fingerprint else entry.version
                    entry = replace(entry, version=version, fingerprint=current)
                    bumped.append(entry)
                m = meta[name]
                specs[name] = DatasetSpec(
                    name=name,
                    version=m.version,
                    columns=entry.infos(),
                    disclosure=entry.settings(),
                    row_count=m.row_count,
                    source=m.source,
                    loaded_at=m.loaded_at,
                )
                entries[name] = entry
            if bumped:
                for entry in bumped:
                    new_text = _bump_in_text(text, entry.name, entry.version, entry.fingerprint)
                    text = (
                        new_text
                        if new_text is not None
                        else _render_toml(list(entries.values()), meta)
                    )
                self._persist_text(text)
            self._specs = specs
            self._unregistered = tuple(sorted(n for n in meta if n not in entries and n in schemas))

    @staticmethod
    def _check_columns(entry: _DatasetEntry, stored: Sequence[tuple[str, str]]) -> None:
        where = f"datasets.{entry.name}.columns"
        stored_types = {name: dtype for name, dtype in stored}
        listed = {c.name for c in entry.columns}
        missing = [n for n, _ in stored if n not in listed]
        if missing:
            raise _fail(where, f"stored column(s) {', '.join(missing)} missing from the file")
        for c in entry.columns:
            dtype = stored_types.get(c.name)
            if dtype is None:
                raise _fail(f"{where}.{c.name}", "no such column in the stored data")
            if _FROM_STORAGE.get(dtype) is not c.type:
                stored_type = _FROM_STORAGE.get(dtype)
                shown = stored_type.value if stored_type else dtype
                raise _fail(
                    f"{where}.{c.name}",
                    f"type {c.type.value!r} does not match the stored type {shown!r}",
                )

    def _persist_text(self, text: str) -> None:
        try:
            _write_atomic(self.toml_path, text)
        except OSError as exc:
            raise ConfigError(f"cannot write {self.toml_path}: {exc}", ErrorCode.CONFIG) from exc

    def _persist(self, entries: Mapping[str, _DatasetEntry]) -> None:
        ordered = [entries[n] for n in sorted(entries)]
        self._persist_text(_render_toml(ordered, self._read_meta()))

    # -- writing -------------------------------------------------------------------

    def add(
        self,
        name: str,
        path: Path | str,
        *,
        mode: LoadMode = "create",
        roles: Mapping[str, ColumnRole] | None = None,
    ) -> DatasetSpec:
        """Load a CSV or Parquet file as dataset ``name``, atomically.

        ``create`` fails if the dataset exists; ``replace`` swaps in the new
        rows and schema (roles of columns that keep their name and type are
        kept); ``append`` adds rows (the file must have the same column names,
        and its values must cast to the stored types). Column names are
        sanitised (:func:`sanitize_column_names`), types mapped to the six
        logical types, roles inferred (:func:`infer_role`) then overridden by
        ``roles``.

        Args:
            name: dataset name, ``^[A-Za-z][A-Za-z0-9_]{0,62}$``.
            path: a ``.csv``/``.tsv``/``.csv.gz`` or ``.parquet`` file.
            mode: ``create``, ``replace`` or ``append``.
            roles: role overrides by (sanitised) column name.

        Returns:
            The dataset's new spec.

        Raises:
            ConfigError: bad name, mode, role or file; the dataset exists
                (create) or not (replace/append); the file cannot be read or
                converted (the stored data is then unchanged).
            OSError: the file cannot be opened.
        """
        if not _NAME_RE.fullmatch(name):
            raise ConfigError(
                f"invalid dataset name {name!r}: a letter, then letters, digits or _ (at most 63)",
                ErrorCode.CONFIG,
            )
        if mode not in ("create", "replace", "append"):
            raise ConfigError(f"unknown load mode {mode!r}", ErrorCode.CONFIG)
        source = Path(path).expanduser().resolve()
        reader = _reader(source)
        if not source.is_file():
            raise ConfigError(f"{source}: no such file", ErrorCode.CONFIG)
        file_hash = _sha256_file(source)
        with self._lock:
            con = self._writable()
            _, entries = self._read_entries()
            meta = self._read_meta()
            exists = name in meta or name in self._read_schemas()
            if mode == "create" and exists:
                raise ConfigError(
                    f"dataset {name!r} already exists (use --replace or --append)", ErrorCode.CONFIG
                )
            if mode != "create" and name not in meta:
                raise ConfigError(f"dataset {name!r} does not exist", ErrorCode.CONFIG)
            previous = entries.get(name)
            overrides = dict(roles or {})

            def make_entry(stored: Sequence[tuple[str, ColumnType, bool]]) -> _DatasetEntry:
                # Runs before the load transaction: a bad role changes nothing.
                return self._entry_for(name, str(source), stored, previous, overrides)

            new_meta, entry = self._load(
                con, name, source, reader, mode, file_hash, meta.get(name), make_entry
            )
            entries[name] = entry
            meta[name] = new_meta
            self._persist_text(_render_toml([entries[n] for n in sorted(entries)], meta))
            self.reload()
            return self.get(name)

    def _load(
        self,
        con: duckdb.DuckDBPyConnection,
        name: str,
        source: Path,
        reader: str,
        mode: LoadMode,
        file_hash: str,
        old: _Meta | None,
        make_entry: Callable[[Sequence[tuple[str, ColumnType, bool]]], _DatasetEntry],
    ) -> tuple[_Meta, _DatasetEntry]:
        """Plan, validate, then run the load transaction; return the new meta and entry."""
        table = quote_identifier(name)
        staging = quote_identifier(_STAGING)
        cur = con.cursor()
        try:
            # Naive UTC for TIMESTAMPTZ sources (see _storage_plan).
            cur.execute("SET TimeZone = 'UTC'")
            described = cur.execute(f"DESCRIBE SELECT * FROM {reader}", [str(source)]).fetchall()  # noqa: S608 (quoted, validated identifiers)
            raw_names = [str(r[0]) for r in described]
            if not raw_names:
                raise ConfigError(f"{source}: no columns", ErrorCode.CONFIG)
            if len(raw_names) > MAX_COLUMNS:
                raise ConfigError(f"{source}: more than {MAX_COLUMNS} columns", ErrorCode.CONFIG)
            names = sanitize_column_names(raw_names)
            plans = [_storage_plan(str(r[1])) for r in described]
            select = ", ".join(
                plan[1].format(c=quote_identifier(raw)) + " AS " + quote_identifier(new)
                for raw, new, plan in zip(raw_names, names, plans, strict=True)
            )
            stored = [(n, p[0], p[2]) for n, p in zip(names, plans, strict=True)]
            if mode == "append":
                stored = self._append_plan(cur, name, stored)
            entry = make_entry(stored)
            cur.execute("BEGIN TRANSACTION")
            try:
                cur.execute(f"DROP TABLE IF EXISTS {staging}")
                cur.execute(
                    f"CREATE TABLE {staging} AS SELECT {select} FROM {reader}",  # noqa: S608
                    [str(source)],
                )
                if mode == "append":
                    self._append(cur, name, stored)
                else:
                    cur.execute(f"DROP TABLE IF EXISTS {table}")
                    cur.execute(f"ALTER TABLE {staging} RENAME TO {table}")
                counted = cur.execute(f"SELECT count(*) FROM {table}").fetchone()  # noqa: S608 (quoted, validated identifiers)
                row_count = int(counted[0]) if counted else 0
                schema = json.dumps([[n, t.value] for n, t, _ in stored])
                prior = old.chain if (old is not None and mode == "append") else ""
                chain = hashlib.sha256(
                    f"{mode}\n{schema}\n{file_hash}\n{prior}".encode()
                ).hexdigest()
                counter = (old.counter + 1) if old is not None else 1
                new_meta = _Meta(counter, chain, row_count, _utc_now(), str(source))
                cur.execute(f"DELETE FROM {META_TABLE} WHERE dataset = $1", [name])  # noqa: S608 (quoted, validated identifiers)
                cur.execute(
                    f"INSERT INTO {META_TABLE} VALUES ($1, $2, $3, $4, $5, $6)",  # noqa: S608 (quoted, validated identifiers)
                    [name, counter, chain, row_count, new_meta.loaded_at, new_meta.source],
                )
                cur.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(duckdb.Error):
                    cur.execute("ROLLBACK")
                raise
        except duckdb.Error as exc:
            raise ConfigError(
                f"cannot load {source} into {name!r} (stored data unchanged): {exc}",
                ErrorCode.CONFIG,
            ) from exc
        finally:
            cur.close()
        return new_meta, entry

    @staticmethod
    def _append_plan(
        cur: duckdb.DuckDBPyConnection,
        name: str,
        new: Sequence[tuple[str, ColumnType, bool]],
    ) -> builtins.list[tuple[str, ColumnType, bool]]:
        """Check an appended file has the stored column names; return the stored schema."""
        rows = cur.execute(
            "SELECT column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = 'main' AND table_name = $1 ORDER BY ordinal_position",
            [name],
        ).fetchall()
        existing = [(str(n), _FROM_STORAGE.get(str(t), ColumnType.TEXT)) for n, t in rows]
        if sorted(n for n, _ in existing) != sorted(n for n, _, _ in new):
            raise ConfigError(
                f"cannot append: the file's columns ({', '.join(n for n, _, _ in new)}) differ"
                f" from the stored ones ({', '.join(n for n, _ in existing)})",
                ErrorCode.CONFIG,
            )
        supported = {n: s for n, _, s in new}
        return [(n, t, supported[n]) for n, t in existing]

    @staticmethod
    def _append(
        cur: duckdb.DuckDBPyConnection,
        name: str,
        stored: Sequence[tuple[str, ColumnType, bool]],
    ) -> None:
        """Insert the staging rows, cast to the stored types, and drop the staging table."""
        cols = ", ".join(quote_identifier(n) for n, _, _ in stored)
        casts = ", ".join(f"CAST({quote_identifier(n)} AS {_STORAGE[t]})" for n, t, _ in stored)
        cur.execute(
            f"INSERT INTO {quote_identifier(name)} ({cols})"  # noqa: S608
            f" SELECT {casts} FROM {quote_identifier(_STAGING)}"
        )
        cur.execute(f"DROP TABLE {quote_identifier(_STAGING)}")

    @staticmethod
    def _entry_for(
        name: str,
        source: str,
        stored: Sequence[tuple[str, ColumnType, bool]],
        previous: _DatasetEntry | None,
        overrides: Mapping[str, ColumnRole],
    ) -> _DatasetEntry:
        known = {c for c, _, _ in stored}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(
                f"--role names unknown column(s) {', '.join(unknown)}"
                f" (columns: {', '.join(c for c, _, _ in stored)})",
                ErrorCode.CONFIG,
            )
        kept = {c.name: c for c in previous.columns} if previous else {}
        columns: list[_ColumnEntry] = []
        for cname, ctype, supported in stored:
            old = kept.get(cname)
            if cname in overrides:
                role = ColumnRole(overrides[cname])
                aggregates = None
            elif old is not None and old.type is ctype:
                role, aggregates = old.role, old.aggregates
            else:
                role, aggregates = infer_role(cname, ctype, supported=supported), None
            if ctype not in ROLE_TYPES[role]:
                raise ConfigError(
                    f"column {cname!r}: role {role.value!r} does not fit type {ctype.value!r}",
                    ErrorCode.CONFIG,
                )
            columns.append(_ColumnEntry(cname, ctype, role, aggregates))
        if all(c.role is ColumnRole.HIDDEN for c in columns):
            raise ConfigError(
                f"every column of {name!r} would be hidden; give one a role", ErrorCode.CONFIG
            )
        if previous is not None:
            entry = replace(previous, source=source, columns=tuple(columns))
        else:
            entry = _DatasetEntry(
                name=name,
                source=source,
                version=1,
                fingerprint="",
                min_group_size=DEFAULT_MIN_GROUP_SIZE,
                dominance_p=DEFAULT_DOMINANCE_P,
                max_groups=DEFAULT_MAX_GROUPS,
                purposes=DEFAULT_PURPOSES,
                columns=tuple(columns),
            )
        return entry

    def configure(
        self,
        name: str,
        *,
        roles: Mapping[str, ColumnRole] | None = None,
        aggregates: Mapping[str, Sequence[AggregateKind | str] | None] | None = None,
        min_group_size: int | None = None,
        dominance_p: float | None = None,
        max_groups: int | None = None,
        purposes: Sequence[str] | None = None,
    ) -> DatasetSpec:
        """Change roles or disclosure settings of a dataset (as an operator editing the TOML).

        The new settings are validated exactly like a hand-edited file; the
        disclosure version is bumped when they differ from the current ones.
        The file is re-rendered, so comments an operator added are not kept.

        Args:
            name: the dataset.
            roles: new roles by column (their aggregate lists reset to the role default).
            aggregates: per column, the offered aggregates (None: the role default).
            min_group_size: new k.
            dominance_p: new p (percent).
            max_groups: new group cap.
            purposes: new purpose allow-list.

        Returns:
            The updated spec.

        Raises:
            ConfigError: unknown dataset or column, or invalid settings.
        """
        with self._lock:
            self._writable()
            text, entries = self._read_entries()
            entry = entries.get(name)
            if entry is None:
                raise ConfigError(f"dataset {name!r} does not exist", ErrorCode.CONFIG)
            doc = tomllib.loads(text)["datasets"][name]
            disc: dict[str, Any] = doc["disclosure"]
            cols: dict[str, dict[str, Any]] = doc["columns"]
            for cname, role in (roles or {}).items():
                if cname not in cols:
                    raise ConfigError(f"no column {cname!r} in {name!r}", ErrorCode.CONFIG)
                cols[cname]["role"] = ColumnRole(role).value
                cols[cname].pop("aggregates", None)
            for cname, kinds in (aggregates or {}).items():
                if cname not in cols:
                    raise ConfigError(f"no column {cname!r} in {name!r}", ErrorCode.CONFIG)
                if kinds is None:
                    cols[cname].pop("aggregates", None)
                else:
                    cols[cname]["aggregates"] = [str(k) for k in kinds]
            for key, value in (
                ("min_group_size", min_group_size),
                ("dominance_p", dominance_p),
                ("max_groups", max_groups),
                ("purposes", list(purposes) if purposes is not None else None),
            ):
                if value is not None:
                    disc[key] = value
            entries[name] = _parse_dataset(name, doc)
            self._persist(entries)
            self.reload()
            return self.get(name)

    def remove(self, name: str) -> None:
        """Remove dataset ``name``: its entry in datasets.toml, then its table.

        The TOML entry goes first, so a crash in between leaves an
        unpublished table (see :attr:`unregistered`), never a published
        dataset without data.

        Args:
            name: the dataset (published or unregistered).

        Raises:
            ConfigError: no such dataset, or the store is read-only.
        """
        if not _NAME_RE.fullmatch(name):
            raise ConfigError(f"invalid dataset name {name!r}", ErrorCode.CONFIG)
        with self._lock:
            con = self._writable()
            _, entries = self._read_entries()
            meta = self._read_meta()
            if name not in entries and name not in meta:
                raise ConfigError(f"dataset {name!r} does not exist", ErrorCode.CONFIG)
            if name in entries:
                del entries[name]
                self._persist(entries)
            cur = con.cursor()
            try:
                cur.execute("BEGIN TRANSACTION")
                cur.execute(f"DROP TABLE IF EXISTS {quote_identifier(name)}")
                cur.execute(f"DELETE FROM {META_TABLE} WHERE dataset = $1", [name])  # noqa: S608 (quoted, validated identifiers)
                cur.execute("COMMIT")
            except duckdb.Error as exc:
                with contextlib.suppress(duckdb.Error):
                    cur.execute("ROLLBACK")
                raise ConfigError(f"cannot remove {name!r}: {exc}", ErrorCode.CONFIG) from exc
            finally:
                cur.close()
            self.reload()
