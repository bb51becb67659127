#!/usr/bin/env python3
"""Generate the Hansa protocol test vectors (``spec/protocol.md`` Appendix A).

The generator is a second, minimal implementation of the byte formats in
``spec/protocol.md``: it builds every message body with the plain ``msgpack``
library from the field tables of §6–§7, signs with libsodium directly
(``nacl.bindings``), and computes Merkle trees, proofs and signed notes from
the RFC 9162 / C2SP definitions. It takes only vocabulary from the ``hansa``
package (payload type strings, error code names, limits), never bytes, so
the vectors are an independent check of the implementation rather than a
copy of its output.

Everything is deterministic: keys come from fixed seeds, times are fixed
millisecond constants and nonces are derived by hashing fixed labels.
Ed25519 signatures are deterministic (RFC 8032), so the same input always
gives the same files.

Usage::

    python spec/generate_vectors.py           # (re)write spec/vectors/*.json
    python spec/generate_vectors.py --check   # exit 1 with a diff summary if they differ
"""

from __future__ import annotations

import argparse
import base64
import difflib
import hashlib
import json
import math
import struct
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgpack
import nacl.bindings as sodium

from hansa.protocol.envelope import ENVELOPE_VERSION, PayloadType
from hansa.protocol.errors import ErrorCode
from hansa.protocol.freshness import (
    DEFAULT_CAPACITY,
    DEFAULT_MAX_SKEW_MS,
    DEFAULT_MAX_VALIDITY_MS,
)

__all__ = ["VECTOR_DIR", "build_all", "check", "main", "render", "write"]

VECTOR_DIR: Final = Path(__file__).resolve().parent / "vectors"
SPEC_VERSION: Final = "hansa-protocol-v1"

Json = Any
"""A JSON-serializable value."""

# ---------------------------------------------------------------------------
# Fixed inputs (spec Appendix A.1)
# ---------------------------------------------------------------------------

T0: Final = 1_767_225_600_000
"""2026-01-01T00:00:00Z in Unix milliseconds: the vectors' reference time."""

RFC8032_TEST1_SEED: Final = bytes.fromhex(
    "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"
)
RFC8032_TEST1_PK: Final = bytes.fromhex(
    "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
)
KEY_ID_PREFIX: Final = b"hansa/key-id/v1\n\x01"
ED25519_L: Final = 2**252 + 27742317777372353535851937790883648493


def derive(label: str, size: int = 32) -> bytes:
    """Return ``SHA-256("hansa/spec/vectors/" || label)[:size]`` (fixed test material)."""
    return hashlib.sha256(b"hansa/spec/vectors/" + label.encode()).digest()[:size]


@dataclass(frozen=True)
class Key:
    """A vector key: its name, seed, public key and Hansa key id."""

    name: str
    seed: bytes

    @property
    def public_key(self) -> bytes:
        pk, _ = sodium.crypto_sign_seed_keypair(self.seed)
        return bytes(pk)

    @property
    def key_id(self) -> bytes:
        return hashlib.sha256(KEY_ID_PREFIX + self.public_key).digest()

    def sign(self, message: bytes) -> bytes:
        _, sk = sodium.crypto_sign_seed_keypair(self.seed)
        return bytes(sodium.crypto_sign(message, sk)[:64])


KEYS: Final = {
    k.name: k
    for k in (
        Key("rfc8032-test1", RFC8032_TEST1_SEED),
        Key("analyst:ana@melbourne", derive("seed/analyst:ana@melbourne")),
        Key("node:cape-town", derive("seed/node:cape-town")),
        Key("node:melbourne", derive("seed/node:melbourne")),
        Key("log:cape-town", derive("seed/log:cape-town")),
        Key("witness:melbourne", derive("seed/witness:melbourne")),
        Key("untrusted", derive("seed/untrusted")),
    )
}
ANALYST: Final = KEYS["analyst:ana@melbourne"]
NODE: Final = KEYS["node:cape-town"]


# ---------------------------------------------------------------------------
# Rendering helpers
# ---------------------------------------------------------------------------


def b64(data: bytes) -> str:
    """Standard padded base64 (RFC 4648 §4)."""
    return base64.b64encode(data).decode()


def render(value: Json) -> str:
    """Serialize a vector file: sorted keys, two-space indent, trailing newline."""
    return json.dumps(value, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def wire_json(value: Any) -> Json:
    """Render a decoded msgpack value as JSON, tagging byte strings as ``{"bin": hex}``."""
    if isinstance(value, bytes):
        return {"bin": value.hex()}
    if isinstance(value, list | tuple):
        return [wire_json(v) for v in value]
    if isinstance(value, dict):
        raise TypeError("maps never appear in Hansa bodies")
    return value


# ---------------------------------------------------------------------------
# A minimal independent encoder for Hansa bodies (spec §5)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class W:
    """A wire struct: its tag and its fields, in declaration order (spec §5.2)."""

    kind: str
    fields: tuple[tuple[str, Any], ...]
    type_name: str


def w(type_name: str, kind: str, **fields: Any) -> W:
    """Build a wire struct; keyword order is the field order on the wire."""
    return W(kind=kind, fields=tuple(fields.items()), type_name=type_name)


def replace_fields(base: W, **changes: Any) -> W:
    """Return ``base`` with some fields replaced (for invalid vectors)."""
    unknown = set(changes) - {name for name, _ in base.fields}
    if unknown:
        raise KeyError(f"{base.type_name} has no field {sorted(unknown)}")
    return W(base.kind, tuple((k, changes.get(k, v)) for k, v in base.fields), base.type_name)


def to_wire(value: Any) -> Any:
    """Lower a value to plain msgpack data: a struct is ``[tag, field1, field2, …]``."""
    if isinstance(value, W):
        return [value.kind, *(to_wire(v) for _, v in value.fields)]
    if isinstance(value, list | tuple):
        return [to_wire(v) for v in value]
    return value


def to_value(value: Any) -> Json:
    """Render a value with field names (bytes as lower-case hex) for readers of the JSON."""
    if isinstance(value, W):
        out: dict[str, Json] = {"kind": value.kind}
        out.update((name, to_value(v)) for name, v in value.fields)
        return out
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list | tuple):
        return [to_value(v) for v in value]
    return value


def pack(value: Any) -> bytes:
    """Encode with msgpack's defaults: minimal-width ints, float64, str vs bin kept apart."""
    data: bytes = msgpack.packb(to_wire(value), use_bin_type=True)
    return data


# Messages (spec §6, §7) ------------------------------------------------------

ISSUED: Final = T0
EXPIRES: Final = T0 + 120_000
NONCE: Final = derive("nonce/request-1", 16)


def policy_tags() -> W:
    return w(
        "PolicyTags",
        "policy",
        purpose="mobility-planning",
        legal_basis="Hansa alliance data-sharing agreement 2026, art. 4(2)",
        scope="alliance",
        analyst="ana@melbourne",
    )


def count(column: str | None = None) -> W:
    return w("Count", "count", column=column)


def agg(type_name: str, column: str) -> W:
    return w(type_name, type_name.lower(), column=column)


def histogram() -> W:
    return w(
        "Histogram",
        "histogram",
        column="trip_duration",
        edges=[0.0, 300.0, 900.0, 1800.0, 3600.0],
    )


def quantiles() -> W:
    return w("Quantiles", "quantiles", column="trip_duration", ranks=[0.5, 0.9, 0.99])


def flt(column: str, op: str, *values: Any) -> W:
    return w("Filter", "filter", column=column, op=op, values=list(values))


def dimension(column: str) -> W:
    return w("Dimension", "dimension", column=column)


def time_bucket(column: str, unit: str) -> W:
    return w("TimeBucket", "time_bucket", column=column, unit=unit)


def query() -> W:
    return w(
        "Query",
        "query",
        dataset="bikeshare_trips",
        aggregates=[
            count(),
            agg("Sum", "trip_duration"),
            agg("Mean", "trip_duration"),
            agg("Max", "trip_duration"),
            histogram(),
            quantiles(),
        ],
        filters=[
            flt("user_type", "in", "Subscriber", "Customer"),
            flt("start_time", "between", "2017-01-01T00:00:00", "2017-06-30T23:59:59"),
        ],
        group_by=[dimension("user_type"), time_bucket("start_time", "month")],
        max_groups=500,
    )


def query_request() -> W:
    return w(
        "QueryRequest",
        "query-request",
        requester="ana@melbourne",
        issued_at=ISSUED,
        expires_at=EXPIRES,
        nonce=NONCE,
        roster_version=7,
        policy=policy_tags(),
        query=query(),
        targets=["cape-town", "chicago", "melbourne"],
        quorum=2,
    )


def sketch_state(alpha: float, zero: int, pos: list[list[int]], neg: list[list[int]]) -> W:
    return w("SketchState", "ddsketch", alpha=alpha, zero_count=zero, positive=pos, negative=neg)


def group(key: list[Any], n: int, total: int, maximum: int, hist: list[int], sk: W) -> W:
    # The states follow the order of query().aggregates (spec §7.2).
    return w(
        "Group",
        "group",
        key=key,
        states=[
            w("CountState", "count", n=n),
            w("SumState", "sum", n=n, total=total),
            w("MomentsState", "moments", n=n, mean=total / n, m2=float(n * 1000)),
            w("MinMaxState", "minmax", n=n, value=maximum),
            w("HistogramState", "histogram", counts=hist, below=0, above=n - sum(hist)),
            sk,
        ],
    )


def query_answer(request_id: bytes) -> W:
    return w(
        "QueryAnswer",
        "query-answer",
        request_id=request_id,
        responder="cape-town",
        requester="ana@melbourne",
        issued_at=T0 + 850,
        dataset="bikeshare_trips",
        dataset_version="2017-h1",
        disclosure_version=3,
        decision="answered_suppressed",
        groups=[
            group(
                ["Subscriber", "2017-01-01"],
                40,
                24_000,
                3_000,
                [10, 20, 9, 1],
                sketch_state(0.01, 0, [[286, 10], [342, 20], [366, 9], [401, 1]], []),
            ),
        ],
        suppressed=[
            w(
                "SuppressedCell",
                "suppressed",
                key=["Customer", "2017-01-01"],
                reason="min_group_size",
            )
        ],
    )


def query_refusal(request_id: bytes) -> W:
    return w(
        "QueryRefusal",
        "query-refusal",
        request_id=request_id,
        responder="cape-town",
        requester="ana@melbourne",
        issued_at=T0 + 420,
        code=int(ErrorCode.PURPOSE_NOT_ALLOWED),
        reason="purpose 'mobility-planning' is not allowed for dataset 'bikeshare_trips'",
    )


def disclosure_profile() -> W:
    return w(
        "DisclosureProfile",
        "disclosure",
        version=3,
        min_group_size=10,
        dominance_p=85.0,
        max_groups=1000,
        purposes=["mobility-planning", "research"],
        aggregates=[
            ["trip_duration", ["count", "sum", "mean", "min", "max", "histogram", "quantiles"]],
            ["birth_year", ["count", "min", "max"]],
        ],
    )


def dataset_info() -> W:
    def col(name: str, type_: str, role: str) -> W:
        return w("ColumnInfo", "column", name=name, type=type_, role=role)

    return w(
        "DatasetInfo",
        "dataset",
        name="bikeshare_trips",
        version="2017-h1",
        columns=[
            col("start_time", "timestamp", "time"),
            col("trip_duration", "integer", "measure"),
            col("user_type", "text", "dimension"),
            col("gender", "text", "dimension"),
            col("birth_year", "integer", "measure"),
            col("bike_id", "integer", "identifier"),
            col("trip_date", "date", "time"),
            col("temperature_c", "float", "measure"),
            col("is_member", "boolean", "dimension"),
            col("station_address", "text", "hidden"),
        ],
        disclosure=disclosure_profile(),
    )


def capabilities() -> W:
    return w(
        "Capabilities",
        "capabilities",
        city="cape-town",
        node_key=NODE.public_key,
        issued_at=T0,
        datasets=[dataset_info()],
    )


def error_message() -> W:
    return w(
        "ErrorMessage",
        "error",
        code=int(ErrorCode.MALFORMED),
        message="malformed envelope: Input data was truncated",
    )


AUDITOR: Final = KEYS["node:melbourne"]
"""Melbourne holds the auditor role and audits Cape Town's log (spec §16.3)."""


def audit_request(op: str = "entries", **fields: Any) -> W:
    body: dict[str, Any] = {
        "start": 0,
        "end": 0,
        "index": 0,
        "message_id": None,
        "old_size": 0,
        "new_size": 0,
        "hashes": [],
    }
    body.update(fields)
    return w(
        "AuditRequest",
        "audit-request",
        requester="melbourne",
        audience="cape-town",
        issued_at=T0 + 1000,
        expires_at=T0 + 61_000,
        nonce=derive("nonce/audit-1", 16),
        roster_version=7,
        op=op,
        **body,
    )


def audit_response(request_id: bytes) -> W:
    leaf = b"hansa-audit/v1\n" + bytes([1]) + (T0 + 5).to_bytes(8, "big")
    leaf += derive("leaf/message-id") + derive("leaf/key-id") + b"\x00\x00"
    note = (
        "hansa/Hanse/cape-town\n2\n" + base64.b64encode(derive("leaf/root")).decode() + "\n"
        "\n\u2014 hansa/Hanse/cape-town AAAAAA==\n"
    ).encode("utf-8")
    return w(
        "AuditResponse",
        "audit-response",
        request_id=request_id,
        responder="cape-town",
        issued_at=T0 + 1200,
        op="entries",
        checkpoint=note,
        entries=[leaf],
        first_index=1,
        proof=[],
        index=0,
        tree_size=2,
        envelopes=[],
    )


def add_checkpoint() -> W:
    note = (
        "hansa/Hanse/cape-town\n5\n" + base64.b64encode(derive("leaf/root-5")).decode() + "\n"
        "\n\u2014 hansa/Hanse/cape-town AAAAAA==\n"
    ).encode("utf-8")
    return w(
        "AddCheckpoint",
        "add-checkpoint",
        old_size=2,
        proof=[derive("proof/0"), derive("proof/1")],
        checkpoint=note,
    )


def audit_request_envelope() -> bytes:
    body = pack(audit_request("entries", start=0, end=1000))
    return seal_raw(PayloadType.AUDIT_REQUEST.value, body, AUDITOR)


def request_envelope() -> bytes:
    return seal_raw(PayloadType.QUERY_REQUEST.value, pack(query_request()), ANALYST)


def every_part() -> list[tuple[str, W]]:
    """One body per struct kind, and every filter op, aggregate and state (spec §6–§7)."""
    request_id = hashlib.sha256(request_envelope()).digest()
    parts: list[tuple[str, W]] = [
        ("query-request", query_request()),
        ("query-answer", query_answer(request_id)),
        ("query-refusal", query_refusal(request_id)),
        ("capabilities", capabilities()),
        ("error", error_message()),
        ("audit-request-entries", audit_request("entries", start=0, end=1000)),
        ("audit-request-checkpoint", audit_request("checkpoint")),
        (
            "audit-request-inclusion",
            audit_request("inclusion", message_id=request_id, new_size=9),
        ),
        ("audit-request-consistency", audit_request("consistency", old_size=3, new_size=9)),
        (
            "audit-request-envelopes",
            audit_request("envelopes", hashes=[request_id, derive("leaf/root")]),
        ),
        ("audit-request-receipt", audit_request("receipt", message_id=request_id)),
        ("audit-response", audit_response(hashlib.sha256(audit_request_envelope()).digest())),
        ("add-checkpoint", add_checkpoint()),
        ("policy-tags", policy_tags()),
        ("policy-tags-public", replace_fields(policy_tags(), scope="public")),
        (
            "query-answer-typed-keys",
            replace_fields(
                query_answer(request_id),
                decision="answered",
                suppressed=[],
                groups=[
                    w("Group", "group", key=[v], states=[w("CountState", "count", n=12)])
                    for v in (1, 1.0, True, "1", None)
                ],
            ),
        ),
        (
            "query-answer-answered",
            replace_fields(query_answer(request_id), decision="answered", suppressed=[]),
        ),
        ("query", query()),
        (
            "query-minimal",
            w(
                "Query",
                "query",
                dataset="nyc_311",
                aggregates=[count()],
                filters=[],
                group_by=[],
                max_groups=1000,
            ),
        ),
        ("count-rows", count()),
        ("count-column", count("birth_year")),
        ("histogram", histogram()),
        ("quantiles", quantiles()),
        ("dimension", dimension("user_type")),
        ("dataset-info", dataset_info()),
        ("disclosure-profile", disclosure_profile()),
        (
            "column-info",
            w("ColumnInfo", "column", name="bike_id", type="integer", role="identifier"),
        ),
        (
            "suppressed-cell-dominance",
            w("SuppressedCell", "suppressed", key=[None, True], reason="dominance"),
        ),
        (
            "group-null-key",
            group([None, False], 10, 0, 0, [10, 0, 0, 0], sketch_state(0.01, 10, [], [])),
        ),
        ("count-state", w("CountState", "count", n=0)),
        ("sum-state-int", w("SumState", "sum", n=3, total=-17)),
        ("sum-state-float", w("SumState", "sum", n=2, total=2.5)),
        ("minmax-state-empty", w("MinMaxState", "minmax", n=0, value=None)),
        ("minmax-state-float", w("MinMaxState", "minmax", n=4, value=-0.25)),
        ("moments-state", w("MomentsState", "moments", n=3, mean=2.0, m2=2.0)),
        ("histogram-state", w("HistogramState", "histogram", counts=[1, 0, 5], below=2, above=0)),
        ("sketch-state", sketch_state(0.01, 3, [[0, 1], [70, 4]], [[35, 2]])),
    ]
    for agg_type in ("Sum", "Mean", "Min", "Max", "Variance", "Stddev"):
        parts.append((f"aggregate-{agg_type.lower()}", agg(agg_type, "trip_duration")))
    for unit in ("hour", "day", "week", "month", "year", "day_of_week", "hour_of_day"):
        parts.append((f"time-bucket-{unit}", time_bucket("start_time", unit)))
    filters: list[tuple[str, tuple[Any, ...]]] = [
        ("eq", ("Subscriber",)),
        ("ne", (True,)),
        ("in", ("a", 1, 2.5, False)),
        ("not_in", (1990, 1991)),
        ("lt", (-3,)),
        ("le", (1.5,)),
        ("gt", (0,)),
        ("ge", (18446744073709551615,)),
        ("between", (1_483_228_800_000, 1_498_867_200_000)),
        ("is_null", ()),
        ("not_null", ()),
    ]
    for op, values in filters:
        parts.append((f"filter-{op}", flt("gender", op, *values)))
    return parts


def messages_vectors() -> Json:
    """Valid bodies of every kind with their wire form and value, plus invalid bodies."""
    valid = []
    for name, value in every_part():
        body = pack(value)
        decoded = msgpack.unpackb(body, raw=False, strict_map_key=True)
        valid.append(
            {
                "name": name,
                "type": value.type_name,
                "body_hex": body.hex(),
                "wire": wire_json(decoded),
                "value": to_value(value),
            }
        )
    count_state = pack(w("CountState", "count", n=5))
    request = query_request()
    request_id = hashlib.sha256(request_envelope()).digest()
    answer = query_answer(request_id)

    def raw(*items: Any) -> bytes:
        data: bytes = msgpack.packb(list(items), use_bin_type=True)
        return data

    cell = ["Subscriber", 1]
    invalid: list[tuple[str, str, bytes, str, str]] = []

    def bad(name: str, type_name: str, body: bytes | W, error: ErrorCode, why: str) -> None:
        data = pack(body) if isinstance(body, W) else body
        invalid.append((name, type_name, data, error.name, why))

    m, f, big = ErrorCode.MALFORMED, ErrorCode.INVALID_FIELD, ErrorCode.TOO_LARGE
    # MALFORMED: not exactly one value of the expected shape (§5.2, §5.4).
    bad(
        "map-instead-of-array",
        "CountState",
        msgpack.packb({"kind": "count", "n": 5}),
        m,
        "bodies are arrays; a map is a type error",
    )
    bad("trailing-byte", "CountState", count_state + b"\xc0", m, "trailing bytes are rejected")
    bad("truncated", "CountState", count_state[:-1], m, "input ends early")
    bad("empty", "CountState", b"", m, "no value at all")
    bad(
        "extra-trailing-element",
        "CountState",
        raw("count", 5, 0),
        m,
        "more elements than the struct has fields (§13.3)",
    )
    bad("missing-required-field", "SumState", raw("sum", 1), m, "total has no default")
    bad("wrong-tag", "CountState", raw("sum", 5), m, "the tag names another struct")
    bad("tag-not-first", "CountState", raw(5, "count"), m, "the tag comes first")
    bad(
        "ext-type",
        "CountState",
        raw("count", msgpack.ExtType(1, b"\x05")),
        m,
        "ext types are forbidden",
    )
    bad(
        "timestamp-ext",
        "QueryRefusal",
        raw(
            "query-refusal",
            bytes(32),
            "cape-town",
            "ana@melbourne",
            msgpack.Timestamp(1_767_225_600, 0),
            406,
            "x",
        ),
        m,
        "times are integer milliseconds, never the timestamp ext",
    )
    bad("float-for-int", "CountState", raw("count", 5.0), m, "no implicit conversion")
    bad("bool-for-int", "CountState", raw("count", True), m, "bool is not an integer")
    bad(
        "str-for-bin",
        "QueryRefusal",
        raw("query-refusal", "0" * 32, "cape-town", "ana@melbourne", T0, 406, "x"),
        m,
        "request_id is bin, not str",
    )
    bad("bin-for-str", "ErrorMessage", raw("error", 100, b"oops"), m, "message is str, not bin")
    bad(
        "invalid-utf8",
        "ErrorMessage",
        bytes.fromhex("93a56572726f7264a2fffe"),
        m,
        "str must be valid UTF-8",
    )
    bad(
        "sketch-bucket-triple",
        "SketchState",
        raw("ddsketch", 0.01, 0, [[1, 2, 3]], []),
        m,
        "a bucket is an [index, count] pair: a third element is an unknown extra element",
    )
    # TOO_LARGE: a declared maximum length or count is exceeded (§5.1).
    bad(
        "too-many-group-keys",
        "Query",
        raw(
            "query",
            "bikeshare_trips",
            [["count", None]],
            [],
            [["dimension", f"c{i}"] for i in range(5)],
            1000,
        ),
        big,
        "at most MAX_GROUP_BY = 4 group keys",
    )
    bad(
        "reason-too-long",
        "QueryRefusal",
        raw("query-refusal", bytes(32), "cape-town", "ana@melbourne", T0, 406, "x" * 1025),
        big,
        "reason is at most MAX_TEXT = 1024 characters",
    )
    bad(
        "nonce-too-long",
        "QueryRequest",
        replace_fields(request, nonce=NONCE + b"\x00"),
        big,
        "nonce is exactly 16 bytes",
    )
    bad(
        "audit-too-many-hashes",
        "AuditRequest",
        audit_request("envelopes", hashes=[request_id] * 1001),
        big,
        "at most MAX_AUDIT_PAGE hashes per envelopes request",
    )
    # INVALID_FIELD: well-typed, but a constraint or cross-field rule fails (§5.3, §6, §7).
    bad(
        "audit-page-too-long",
        "AuditRequest",
        audit_request("entries", start=0, end=1001),
        f,
        "an entries page holds at most MAX_AUDIT_PAGE entries",
    )
    bad(
        "audit-empty-page",
        "AuditRequest",
        audit_request("entries", start=5, end=5),
        f,
        "an entries page needs start < end",
    )
    bad(
        "audit-unused-field-set",
        "AuditRequest",
        audit_request("checkpoint", index=4),
        f,
        "fields an op does not take keep their defaults",
    )
    bad(
        "audit-receipt-without-message-id",
        "AuditRequest",
        audit_request("receipt"),
        f,
        "a receipt names the request",
    )
    bad(
        "audit-consistency-from-zero",
        "AuditRequest",
        audit_request("consistency", old_size=0, new_size=4),
        f,
        "a consistency proof starts from a non-empty tree",
    )
    bad("negative-count", "CountState", raw("count", -1), f, "counts are >= 0")
    bad("count-above-int64", "CountState", raw("count", 2**63), f, "counts are <= 2^63-1")
    bad(
        "unknown-error-code",
        "ErrorMessage",
        raw("error", 999, "x"),
        f,
        "codes outside the §9 table are rejected",
    )
    bad(
        "local-only-error-code",
        "QueryRefusal",
        raw("query-refusal", bytes(32), "cape-town", "ana@melbourne", T0, 600, "x"),
        f,
        "6xx codes are never sent",
    )
    bad(
        "unknown-enum-value",
        "TimeBucket",
        raw("time_bucket", "start_time", "minute"),
        f,
        "unit is one of the §6.4 values",
    )
    bad(
        "bad-identifier",
        "Sum",
        raw("sum", "trip duration"),
        f,
        "identifiers match ^[A-Za-z][A-Za-z0-9_]{0,62}$",
    )
    bad(
        "city-id-trailing-newline",
        "QueryRefusal",
        raw("query-refusal", bytes(32), "cape-town\n", "ana@melbourne", T0, 406, "x"),
        f,
        "patterns match the whole string; a trailing newline is not allowed",
    )
    bad(
        "nonce-too-short",
        "QueryRequest",
        replace_fields(request, nonce=NONCE[:15]),
        f,
        "nonce is exactly 16 bytes",
    )
    bad(
        "expires-not-after-issued",
        "QueryRequest",
        replace_fields(request, expires_at=ISSUED),
        f,
        "expires_at > issued_at (§7.1)",
    )
    bad(
        "no-targets",
        "QueryRequest",
        replace_fields(request, targets=[], quorum=1),
        f,
        "at least one target (§7.1)",
    )
    bad(
        "duplicate-targets",
        "QueryRequest",
        replace_fields(request, targets=["cape-town", "cape-town"], quorum=1),
        f,
        "targets are unique (§7.1)",
    )
    bad(
        "quorum-above-targets",
        "QueryRequest",
        replace_fields(request, quorum=4),
        f,
        "quorum <= len(targets) (§7.1)",
    )
    bad(
        "no-aggregates",
        "Query",
        raw("query", "bikeshare_trips", [], [], [], 1000),
        f,
        "at least one aggregate (§6.5)",
    )
    bad(
        "duplicate-group-key",
        "Query",
        raw(
            "query",
            "bikeshare_trips",
            [["count", None]],
            [],
            [["dimension", "gender"], ["dimension", "gender"]],
            1000,
        ),
        f,
        "group keys are unique (§6.5)",
    )
    bad(
        "max-groups-zero",
        "Query",
        raw("query", "bikeshare_trips", [["count", None]], [], [], 0),
        f,
        "1 <= max_groups <= MAX_GROUPS (§6.5)",
    )
    bad(
        "filter-arity",
        "Filter",
        raw("filter", "gender", "between", [1]),
        f,
        "between takes exactly two values (§6.3)",
    )
    bad(
        "filter-null-literal",
        "Filter",
        raw("filter", "gender", "eq", [None]),
        m,
        "literals are bool, int, float or str; nil is a type error (§6.3)",
    )
    bad(
        "filter-nan",
        "Filter",
        raw("filter", "gender", "lt", [float("nan")]),
        f,
        "float literals are finite (§6.3)",
    )
    bad(
        "histogram-edges-not-increasing",
        "Histogram",
        raw("histogram", "trip_duration", [0.0, 10.0, 10.0]),
        f,
        "edges strictly increase",
    )
    bad(
        "histogram-one-edge",
        "Histogram",
        raw("histogram", "trip_duration", [0.0]),
        f,
        "at least two edges (§6.2)",
    )
    bad(
        "quantile-rank-above-one",
        "Quantiles",
        raw("quantiles", "trip_duration", [1.5]),
        f,
        "ranks lie in [0, 1] (§6.2)",
    )
    bad(
        "minmax-value-without-rows",
        "MinMaxState",
        raw("minmax", 0, 5),
        f,
        "value is nil exactly when n == 0 (§7.3.3)",
    )
    bad(
        "minmax-nil-with-rows",
        "MinMaxState",
        raw("minmax", 3, None),
        f,
        "value is nil exactly when n == 0 (§7.3.3)",
    )
    bad(
        "moments-mean-without-rows",
        "MomentsState",
        raw("moments", 0, 1.5, 0.0),
        f,
        "mean is 0 when n == 0 (§7.3.4)",
    )
    bad(
        "moments-infinite",
        "MomentsState",
        raw("moments", 2, float("inf"), 0.0),
        f,
        "moments are finite (§7.3.4)",
    )
    bad(
        "histogram-state-no-bins",
        "HistogramState",
        raw("histogram", [], 0, 0),
        f,
        "at least one bin (§7.3.5)",
    )
    bad(
        "sketch-alpha-zero",
        "SketchState",
        raw("ddsketch", 0.0, 0, [], []),
        f,
        "0 < alpha < 1 (§7.3.6)",
    )
    bad(
        "sketch-indices-unsorted",
        "SketchState",
        raw("ddsketch", 0.01, 0, [[5, 1], [4, 1]], []),
        f,
        "bucket indices strictly increase (§7.3.6)",
    )
    bad(
        "answer-decision-without-suppression",
        "QueryAnswer",
        replace_fields(answer, decision="answered_suppressed", suppressed=[]),
        f,
        "answered_suppressed needs at least one suppressed cell (§7.2)",
    )
    bad(
        "answer-suppressed-but-answered",
        "QueryAnswer",
        replace_fields(answer, decision="answered"),
        f,
        "answered lists no suppressed cells (§7.2)",
    )
    bad(
        "answer-duplicate-cell",
        "QueryAnswer",
        replace_fields(
            answer,
            suppressed=[
                w(
                    "SuppressedCell",
                    "suppressed",
                    key=["Subscriber", "2017-01-01"],
                    reason="dominance",
                )
            ],
        ),
        f,
        "a cell key appears at most once (§7.2)",
    )
    bad(
        "answer-key-lengths-differ",
        "QueryAnswer",
        replace_fields(
            answer, suppressed=[w("SuppressedCell", "suppressed", key=cell[:1], reason="dominance")]
        ),
        f,
        "every cell key has one value per group key (§7.2)",
    )
    bad(
        "duplicate-purposes",
        "DisclosureProfile",
        replace_fields(disclosure_profile(), purposes=["research", "research"]),
        f,
        "purposes are unique (§7.6)",
    )
    bad(
        "duplicate-column-names",
        "DatasetInfo",
        raw(
            "dataset",
            "trips",
            "v1",
            [["column", "a", "integer", "measure"], ["column", "a", "text", "dimension"]],
            to_wire(disclosure_profile()),
        ),
        f,
        "column names are unique (§7.6)",
    )
    moments = b"\x94\xa7moments\x03\xca" + struct.pack(">f", 2.0) + b"\x02"
    lenient: list[tuple[str, bytes, W]] = [
        ("count-column-omitted", raw("count"), count()),
        (
            "histogram-state-defaults-omitted",
            raw("histogram", [1, 2]),
            w("HistogramState", "histogram", counts=[1, 2], below=0, above=0),
        ),
        (
            "query-defaults-omitted",
            raw("query", "nyc_311", [["count", None]]),
            w(
                "Query",
                "query",
                dataset="nyc_311",
                aggregates=[count()],
                filters=[],
                group_by=[],
                max_groups=1000,
            ),
        ),
        ("filter-values-omitted", raw("filter", "gender", "is_null"), flt("gender", "is_null")),
        (
            "float32-and-int-in-float-fields",
            moments,
            w("MomentsState", "moments", n=3, mean=2.0, m2=2.0),
        ),
        (
            "uint64-width-count",
            b"\x92\xa5count\xcf" + (5).to_bytes(8, "big"),
            w("CountState", "count", n=5),
        ),
    ]
    return {
        "description": (
            "Message bodies (spec §5–§7). 'wire' is the msgpack value as JSON with byte "
            "strings as {\"bin\": hex}; 'value' names the fields (bytes as hex). Decoding "
            "body_hex as 'type' must give 'value', and re-encoding it must give body_hex "
            "(canonical_hex for 'valid_non_canonical', which decoders must accept). "
            "Every 'invalid' body must be rejected with 'error'."
        ),
        "spec_version": SPEC_VERSION,
        "valid": valid,
        "valid_non_canonical": [
            {
                "name": n,
                "type": v.type_name,
                "body_hex": b.hex(),
                "value": to_value(v),
                "canonical_hex": pack(v).hex(),
            }
            for n, b, v in lenient
        ],
        "invalid": [
            {"name": n, "type": t, "body_hex": b.hex(), "error": e, "why": why}
            for n, t, b, e, why in invalid
        ],
    }


# ---------------------------------------------------------------------------
# Keys (spec §3)
# ---------------------------------------------------------------------------

_P: Final = 2**255 - 19


def _small_order_points() -> list[tuple[str, bytes]]:
    """The canonical encodings of the eight points of small order (spec §3.2)."""
    order8 = bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05")
    order8b = bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a")
    flip = bytes(31) + b"\x80"
    return [
        ("identity (order 1)", (1).to_bytes(32, "little")),
        ("order 2 (y = -1)", (_P - 1).to_bytes(32, "little")),
        ("order 4 (y = 0, x even)", bytes(32)),
        ("order 4 (y = 0, x odd)", flip),
        ("order 8", order8),
        ("order 8, x odd", bytes(a | b for a, b in zip(order8, flip, strict=True))),
        ("order 8 (second)", order8b),
        ("order 8 (second), x odd", bytes(a | b for a, b in zip(order8b, flip, strict=True))),
    ]


def keys_vectors() -> Json:
    """Seeds to public keys and key ids, invalid public keys, strict signature cases."""
    test1 = KEYS["rfc8032-test1"]
    if test1.public_key != RFC8032_TEST1_PK:
        raise AssertionError("libsodium disagrees with RFC 8032 TEST 1")
    valid = [
        {
            "name": k.name,
            "seed": k.seed.hex(),
            "public_key": k.public_key.hex(),
            "key_id": k.key_id.hex(),
            "key_id_input_hex": (KEY_ID_PREFIX + k.public_key).hex(),
        }
        for k in KEYS.values()
    ]
    invalid = [
        {"name": f"small order: {why}", "public_key": pk.hex(), "error": "INVALID_KEY"}
        for why, pk in _small_order_points()
    ]
    honest = NODE.public_key
    mixed = bytes(sodium.crypto_core_ed25519_add(honest, _small_order_points()[4][1]))
    invalid += [
        {
            "name": "mixed order: honest key + point of order 8",
            "public_key": mixed.hex(),
            "error": "INVALID_KEY",
        },
        {
            "name": "non-canonical: y = p (encodes y = 0)",
            "public_key": _P.to_bytes(32, "little").hex(),
            "error": "INVALID_KEY",
        },
        {
            "name": "non-canonical: y = p + 1 (encodes the identity)",
            "public_key": (_P + 1).to_bytes(32, "little").hex(),
            "error": "INVALID_KEY",
        },
        {
            "name": "not on the curve: y = 2",
            "public_key": (2).to_bytes(32, "little").hex(),
            "error": "INVALID_KEY",
        },
        {"name": "31 bytes", "public_key": honest[:31].hex(), "error": "INVALID_KEY"},
        {"name": "33 bytes", "public_key": (honest + b"\x00").hex(), "error": "INVALID_KEY"},
    ]
    message = b"hansa strict verification"
    sig = NODE.sign(message)
    s_plus_l = (int.from_bytes(sig[32:], "little") + ED25519_L).to_bytes(32, "little")
    signatures = [
        {
            "name": "valid",
            "public_key": honest.hex(),
            "message_hex": message.hex(),
            "signature": sig.hex(),
            "valid": True,
        },
        {
            "name": "S + L (malleated, non-canonical S)",
            "public_key": honest.hex(),
            "message_hex": message.hex(),
            "signature": (sig[:32] + s_plus_l).hex(),
            "valid": False,
        },
        {
            "name": "flipped message bit",
            "public_key": honest.hex(),
            "message_hex": bytes([message[0] ^ 1, *message[1:]]).hex(),
            "signature": sig.hex(),
            "valid": False,
        },
        {
            "name": "identity R, S = 0",
            "public_key": honest.hex(),
            "message_hex": message.hex(),
            "signature": ((1).to_bytes(32, "little") + bytes(32)).hex(),
            "valid": False,
        },
        {
            "name": "truncated signature (63 bytes)",
            "public_key": honest.hex(),
            "message_hex": message.hex(),
            "signature": sig[:63].hex(),
            "valid": False,
        },
    ]
    return {
        "description": (
            "Ed25519 keys (spec §3). public_key = RFC 8032 key of seed; key_id = "
            "SHA-256(key_id_input) with key_id_input = 'hansa/key-id/v1\\n' || 0x01 || "
            "public_key. Every invalid public key must be refused at import. 'signatures' "
            "are strict-verification cases (libsodium semantics)."
        ),
        "key_id_prefix_hex": KEY_ID_PREFIX.hex(),
        "spec_version": SPEC_VERSION,
        "valid": valid,
        "invalid_public_keys": invalid,
        "signatures": signatures,
    }


# ---------------------------------------------------------------------------
# PAE and envelopes (spec §4)
# ---------------------------------------------------------------------------


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 PAE, written from the DSSE spec (spec §4.2)."""
    t = payload_type.encode()
    return (
        b"DSSEv1 "
        + str(len(t)).encode()
        + b" "
        + t
        + b" "
        + str(len(payload)).encode()
        + (b" " + payload)
    )


def pae_vectors() -> Json:
    cases: list[tuple[str, str, bytes]] = [
        ("dsse-spec-example", "http://example.com/HelloWorld", b"hello world"),
        ("empty-payload", PayloadType.QUERY_REQUEST.value, b""),
        ("binary-payload", PayloadType.QUERY_ANSWER.value, bytes(range(256))),
        ("non-ascii-type", "application/vnd.hansa.stra\u00dfe.v1+msgpack", b"\x91\xa1x"),
        ("count-state-body", PayloadType.QUERY_ANSWER.value, pack(w("CountState", "count", n=5))),
    ]
    out = []
    for name, pt, payload in cases:
        data = pae(pt, payload)
        entry: dict[str, Json] = {
            "name": name,
            "payload_type": pt,
            "payload_hex": payload.hex(),
            "pae_hex": data.hex(),
        }
        if all(32 <= c < 127 for c in data):
            entry["pae_text"] = data.decode()
        out.append(entry)
    return {
        "description": (
            "DSSE v1 pre-authentication encoding (spec §4.2): 'DSSEv1' SP LEN(type) SP type "
            "SP LEN(body) SP body, LEN in ASCII decimal bytes, type as UTF-8."
        ),
        "spec_version": SPEC_VERSION,
        "vectors": out,
    }


def envelope_bytes(version: Any, payload_type: Any, payload: Any, kid: Any, sig: Any) -> bytes:
    data: bytes = msgpack.packb([version, payload_type, payload, kid, sig], use_bin_type=True)
    return data


def seal_raw(payload_type: str, payload: bytes, key: Key) -> bytes:
    """Sign and wrap a payload: ``[1, type, payload, key_id, Ed25519(PAE)]`` (spec §4.2)."""
    return envelope_bytes(
        ENVELOPE_VERSION, payload_type, payload, key.key_id, key.sign(pae(payload_type, payload))
    )


def _non_minimal_envelope(payload_type: str, payload: bytes, key: Key) -> bytes:
    """The same signed content with a uint8 version and bin32 payload length (spec §4.4)."""
    sig = key.sign(pae(payload_type, payload))
    t = payload_type.encode()
    return (
        b"\x95\xcc\x01"
        + b"\xd9"
        + bytes([len(t)])
        + t
        + b"\xc6"
        + len(payload).to_bytes(4, "big")
        + payload
        + b"\xc4\x20"
        + key.key_id
        + b"\xc4\x40"
        + sig
    )


def envelopes_vectors() -> Json:
    request_body = pack(query_request())
    request_env = seal_raw(PayloadType.QUERY_REQUEST.value, request_body, ANALYST)
    request_id = hashlib.sha256(request_env).digest()
    bodies: list[tuple[str, PayloadType, str, W, Key]] = [
        ("query-request", PayloadType.QUERY_REQUEST, "QueryRequest", query_request(), ANALYST),
        ("query-answer", PayloadType.QUERY_ANSWER, "QueryAnswer", query_answer(request_id), NODE),
        (
            "query-refusal",
            PayloadType.QUERY_REFUSAL,
            "QueryRefusal",
            query_refusal(request_id),
            NODE,
        ),
        ("capabilities", PayloadType.CAPABILITIES, "Capabilities", capabilities(), NODE),
        (
            "audit-request",
            PayloadType.AUDIT_REQUEST,
            "AuditRequest",
            audit_request("entries", start=0, end=1000),
            AUDITOR,
        ),
        (
            "audit-response",
            PayloadType.AUDIT_RESPONSE,
            "AuditResponse",
            audit_response(hashlib.sha256(audit_request_envelope()).digest()),
            NODE,
        ),
    ]
    valid = []
    for name, pt, type_name, value, key in bodies:
        body = pack(value)
        signing_input = pae(pt.value, body)
        sig = key.sign(signing_input)
        env = envelope_bytes(ENVELOPE_VERSION, pt.value, body, key.key_id, sig)
        valid.append(
            {
                "name": name,
                "expected_type": type_name,
                "payload_type": pt.value,
                "body_hex": body.hex(),
                "pae_hex": signing_input.hex(),
                "signer": key.name,
                "key_id": key.key_id.hex(),
                "signature": sig.hex(),
                "envelope_hex": env.hex(),
                "message_id": hashlib.sha256(env).hexdigest(),
            }
        )
    answer = pack(query_answer(request_id))
    ans_pt = PayloadType.QUERY_ANSWER.value
    ans_sig = NODE.sign(pae(ans_pt, answer))
    good = envelope_bytes(1, ans_pt, answer, NODE.key_id, ans_sig)
    flipped_sig = bytearray(good)
    flipped_sig[-1] ^= 0x01
    body_flip = bytearray(answer)
    body_flip[-1] ^= 0x01  # a bit of the last suppression reason: still valid msgpack
    s_plus_l = (int.from_bytes(ans_sig[32:], "little") + ED25519_L).to_bytes(32, "little")
    refusal_pt = PayloadType.QUERY_REFUSAL.value
    melbourne = KEYS["node:melbourne"]
    trusted_all = [ANALYST.name, NODE.name, melbourne.name]
    cases: list[tuple[str, bytes, str, str, str, int | None]] = []

    def bad(
        name: str,
        data: bytes,
        error: ErrorCode,
        why: str,
        max_size: int | None = None,
        expected: str = "QueryAnswer",
    ) -> None:
        cases.append((name, data, expected, error.name, why, max_size))

    mk = envelope_bytes
    m, f, big = ErrorCode.MALFORMED, ErrorCode.INVALID_FIELD, ErrorCode.TOO_LARGE
    sig_err, ver = ErrorCode.BAD_SIGNATURE, ErrorCode.UNSUPPORTED_VERSION
    pt_err = ErrorCode.UNKNOWN_PAYLOAD_TYPE
    # Layout (§4.1, §4.2 step 1).
    bad("truncated", good[:-1], m, "last byte missing")
    bad("trailing-byte", good + b"\x00", m, "one byte after the envelope array")
    bad("empty", b"", m, "no bytes at all")
    bad(
        "map-envelope",
        msgpack.packb({"version": 1, "payload_type": ans_pt}),
        m,
        "an envelope is an array, never a map",
    )
    bad(
        "four-elements",
        msgpack.packb([1, ans_pt, answer, NODE.key_id], use_bin_type=True),
        m,
        "the signature element is missing",
    )
    bad(
        "six-elements",
        msgpack.packb([1, ans_pt, answer, NODE.key_id, ans_sig, b""], use_bin_type=True),
        m,
        "envelopes have exactly five elements",
    )
    bad(
        "version-as-string",
        mk("v1", ans_pt, answer, NODE.key_id, ans_sig),
        m,
        "version is an unsigned integer",
    )
    bad(
        "payload-as-str",
        mk(1, ans_pt, "hello", NODE.key_id, ans_sig),
        m,
        "payload is bin, not str",
    )
    bad(
        "payload-type-as-bin",
        mk(1, ans_pt.encode(), answer, NODE.key_id, ans_sig),
        m,
        "payload_type is str, not bin",
    )
    bad(
        "non-minimal-encoding",
        _non_minimal_envelope(PayloadType.QUERY_REQUEST.value, pack(query_request()), ANALYST),
        m,
        "the valid query-request re-wrapped with non-minimal widths (uint8 version, str8 "
        "type, bin32 payload): it would verify under another message id (§4.4)",
        expected="QueryRequest",
    )
    bad(
        "key-id-31-bytes",
        mk(1, ans_pt, answer, NODE.key_id[:31], ans_sig),
        f,
        "key_id is exactly 32 bytes",
    )
    bad(
        "key-id-33-bytes",
        mk(1, ans_pt, answer, NODE.key_id + b"\x00", ans_sig),
        big,
        "key_id is exactly 32 bytes",
    )
    bad(
        "signature-63-bytes",
        mk(1, ans_pt, answer, NODE.key_id, ans_sig[:63]),
        f,
        "signature is exactly 64 bytes",
    )
    bad(
        "empty-payload-type",
        mk(1, "", answer, NODE.key_id, ans_sig),
        f,
        "payload_type has 1..128 characters",
    )
    bad(
        "payload-type-129-bytes",
        mk(1, "x" * 129, answer, NODE.key_id, ans_sig),
        big,
        "payload_type has 1..128 characters",
    )
    bad(
        "over-size-limit",
        good,
        big,
        "the receiver's limit (max_size) is below the length",
        max_size=256,
    )
    # Version (§4.1, §13.1).
    bad("version-2", mk(2, ans_pt, answer, NODE.key_id, ans_sig), ver, "only version 1 exists")
    bad("version-0", mk(0, ans_pt, answer, NODE.key_id, ans_sig), ver, "only version 1 exists")
    bad(
        "version-2-other-layout",
        msgpack.packb([2, ans_pt, answer], use_bin_type=True),
        ver,
        "a readable version other than 1 is reported before any layout error",
    )
    # Payload type (§4.3, §4.2 step 2).
    bad(
        "unknown-payload-type",
        seal_raw("application/vnd.hansa.query-answer.v2+msgpack", answer, NODE),
        pt_err,
        "payload type not in §4.3",
    )
    bad(
        "unexpected-payload-type",
        seal_raw(refusal_pt, answer, NODE),
        pt_err,
        "a refusal's payload type where the endpoint expects an answer",
    )
    # Key and signature (§3, §4.2 steps 3-4).
    bad(
        "unknown-key",
        seal_raw(ans_pt, answer, KEYS["untrusted"]),
        ErrorCode.UNKNOWN_KEY,
        "validly signed by a key the receiver does not trust",
    )
    bad("signature-bit-flip", bytes(flipped_sig), sig_err, "last signature bit flipped")
    bad(
        "payload-bit-flip",
        mk(1, ans_pt, bytes(body_flip), NODE.key_id, ans_sig),
        sig_err,
        "one payload bit flipped, signature unchanged",
    )
    bad(
        "signature-s-plus-l",
        mk(1, ans_pt, answer, NODE.key_id, ans_sig[:32] + s_plus_l),
        sig_err,
        "malleated S + L is rejected (strict verification, §3.1)",
    )
    bad(
        "payload-type-relabelled",
        mk(1, refusal_pt, answer, NODE.key_id, ans_sig),
        sig_err,
        "an answer's signature does not carry over to another payload type (PAE, §4.2)",
        expected="QueryRefusal",
    )
    bad(
        "key-id-of-other-trusted-key",
        mk(1, ans_pt, answer, melbourne.key_id, ans_sig),
        sig_err,
        "key_id names a trusted key that did not sign",
    )
    # Body, decoded only after the signature verified (§4.2 step 5).
    bad(
        "signed-invalid-body",
        seal_raw(ans_pt, pack(w("CountState", "count", n=5)), NODE),
        m,
        "the signature verifies, then the body is not a QueryAnswer",
    )
    bad(
        "signed-empty-body",
        seal_raw(ans_pt, b"", NODE),
        m,
        "a validly signed empty payload is not a message",
    )
    bad(
        "signed-body-breaking-a-rule",
        seal_raw(ans_pt, pack(replace_fields(query_answer(request_id), decision="answered")), NODE),
        f,
        "the signature verifies, then a cross-field rule of the body fails",
    )
    invalid = []
    for name, data, expected, code, why, max_size in cases:
        entry: dict[str, Json] = {
            "name": name,
            "envelope_hex": data.hex(),
            "expected_type": expected,
            "error": code,
            "why": why,
        }
        if max_size is not None:
            entry["max_size"] = max_size
        invalid.append(entry)
    return {
        "description": (
            "Signed envelopes (spec §4): [version, payload_type, payload, key_id, signature], "
            "signature = Ed25519(PAE(payload_type, payload)), message_id = "
            "SHA-256(envelope bytes). Receivers trust the keys named in 'trusted' (see "
            "keys.json) and expect a body of 'expected_type'; each invalid envelope must "
            "be rejected with 'error'."
        ),
        "keys": {
            k.name: {"public_key": k.public_key.hex(), "key_id": k.key_id.hex()}
            for k in KEYS.values()
        },
        "spec_version": SPEC_VERSION,
        "trusted": trusted_all,
        "valid": valid,
        "invalid": invalid,
    }


# ---------------------------------------------------------------------------
# Freshness and replay (spec §8)
# ---------------------------------------------------------------------------


def replay_vectors() -> Json:
    """Step-by-step scenarios for one replay guard at a time (audience ``cape-town``)."""
    skew, validity = DEFAULT_MAX_SKEW_MS, DEFAULT_MAX_VALIDITY_MS

    def step(
        now: int,
        mid: str,
        *,
        requester: str = "ana@melbourne",
        nonce: str = "n1",
        audience: str = "cape-town",
        issued: int = T0,
        expires: int = T0 + 60_000,
        expect: str = "ok",
    ) -> Json:
        return {
            "now_ms": now,
            "message_id": derive("message-id/" + mid).hex(),
            "requester": requester,
            "nonce": derive("nonce/" + nonce, 16).hex(),
            "audience": audience,
            "issued_at": issued,
            "expires_at": expires,
            "expect": expect,
        }

    defaults = {"max_skew_ms": skew, "max_validity_ms": validity, "capacity": DEFAULT_CAPACITY}
    scenarios: list[Json] = [
        {
            "name": "fresh-then-replayed",
            "limits": defaults,
            "steps": [
                step(T0 + 1_000, "a"),
                step(T0 + 2_000, "a", expect="REPLAYED"),
            ],
        },
        {
            "name": "same-nonce-new-envelope",
            "limits": defaults,
            "steps": [
                step(T0, "a"),
                step(T0 + 1, "b", expect="REPLAYED"),
                step(T0 + 2, "c", requester="bo@chicago"),
                step(T0 + 3, "d", nonce="n2"),
            ],
        },
        {
            "name": "wrong-audience",
            "limits": defaults,
            "steps": [
                step(T0, "a", audience="melbourne", expect="WRONG_AUDIENCE"),
                step(T0, "a"),
            ],
        },
        {
            "name": "future-dated-boundary",
            "limits": defaults,
            "steps": [
                step(
                    T0,
                    "a",
                    issued=T0 + skew + 1,
                    expires=T0 + skew + 60_000,
                    expect="NOT_YET_VALID",
                ),
                step(T0, "b", nonce="n2", issued=T0 + skew, expires=T0 + skew + 60_000),
            ],
        },
        {
            "name": "expiry-boundary",
            "limits": defaults,
            "steps": [
                step(T0 + 60_000, "a", expect="EXPIRED"),
                step(T0 + 59_999, "b", nonce="n2"),
            ],
        },
        {
            "name": "validity-boundary",
            "limits": defaults,
            "steps": [
                step(T0, "a", expires=T0 + validity + 1, expect="VALIDITY_TOO_LONG"),
                step(T0, "b", nonce="n2", expires=T0 + validity),
            ],
        },
        {
            "name": "check-order",
            "limits": defaults,
            "steps": [
                step(T0 + 60_000, "a", audience="melbourne", expect="WRONG_AUDIENCE"),
                step(T0 + 60_000, "a", expires=T0, expect="INVALID_FIELD"),
                step(
                    T0,
                    "a",
                    issued=T0 + skew + 1,
                    expires=T0 + 2 * skew + validity + 2,
                    expect="NOT_YET_VALID",
                ),
                step(T0 + validity + 10, "a", expires=T0 + validity + 1, expect="EXPIRED"),
                step(T0, "a"),
                step(T0 + 1, "a", expires=T0 + validity + 1, expect="VALIDITY_TOO_LONG"),
                step(T0 + 2, "a", expect="REPLAYED"),
            ],
        },
        {
            "name": "replay-after-window-is-expired",
            "limits": defaults,
            "steps": [
                step(T0, "a"),
                step(T0 + 60_000 + skew, "a", expect="EXPIRED"),
            ],
        },
        {
            "name": "cache-full-then-drains",
            "limits": {"max_skew_ms": skew, "max_validity_ms": validity, "capacity": 2},
            "steps": [
                step(T0, "a", nonce="n1"),
                step(T0, "b", nonce="n2"),
                step(T0, "c", nonce="n3", expect="REPLAY_CACHE_FULL"),
                step(T0, "a", nonce="n1", expect="REPLAYED"),
                step(T0 + 60_000 + skew, "d", nonce="n4", issued=T0 + 60_000, expires=T0 + 120_000),
                step(T0 + 60_000 + skew, "e", nonce="n5", issued=T0 + 60_000, expires=T0 + 120_000),
            ],
        },
    ]
    return {
        "description": (
            "Replay-guard scenarios (spec §8). Each scenario starts a fresh guard for "
            "audience 'cape-town' with 'limits' and runs its steps in order; 'expect' is "
            "'ok' (accepted and remembered) or the ErrorCode name of the refusal."
        ),
        "audience": "cape-town",
        "defaults": defaults,
        "spec_version": SPEC_VERSION,
        "scenarios": scenarios,
    }


# ---------------------------------------------------------------------------
# Error codes (spec §9)
# ---------------------------------------------------------------------------


def error_code_vectors() -> Json:
    return {
        "description": "Every wire error code (spec §9). 6xx codes are never sent.",
        "spec_version": SPEC_VERSION,
        "codes": [
            {"code": int(c), "name": c.name, "meaning": c.meaning, "on_wire": int(c) < 600}
            for c in ErrorCode
        ],
    }


# ---------------------------------------------------------------------------
# Merkle tree (spec §11), written from RFC 9162 §2.1
# ---------------------------------------------------------------------------

STANDARD_LEAVES: Final = [
    bytes.fromhex(h)
    for h in (
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    )
]
KNOWN_ROOTS: Final = {
    1: "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    2: "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    3: "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    4: "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    5: "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    6: "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    7: "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    8: "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
}


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """Largest power of two strictly less than ``n`` (n > 1)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def mth(leaves: Sequence[bytes]) -> bytes:
    """RFC 9162 §2.1.1 Merkle Tree Hash."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaf_hash(leaves[0])
    k = _split(len(leaves))
    return node_hash(mth(leaves[:k]), mth(leaves[k:]))


def path(m: int, leaves: Sequence[bytes]) -> list[bytes]:
    """RFC 9162 §2.1.3.1 inclusion path PATH(m, D[n])."""
    n = len(leaves)
    if n <= 1:
        return []
    k = _split(n)
    if m < k:
        return [*path(m, leaves[:k]), mth(leaves[k:])]
    return [*path(m - k, leaves[k:]), mth(leaves[:k])]


def _subproof(m: int, leaves: Sequence[bytes], complete: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if complete else [mth(leaves)]
    k = _split(n)
    if m <= k:
        return [*_subproof(m, leaves[:k], complete), mth(leaves[k:])]
    return [*_subproof(m - k, leaves[k:], False), mth(leaves[:k])]


def consistency(m: int, leaves: Sequence[bytes]) -> list[bytes]:
    """RFC 9162 §2.1.4.1 consistency proof PROOF(m, D[n]) for 0 < m <= n."""
    return _subproof(m, leaves, True)


def merkle_vectors() -> Json:
    leaves = STANDARD_LEAVES
    for n, root in KNOWN_ROOTS.items():
        if mth(leaves[:n]).hex() != root:
            raise AssertionError(f"independent MTH disagrees with RFC 6962 root for n={n}")
    inclusion = [
        {
            "leaf_index": m,
            "tree_size": n,
            "leaf_hash": leaf_hash(leaves[m]).hex(),
            "root": mth(leaves[:n]).hex(),
            "proof": [h.hex() for h in path(m, leaves[:n])],
        }
        for n in range(1, len(leaves) + 1)
        for m in range(n)
    ]
    cons = [
        {
            "size1": m,
            "size2": n,
            "root1": mth(leaves[:m]).hex(),
            "root2": mth(leaves[:n]).hex(),
            "proof": [h.hex() for h in consistency(m, leaves[:n])],
        }
        for n in range(1, len(leaves) + 1)
        for m in range(1, n + 1)
    ]
    root8 = mth(leaves)
    root7 = mth(leaves[:7])
    p_inc = path(2, leaves)
    p_con = consistency(3, leaves)
    flipped = bytes([p_inc[0][0] ^ 1]) + p_inc[0][1:]
    bad_inclusion = [
        {
            "name": "index-equals-size",
            "leaf_index": 8,
            "tree_size": 8,
            "leaf_hash": leaf_hash(leaves[2]).hex(),
            "root": root8.hex(),
            "proof": [h.hex() for h in p_inc],
        },
        {
            "name": "wrong-index",
            "leaf_index": 3,
            "tree_size": 8,
            "leaf_hash": leaf_hash(leaves[2]).hex(),
            "root": root8.hex(),
            "proof": [h.hex() for h in p_inc],
        },
        {
            "name": "flipped-proof-bit",
            "leaf_index": 2,
            "tree_size": 8,
            "leaf_hash": leaf_hash(leaves[2]).hex(),
            "root": root8.hex(),
            "proof": [flipped.hex(), *(h.hex() for h in p_inc[1:])],
        },
        {
            "name": "proof-too-short",
            "leaf_index": 2,
            "tree_size": 8,
            "leaf_hash": leaf_hash(leaves[2]).hex(),
            "root": root8.hex(),
            "proof": [h.hex() for h in p_inc[:-1]],
        },
        {
            "name": "proof-too-long",
            "leaf_index": 2,
            "tree_size": 8,
            "leaf_hash": leaf_hash(leaves[2]).hex(),
            "root": root8.hex(),
            "proof": [*(h.hex() for h in p_inc), root8.hex()],
        },
        {
            "name": "wrong-root",
            "leaf_index": 2,
            "tree_size": 8,
            "leaf_hash": leaf_hash(leaves[2]).hex(),
            "root": root7.hex(),
            "proof": [h.hex() for h in p_inc],
        },
        {
            "name": "raw-leaf-instead-of-leaf-hash",
            "leaf_index": 0,
            "tree_size": 1,
            "leaf_hash": hashlib.sha256(leaves[0]).hexdigest(),
            "root": mth(leaves[:1]).hex(),
            "proof": [],
        },
        {
            "name": "empty-tree",
            "leaf_index": 0,
            "tree_size": 0,
            "leaf_hash": leaf_hash(leaves[0]).hex(),
            "root": mth([]).hex(),
            "proof": [],
        },
    ]
    bad_consistency = [
        {
            "name": "size1-zero",
            "size1": 0,
            "size2": 8,
            "root1": mth([]).hex(),
            "root2": root8.hex(),
            "proof": [],
        },
        {
            "name": "size1-greater",
            "size1": 8,
            "size2": 3,
            "root1": root8.hex(),
            "root2": mth(leaves[:3]).hex(),
            "proof": [h.hex() for h in p_con],
        },
        {
            "name": "equal-sizes-non-empty-proof",
            "size1": 8,
            "size2": 8,
            "root1": root8.hex(),
            "root2": root8.hex(),
            "proof": [root8.hex()],
        },
        {
            "name": "equal-sizes-different-roots",
            "size1": 8,
            "size2": 8,
            "root1": root8.hex(),
            "root2": root7.hex(),
            "proof": [],
        },
        {
            "name": "empty-proof",
            "size1": 3,
            "size2": 8,
            "root1": mth(leaves[:3]).hex(),
            "root2": root8.hex(),
            "proof": [],
        },
        {
            "name": "wrong-root1",
            "size1": 3,
            "size2": 8,
            "root1": mth(leaves[:4]).hex(),
            "root2": root8.hex(),
            "proof": [h.hex() for h in p_con],
        },
        {
            "name": "wrong-root2",
            "size1": 3,
            "size2": 8,
            "root1": mth(leaves[:3]).hex(),
            "root2": root7.hex(),
            "proof": [h.hex() for h in p_con],
        },
        {
            "name": "proof-truncated",
            "size1": 3,
            "size2": 8,
            "root1": mth(leaves[:3]).hex(),
            "root2": root8.hex(),
            "proof": [h.hex() for h in p_con[:-1]],
        },
        {
            "name": "proof-extended",
            "size1": 3,
            "size2": 8,
            "root1": mth(leaves[:3]).hex(),
            "root2": root8.hex(),
            "proof": [*(h.hex() for h in p_con), root8.hex()],
        },
    ]
    return {
        "description": (
            "RFC 9162 §2.1 Merkle tree over the standard RFC 6962 test leaves (spec §11). "
            "leaf_hash = SHA-256(0x00 || leaf), interior = SHA-256(0x01 || left || right), "
            "empty root = SHA-256(''). Every 'inclusion'/'consistency' proof verifies and "
            "equals what a conforming prover produces; every 'invalid_*' case must fail."
        ),
        "spec_version": SPEC_VERSION,
        "leaves_hex": [x.hex() for x in leaves],
        "leaf_hashes": [leaf_hash(x).hex() for x in leaves],
        "roots": {str(n): mth(leaves[:n]).hex() for n in range(len(leaves) + 1)},
        "inclusion": inclusion,
        "consistency": cons,
        "invalid_inclusion": bad_inclusion,
        "invalid_consistency": bad_consistency,
    }


# ---------------------------------------------------------------------------
# Signed notes, checkpoints, cosignatures (spec §12), written from C2SP
# ---------------------------------------------------------------------------

EM_DASH: Final = "\u2014"
NOTE_SIG_ED25519: Final = 0x01
NOTE_SIG_COSIGNATURE: Final = 0x04
LOG_ORIGIN: Final = "cape-town.hansa.example/audit"
WITNESS_NAME: Final = "melbourne.hansa.example/witness"
COSIGN_TIME: Final = T0 // 1000 + 60


def note_key_id(name: str, sig_type: int, public_key: bytes) -> bytes:
    """C2SP signed-note key id: SHA-256(name || 0x0A || type || pk)[:4]."""
    return hashlib.sha256(name.encode() + b"\n" + bytes([sig_type]) + public_key).digest()[:4]


def vkey(name: str, sig_type: int, public_key: bytes) -> str:
    kid = note_key_id(name, sig_type, public_key)
    return f"{name}+{kid.hex()}+{b64(bytes([sig_type]) + public_key)}"


def checkpoint_body(origin: str, size: int, root: bytes) -> str:
    return f"{origin}\n{size}\n{b64(root)}\n"


def note_signature_line(name: str, sig_type: int, key: Key, text: str) -> str:
    kid = note_key_id(name, sig_type, key.public_key)
    return f"{EM_DASH} {name} {b64(kid + key.sign(text.encode()))}\n"


def cosignature_message(timestamp: int, body: str) -> str:
    return f"cosignature/v1\ntime {timestamp}\n{body}"


def cosignature_line(name: str, key: Key, timestamp: int, body: str) -> str:
    kid = note_key_id(name, NOTE_SIG_COSIGNATURE, key.public_key)
    sig = key.sign(cosignature_message(timestamp, body).encode())
    return f"{EM_DASH} {name} {b64(kid + timestamp.to_bytes(8, 'big') + sig)}\n"


def _flip_note_signature(line: str) -> str:
    """Flip one bit of the Ed25519 signature inside a note signature line."""
    prefix, _, encoded = line.rstrip("\n").rpartition(" ")
    raw = bytearray(base64.b64decode(encoded))
    raw[10] ^= 0x01
    return f"{prefix} {b64(bytes(raw))}\n"


def notes_vectors() -> Json:
    log_key, witness_key = KEYS["log:cape-town"], KEYS["witness:melbourne"]
    log_vkey = vkey(LOG_ORIGIN, NOTE_SIG_ED25519, log_key.public_key)
    witness_vkey = vkey(WITNESS_NAME, NOTE_SIG_COSIGNATURE, witness_key.public_key)
    checkpoints: list[dict[str, Json]] = []
    for size in (0, 1, 7, 8):
        body = checkpoint_body(LOG_ORIGIN, size, mth(STANDARD_LEAVES[:size]))
        sig_line = note_signature_line(LOG_ORIGIN, NOTE_SIG_ED25519, log_key, body)
        cos_line = cosignature_line(WITNESS_NAME, witness_key, COSIGN_TIME, body)
        checkpoints.append(
            {
                "tree_size": size,
                "root": mth(STANDARD_LEAVES[:size]).hex(),
                "body": body,
                "signed_note": body + "\n" + sig_line,
                "cosigned_note": body + "\n" + sig_line + cos_line,
                "cosignature_timestamp": COSIGN_TIME,
                "cosignature_message": cosignature_message(COSIGN_TIME, body),
            }
        )
    body8: str = checkpoints[-1]["body"]
    sig8 = note_signature_line(LOG_ORIGIN, NOTE_SIG_ED25519, log_key, body8)
    forged_root = checkpoint_body(LOG_ORIGIN, 8, mth(STANDARD_LEAVES[:7]))
    other = KEYS["untrusted"]
    invalid = [
        ("tampered-root", forged_root + "\n" + sig8, "the signature is over another body"),
        (
            "signed-by-other-key",
            body8 + "\n" + note_signature_line(LOG_ORIGIN, NOTE_SIG_ED25519, other, body8),
            "right name, but the key id is unknown, so no known key verifies",
        ),
        ("no-signature-lines", body8 + "\n", "a note needs at least one signature"),
        ("missing-blank-line", body8 + sig8, "signatures follow one blank line"),
        (
            "hyphen-instead-of-em-dash",
            body8 + "\n" + sig8.replace(EM_DASH, "-", 1),
            "signature lines start with U+2014",
        ),
        (
            "bad-signature",
            body8 + "\n" + _flip_note_signature(sig8),
            "the known key's signature does not verify",
        ),
        ("no-final-newline", body8 + "\n" + sig8[:-1], "every line ends in a newline"),
        (
            "size-leading-zero",
            f"{LOG_ORIGIN}\n08\n{b64(mth(STANDARD_LEAVES))}\n"
            + "\n"
            + note_signature_line(
                LOG_ORIGIN,
                NOTE_SIG_ED25519,
                log_key,
                f"{LOG_ORIGIN}\n08\n{b64(mth(STANDARD_LEAVES))}\n",
            ),
            "tree size is decimal without leading zeros (checkpoint rule)",
        ),
        (
            "root-31-bytes",
            checkpoint_body(LOG_ORIGIN, 8, mth(STANDARD_LEAVES)[:31])
            + "\n"
            + note_signature_line(
                LOG_ORIGIN,
                NOTE_SIG_ED25519,
                log_key,
                checkpoint_body(LOG_ORIGIN, 8, mth(STANDARD_LEAVES)[:31]),
            ),
            "the root hash is 32 bytes (checkpoint rule)",
        ),
        (
            "wrong-origin",
            checkpoint_body("chicago.hansa.example/audit", 8, mth(STANDARD_LEAVES))
            + "\n"
            + note_signature_line(
                LOG_ORIGIN,
                NOTE_SIG_ED25519,
                log_key,
                checkpoint_body("chicago.hansa.example/audit", 8, mth(STANDARD_LEAVES)),
            ),
            "the origin line differs from the expected origin",
        ),
    ]
    return {
        "description": (
            "C2SP signed notes (signed-note@v1.0.0), checkpoints (tlog-checkpoint@v1.0.0) "
            "and Ed25519 cosignatures (tlog-cosignature@v1.0.1), spec §12. The log signs "
            "checkpoint bodies of the standard Merkle tree under origin = key name; the "
            "witness cosigns at 'cosignature_timestamp' (seconds). Invalid notes must fail "
            "verification against the log vkey with the expected origin."
        ),
        "spec_version": SPEC_VERSION,
        "log": {
            "origin": LOG_ORIGIN,
            "key": log_key.name,
            "public_key": log_key.public_key.hex(),
            "key_id": note_key_id(LOG_ORIGIN, NOTE_SIG_ED25519, log_key.public_key).hex(),
            "vkey": log_vkey,
        },
        "witness": {
            "name": WITNESS_NAME,
            "key": witness_key.name,
            "public_key": witness_key.public_key.hex(),
            "key_id": note_key_id(WITNESS_NAME, NOTE_SIG_COSIGNATURE, witness_key.public_key).hex(),
            "vkey": witness_vkey,
        },
        "checkpoints": checkpoints,
        "invalid": [{"name": n, "note": text, "why": why} for n, text, why in invalid],
    }


# ---------------------------------------------------------------------------
# Key files (spec §3.5)
# ---------------------------------------------------------------------------

KEYFILE_PASSPHRASE: Final = "correct horse battery staple"
KEYFILE_OPSLIMIT: Final = 1
KEYFILE_MEMLIMIT: Final = 8192


def _keyfile_plain(key: Key) -> str:
    lines = [
        "hansa-key v1",
        "kind: ed25519",
        f"public-key: {key.public_key.hex()}",
        "protection: none",
        f"seed: {key.seed.hex()}",
    ]
    return "".join(line + "\n" for line in lines)


def _keyfile_sealed(key: Key, passphrase: bytes, salt: bytes, nonce: bytes) -> str:
    box_key = sodium.crypto_pwhash_alg(
        32,
        passphrase,
        salt,
        KEYFILE_OPSLIMIT,
        KEYFILE_MEMLIMIT,
        sodium.crypto_pwhash_ALG_ARGON2ID13,
    )
    sealed = bytes(sodium.crypto_secretbox_easy(key.seed, nonce, box_key))
    lines = [
        "hansa-key v1",
        "kind: ed25519",
        f"public-key: {key.public_key.hex()}",
        "protection: argon2id-secretbox",
        f"argon2id-opslimit: {KEYFILE_OPSLIMIT}",
        f"argon2id-memlimit: {KEYFILE_MEMLIMIT}",
        f"salt: {salt.hex()}",
        f"nonce: {nonce.hex()}",
        f"sealed-seed: {sealed.hex()}",
    ]
    return "".join(line + "\n" for line in lines)


def keyfile_vectors() -> Json:
    """Key files, unencrypted and sealed (minimum Argon2id limits, so tests stay fast)."""
    key = NODE
    plain = _keyfile_plain(key)
    salt, nonce = derive("keyfile/salt", 16), derive("keyfile/nonce", 24)
    sealed = _keyfile_sealed(key, KEYFILE_PASSPHRASE.encode(), salt, nonce)
    other = KEYS["node:melbourne"]
    small_order = _small_order_points()[0][1]
    invalid: list[tuple[str, str, str | None, str]] = [
        ("wrong-passphrase", sealed, "Tr0ub4dor&3", "the seed does not decrypt"),
        ("passphrase-missing", sealed, None, "a sealed file needs the passphrase"),
        (
            "public-key-swapped",
            plain.replace(key.public_key.hex(), other.public_key.hex()),
            None,
            "the seed does not derive the stored public key",
        ),
        (
            "sealed-public-key-swapped",
            sealed.replace(key.public_key.hex(), other.public_key.hex()),
            KEYFILE_PASSPHRASE,
            "the decrypted seed does not derive the stored public key",
        ),
        (
            "sealed-seed-bit-flip",
            sealed.replace(
                "sealed-seed: " + sealed.split("sealed-seed: ")[1][:2],
                "sealed-seed: " + format(int(sealed.split("sealed-seed: ")[1][:2], 16) ^ 1, "02x"),
            ),
            KEYFILE_PASSPHRASE,
            "the Poly1305 tag fails",
        ),
        (
            "small-order-public-key",
            plain.replace(key.public_key.hex(), small_order.hex()),
            None,
            "the public key is not a valid Ed25519 key (§3.2)",
        ),
        ("crlf", plain.replace("\n", "\r\n"), None, "lines end in LF only"),
        ("no-final-newline", plain[:-1], None, "every line ends in LF"),
        ("trailing-line", plain + "comment: hello\n", None, "nothing after the last field"),
        ("version-2", plain.replace("hansa-key v1", "hansa-key v2"), None, "only format v1 exists"),
        ("not-a-key-file", "-----BEGIN PRIVATE KEY-----\n", None, "wrong first line"),
        (
            "upper-case-hex",
            plain.replace(key.seed.hex(), key.seed.hex().upper()),
            None,
            "hex is lower case",
        ),
        (
            "fields-reordered",
            "".join(plain.splitlines(keepends=True)[i] for i in (0, 2, 1, 3, 4)),
            None,
            "fields in the fixed order",
        ),
        (
            "unknown-protection",
            plain.replace("protection: none", "protection: rot13"),
            None,
            "protection is none or argon2id-secretbox",
        ),
        (
            "opslimit-leading-zero",
            sealed.replace("argon2id-opslimit: 1\n", "argon2id-opslimit: 01\n"),
            KEYFILE_PASSPHRASE,
            "decimals have no leading zero",
        ),
        (
            "opslimit-too-high",
            sealed.replace("argon2id-opslimit: 1\n", "argon2id-opslimit: 17\n"),
            KEYFILE_PASSPHRASE,
            "opslimit is 1..16",
        ),
        (
            "memlimit-not-kib-multiple",
            sealed.replace("argon2id-memlimit: 8192\n", "argon2id-memlimit: 8193\n"),
            KEYFILE_PASSPHRASE,
            "memlimit is a multiple of 1024",
        ),
        (
            "seed-too-short",
            plain.replace(key.seed.hex(), key.seed.hex()[:62]),
            None,
            "the seed is 64 hex digits",
        ),
    ]
    return {
        "description": (
            "Key files (spec §3.5). Each valid file, written with mode 0600, reads back as "
            "the signing key with 'seed' (using 'passphrase' when sealed). Each invalid file "
            "is refused with KEY_FILE (local only)."
        ),
        "spec_version": SPEC_VERSION,
        "valid": [
            {
                "name": "unencrypted",
                "text": plain,
                "passphrase": None,
                "seed": key.seed.hex(),
                "public_key": key.public_key.hex(),
            },
            {
                "name": "argon2id-secretbox",
                "text": sealed,
                "passphrase": KEYFILE_PASSPHRASE,
                "seed": key.seed.hex(),
                "public_key": key.public_key.hex(),
                "salt": salt.hex(),
                "nonce": nonce.hex(),
            },
        ],
        "invalid": [
            {"name": n, "text": t, "passphrase": p, "error": "KEY_FILE", "why": why}
            for n, t, p, why in invalid
        ],
    }


# ---------------------------------------------------------------------------
# DDSketch (spec §7.3.6)
# ---------------------------------------------------------------------------

SKETCH_ALPHA: Final = 0.01
SKETCH_ZERO: Final = 1e-9
SKETCH_VALUES: Final = [
    0.0,
    5e-10,
    -5e-10,
    1.0,
    1.5,
    2.5,
    60.0,
    61.0,
    300.0,
    300.0,
    1234.5,
    86400.0,
    -3.0,
    -3.01,
    -250.0,
    1e-6,
    1e6,
]


def _sketch(values: Sequence[float], alpha: float) -> W:
    lg = math.log((1.0 + alpha) / (1.0 - alpha))
    zero = 0
    stores: dict[int, dict[int, int]] = {1: {}, -1: {}}
    for x in values:
        if abs(x) < SKETCH_ZERO:
            zero += 1
            continue
        store = stores[1 if x > 0 else -1]
        i = math.ceil(math.log(abs(x)) / lg)
        store[i] = store.get(i, 0) + 1
    return sketch_state(
        alpha,
        zero,
        [[i, c] for i, c in sorted(stores[1].items())],
        [[i, c] for i, c in sorted(stores[-1].items())],
    )


def _quantiles(values: Sequence[float], alpha: float, ranks: Sequence[float]) -> list[Json]:
    g = (1.0 + alpha) / (1.0 - alpha)
    lg = math.log(g)
    state = dict(_sketch(values, alpha).fields)
    ordered: list[tuple[int, float]] = [
        (c, -math.exp(i * lg) * (2.0 / (g + 1.0))) for i, c in reversed(state["negative"])
    ]
    if state["zero_count"]:
        ordered.append((state["zero_count"], 0.0))
    ordered += [(c, math.exp(i * lg) * (2.0 / (g + 1.0))) for i, c in state["positive"]]
    n = sum(c for c, _ in ordered)
    out: list[Json] = []
    for q in ranks:
        rank = math.floor(q * (n - 1))
        seen = 0
        for count_, value in ordered:
            seen += count_
            if seen > rank:
                out.append(float(f"{value:.12g}"))
                break
    return out


def sketch_vectors() -> Json:
    alpha = SKETCH_ALPHA
    lg = math.log((1.0 + alpha) / (1.0 - alpha))
    ranks = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]
    values = SKETCH_VALUES
    half = len(values) // 2
    return {
        "description": (
            "DDSketch states (spec §7.3.6). index = ceil(ln|x| / ln(gamma)) in doubles, "
            "gamma = (1 + alpha) / (1 - alpha); |x| < 1e-9 counts as zero. 'state' is the "
            "sketch of 'values'; it equals the merge of the sketches of 'parts'. 'estimates' "
            "are the quantile estimates for 'ranks' (rounded to 12 significant digits; compare "
            "with a relative tolerance of 1e-9)."
        ),
        "spec_version": SPEC_VERSION,
        "alpha": alpha,
        "zero_threshold": SKETCH_ZERO,
        "gamma": (1.0 + alpha) / (1.0 - alpha),
        "indices": [
            {
                "value": x,
                "index": None if abs(x) < SKETCH_ZERO else math.ceil(math.log(abs(x)) / lg),
            }
            for x in values
        ],
        "values": values,
        "state": to_value(_sketch(values, alpha)),
        "state_body_hex": pack(_sketch(values, alpha)).hex(),
        "parts": [
            {"values": part, "state": to_value(_sketch(part, alpha))}
            for part in (values[:half], values[half:])
        ],
        "ranks": ranks,
        "estimates": _quantiles(values, alpha, ranks),
        "empty_estimates": [None for _ in ranks],
    }


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------

BUILDERS: Final[dict[str, Callable[[], Json]]] = {
    "keys.json": keys_vectors,
    "pae.json": pae_vectors,
    "envelopes.json": envelopes_vectors,
    "messages.json": messages_vectors,
    "replay.json": replay_vectors,
    "error_codes.json": error_code_vectors,
    "merkle.json": merkle_vectors,
    "notes.json": notes_vectors,
    "keyfiles.json": keyfile_vectors,
    "sketch.json": sketch_vectors,
}


def build_all() -> dict[str, str]:
    """Return every vector file's exact text, by file name."""
    return {name: render(build()) for name, build in BUILDERS.items()}


def write(directory: Path = VECTOR_DIR) -> list[str]:
    """Write the vector files; return the names of files that changed."""
    directory.mkdir(parents=True, exist_ok=True)
    changed = []
    for name, text in build_all().items():
        target = directory / name
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            target.write_text(text, encoding="utf-8")
            changed.append(name)
    return changed


def check(directory: Path = VECTOR_DIR, *, context_lines: int = 20) -> list[str]:
    """Compare the committed files with fresh output; return a diff summary (empty = same)."""
    problems: list[str] = []
    fresh = build_all()
    for name, text in fresh.items():
        target = directory / name
        if not target.exists():
            problems.append(f"{name}: missing (run python spec/generate_vectors.py)")
            continue
        old = target.read_text(encoding="utf-8")
        if old != text:
            diff = list(
                difflib.unified_diff(
                    old.splitlines(),
                    text.splitlines(),
                    f"committed/{name}",
                    f"fresh/{name}",
                    lineterm="",
                    n=1,
                )
            )
            shown = _head(diff, context_lines)
            problems.append(f"{name}: differs ({len(diff)} diff lines)\n" + "\n".join(shown))
    extra = sorted(p.name for p in directory.glob("*.json") if p.name not in fresh)
    problems.extend(f"{name}: not produced by the generator" for name in extra)
    return problems


def _head(lines: Iterable[str], limit: int) -> list[str]:
    out = []
    for i, line in enumerate(lines):
        if i >= limit:
            out.append("  ...")
            break
        out.append("  " + line)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--check", action="store_true", help="compare instead of writing; exit 1 on difference"
    )
    args = parser.parse_args(argv)
    if args.check:
        problems = check()
        for p in problems:
            print(p, file=sys.stderr)
        if problems:
            print(f"{len(problems)} vector file(s) out of date", file=sys.stderr)
            return 1
        print(f"{len(BUILDERS)} vector files up to date")
        return 0
    changed = write()
    print(f"wrote {len(changed)} changed file(s) of {len(BUILDERS)}: {', '.join(changed) or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
