"""The strict body codec: every bad input fails with a typed error and a sensible code.

Bad inputs are crafted with the independent ``msgpack`` library (a generic
tree of the valid encoding, edited, then packed), so the tests do not rely
on msgspec to produce what msgspec must reject.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import msgpack
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import (
    ANSWER,
    CAPABILITIES,
    ERROR,
    QUERY,
    REFUSAL,
    REQUEST,
    STRUCT_STRATEGIES,
    signed_messages,
    top_level_messages,
)

from hansa.protocol import messages as m
from hansa.protocol.codec import MESSAGE_TYPES, decode, decode_as, encode, payload_type_of
from hansa.protocol.envelope import MAX_PAYLOAD_SIZE, PayloadType
from hansa.protocol.errors import ErrorCode, HansaError, ProtocolError, TooLargeError

TOP_LEVEL: list[type[msgspec.Struct]] = [
    m.QueryRequest,
    m.QueryAnswer,
    m.QueryRefusal,
    m.Capabilities,
    m.ErrorMessage,
]

Path = tuple[int, ...]

# --- helpers ---------------------------------------------------------------------------------


def _tree(message: msgspec.Struct) -> Any:
    """The generic MessagePack tree (lists, str, bytes, ...) of a message."""
    return msgpack.unpackb(encode(message), raw=False, strict_map_key=False)


def _pack(tree: Any) -> bytes:
    data: bytes = msgpack.packb(tree, use_bin_type=True)
    return data


def _get(tree: Any, path: Path) -> Any:
    for i in path:
        tree = tree[i]
    return tree


def _set(tree: Any, path: Path, value: Any) -> None:
    _get(tree, path[:-1])[path[-1]] = value


def _struct_paths(value: Any, path: Path = ()) -> Iterator[tuple[Path, msgspec.Struct]]:
    """Every nested struct with its path in the tree (field i is element i + 1)."""
    if isinstance(value, msgspec.Struct):
        yield path, value
        for i, name in enumerate(value.__struct_fields__):
            yield from _struct_paths(getattr(value, name), (*path, i + 1))
    elif isinstance(value, tuple):
        for i, item in enumerate(value):
            yield from _struct_paths(item, (*path, i))


def _all_paths(tree: Any, path: Path = ()) -> Iterator[Path]:
    """Every position in the tree (the root excluded)."""
    if isinstance(tree, list):
        for i, item in enumerate(tree):
            yield (*path, i)
            yield from _all_paths(item, (*path, i))


def _reject(data: bytes, cls: type[msgspec.Struct], code: ErrorCode) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode_as(data, cls)
    assert info.value.code == code, str(info.value)
    if code == ErrorCode.TOO_LARGE:
        assert isinstance(info.value, TooLargeError)
    return info.value


EXAMPLES: list[msgspec.Struct] = [REQUEST, ANSWER, CAPABILITIES, REFUSAL, ERROR]


def test_examples_are_valid() -> None:
    for message in EXAMPLES:
        assert decode_as(encode(message), type(message)) == message


# --- arbitrary input ---------------------------------------------------------------------------


@pytest.mark.parametrize("cls", TOP_LEVEL, ids=lambda c: c.__name__)
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_typed_errors(cls: type[msgspec.Struct], data: bytes) -> None:
    try:
        value = decode_as(data, cls)
    except HansaError:
        return
    assert decode_as(encode(value), cls) == value


_msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.sampled_from(["query", "count", "filter", "eq", "policy", "query-request", "group"]),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=30,
)


@given(tree=_msgpack_values, cls=st.sampled_from(sorted(STRUCT_STRATEGIES, key=str)))
def test_arbitrary_msgpack_raises_only_typed_errors(tree: Any, cls: type[msgspec.Struct]) -> None:
    try:
        decode_as(_pack(tree), cls)
    except HansaError:
        pass


@given(
    message=top_level_messages(),
    edits=st.lists(
        st.tuples(st.integers(min_value=0), st.integers(0, 255), st.sampled_from("rid")),
        min_size=1,
        max_size=3,
    ),
)
def test_mutated_bodies_raise_only_typed_errors(
    message: msgspec.Struct, edits: list[tuple[int, int, str]]
) -> None:
    data = bytearray(encode(message))
    for position, byte, kind in edits:
        i = position % (len(data) + 1)
        if kind == "r" and i < len(data):
            data[i] = byte
        elif kind == "i":
            data.insert(i, byte)
        elif kind == "d" and i < len(data):
            del data[i]
    try:
        value = decode_as(bytes(data), type(message))
    except HansaError:
        return
    assert decode_as(encode(value), type(message)) == value


# --- truncation and trailing bytes --------------------------------------------------------------


@given(message=top_level_messages(), data=st.data())
def test_every_truncation_is_rejected(message: msgspec.Struct, data: st.DataObject) -> None:
    body = encode(message)
    cut = data.draw(st.integers(min_value=0, max_value=len(body) - 1))
    _reject(body[:cut], type(message), ErrorCode.MALFORMED)


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda x: type(x).__name__)
def test_all_truncations_of_examples_are_rejected(message: msgspec.Struct) -> None:
    body = encode(message)
    for cut in range(len(body)):
        _reject(body[:cut], type(message), ErrorCode.MALFORMED)


@given(message=top_level_messages(), extra=st.binary(min_size=1, max_size=4))
def test_trailing_bytes_are_rejected(message: msgspec.Struct, extra: bytes) -> None:
    _reject(encode(message) + extra, type(message), ErrorCode.MALFORMED)


def test_two_messages_back_to_back_are_rejected() -> None:
    _reject(encode(ERROR) + encode(ERROR), m.ErrorMessage, ErrorCode.MALFORMED)


# --- shape: maps, duplicate keys, extra and missing elements, tags ------------------------------

_SENTINEL = "\x00hansa-test-sentinel\x00"
_DUPLICATE_KEY_MAP = b"\x82\xa1k\x01\xa1k\x02"  # {"k": 1, "k": 2}, raw


def _with_raw(tree: Any, path: Path, raw: bytes) -> bytes:
    """Pack ``tree`` with the element at ``path`` replaced by raw MessagePack bytes."""
    tree = msgpack.unpackb(_pack(tree), raw=False)  # deep copy
    if path:
        _set(tree, path, _SENTINEL)
        packed = _pack(tree)
        marker = _pack(_SENTINEL)
        assert packed.count(marker) == 1
        return packed.replace(marker, raw)
    return raw


@given(message=top_level_messages(), data=st.data())
def test_a_map_anywhere_is_rejected(message: msgspec.Struct, data: st.DataObject) -> None:
    tree = _tree(message)
    path = data.draw(st.sampled_from([(), *_all_paths(tree)]))
    as_map = _with_raw(tree, path, _pack({"kind": "query"}))
    _reject(as_map, type(message), ErrorCode.MALFORMED)
    duplicate = _with_raw(tree, path, _DUPLICATE_KEY_MAP)
    _reject(duplicate, type(message), ErrorCode.MALFORMED)


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda x: type(x).__name__)
def test_a_struct_encoded_as_a_map_is_rejected(message: msgspec.Struct) -> None:
    # The natural "object" encoding of the same fields, as another implementation might send.
    as_map = {"kind": _tree(message)[0]} | {name: None for name in message.__struct_fields__}
    _reject(_pack(as_map), type(message), ErrorCode.MALFORMED)


@given(message=top_level_messages(), data=st.data())
def test_an_extra_element_in_any_struct_is_rejected(
    message: msgspec.Struct, data: st.DataObject
) -> None:
    tree = _tree(message)
    path, _ = data.draw(st.sampled_from(list(_struct_paths(message))))
    _get(tree, path).append(data.draw(st.sampled_from([None, 0, "x", b"", []])))
    _reject(_pack(tree), type(message), ErrorCode.MALFORMED)


@given(message=top_level_messages(), data=st.data())
def test_a_missing_required_element_is_rejected(
    message: msgspec.Struct, data: st.DataObject
) -> None:
    tree = _tree(message)
    path, struct = data.draw(st.sampled_from(list(_struct_paths(message))))
    required = len(struct.__struct_fields__) - len(struct.__struct_defaults__)
    if required == 0:
        return
    del _get(tree, path)[required:]  # keep the tag and all but the last required field
    _reject(_pack(tree), type(message), ErrorCode.MALFORMED)


@given(message=top_level_messages(), data=st.data())
def test_a_wrong_tag_in_any_struct_is_rejected(
    message: msgspec.Struct, data: st.DataObject
) -> None:
    tree = _tree(message)
    path, _ = data.draw(st.sampled_from(list(_struct_paths(message))))
    wrong = data.draw(st.sampled_from(["", "Query", "query.v2", "unknown", "count "]))
    _get(tree, path)[0] = wrong
    _reject(_pack(tree), type(message), ErrorCode.MALFORMED)


@pytest.mark.parametrize(
    ("data", "cls"),
    [
        (encode(ANSWER), m.QueryRequest),
        (encode(REQUEST), m.QueryAnswer),
        (encode(REFUSAL), m.ErrorMessage),
        (encode(m.CountState(n=1)), m.Count),  # same tag, different struct
        (encode(m.Count(column="x")), m.CountState),
    ],
)
def test_a_message_of_another_type_is_rejected(data: bytes, cls: type[msgspec.Struct]) -> None:
    _reject(data, cls, ErrorCode.MALFORMED)


# --- wrong field types ----------------------------------------------------------------------------

_WRONG_TYPES: list[tuple[str, msgspec.Struct, Path, Any]] = [
    ("int for str", REQUEST, (1,), 5),
    ("bin for str", REQUEST, (1,), b"ana"),
    ("str for int", REQUEST, (2,), "1000"),
    ("float for int", REQUEST, (2,), 1000.0),
    ("bool for int", REQUEST, (9,), True),
    ("str for bin", REQUEST, (4,), "0123456789abcdef"),
    ("nil for required", REQUEST, (5,), None),
    ("str for array", REQUEST, (8,), "oslo"),
    ("array for str", REQUEST, (8, 0), ["oslo"]),
    ("int for enum str", REQUEST, (6, 3), 1),
    ("str for float", ANSWER, (9, 0, 2, 3, 2), "0.5"),
    ("bin for scalar", REQUEST, (7, 3, 0, 3, 0), b"a"),
    ("array for scalar", REQUEST, (7, 3, 0, 3, 0), ["a"]),
    ("str for code", REFUSAL, (5,), "PURPOSE_NOT_ALLOWED"),
    ("float for count", ANSWER, (9, 0, 2, 0, 1), 12.0),
    ("ext timestamp for int", REQUEST, (2,), msgpack.Timestamp(1, 0)),
    ("ext for bin", REQUEST, (4,), msgpack.ExtType(1, bytes(16))),
    ("sketch bucket triple", ANSWER, (9, 0, 2, 5, 3, 0), [1, 2, 3]),
    ("sketch bucket single", ANSWER, (9, 0, 2, 5, 3, 0), [1]),
    ("disclosure pair triple", CAPABILITIES, (4, 0, 4, 6, 0), ["fare", ["sum"], 1]),
]


@pytest.mark.parametrize(
    ("message", "path", "value"),
    [case[1:] for case in _WRONG_TYPES],
    ids=[case[0] for case in _WRONG_TYPES],
)
def test_wrong_field_types_are_malformed(message: msgspec.Struct, path: Path, value: Any) -> None:
    tree = _tree(message)
    _get(tree, path)  # the path exists
    _set(tree, path, value)
    _reject(_pack(tree), type(message), ErrorCode.MALFORMED)


def test_invalid_utf8_is_malformed() -> None:
    tree = _tree(ERROR)
    _reject(_with_raw(tree, (2,), b"\xa2\xff\xfe"), m.ErrorMessage, ErrorCode.MALFORMED)


def test_an_int_where_a_float_is_declared_is_accepted_as_float() -> None:
    # NOTE: msgspec's strict mode still widens int to float; the value is exact
    # up to 2**53 and the signed bytes are never re-encoded, so this is harmless.
    tree = _tree(QUERY)
    _set(tree, (2, 1, 2), [0, 10])
    decoded = decode_as(_pack(tree), m.Query)
    histogram = decoded.aggregates[1]
    assert isinstance(histogram, m.Histogram)
    assert histogram.edges == (0.0, 10.0)
    assert all(type(e) is float for e in histogram.edges)


def test_identifiers_with_a_trailing_newline_are_rejected() -> None:
    # requester, two targets, purpose (token), analyst, dataset (identifier), column
    for path in [(1,), (8, 0), (8, 1), (6, 1), (6, 4), (7, 1), (7, 2, 1, 1)]:
        tree = _tree(REQUEST)
        _set(tree, path, _get(tree, path) + "\n")
        _reject(_pack(tree), m.QueryRequest, ErrorCode.INVALID_FIELD)


# --- declared limits -> TOO_LARGE -----------------------------------------------------------------

_TOO_LARGE: list[tuple[str, msgspec.Struct, Path, Any]] = [
    ("identifier", REQUEST, (7, 1), "d" * 64),
    ("city id", REQUEST, (8, 0), "o" * 65),
    ("principal id", REQUEST, (1,), "a" * 129),
    ("token", REQUEST, (6, 1), "p" * 33),
    ("legal basis", REQUEST, (6, 2), "x" * (m.MAX_LEGAL_BASIS + 1)),
    ("nonce", REQUEST, (4,), bytes(17)),
    ("targets", REQUEST, (8,), [f"c{i}" for i in range(m.MAX_TARGETS + 1)]),
    ("aggregates", REQUEST, (7, 2), [["count", None]] * (m.MAX_AGGREGATES + 1)),
    ("filters", REQUEST, (7, 3), [["filter", "a", "is_null", []]] * (m.MAX_FILTERS + 1)),
    ("group by", REQUEST, (7, 4), [["dimension", f"c{i}"] for i in range(m.MAX_GROUP_BY + 1)]),
    ("in values", REQUEST, (7, 3, 0, 3), list(range(m.MAX_IN_VALUES + 1))),
    ("literal text", REQUEST, (7, 3, 0, 3, 0), "x" * (m.MAX_TEXT + 1)),
    ("bin edges", REQUEST, (7, 2, 1, 2), [float(i) for i in range(m.MAX_BIN_EDGES + 1)]),
    ("ranks", REQUEST, (7, 2, 2, 2), [0.5] * (m.MAX_QUANTILES + 1)),
    ("request id", ANSWER, (1,), bytes(33)),
    ("dataset version", ANSWER, (6,), "v" * (m.MAX_VERSION_TEXT + 1)),
    ("key length", ANSWER, (9, 0, 1), ["a"] * (m.MAX_GROUP_BY + 1)),
    ("key text", ANSWER, (9, 0, 1, 0), "k" * (m.MAX_TEXT + 1)),
    ("states", ANSWER, (9, 0, 2), [["count", 1]] * (m.MAX_AGGREGATES + 1)),
    ("histogram counts", ANSWER, (9, 0, 2, 4, 1), [1] * m.MAX_BIN_EDGES),
    (
        "sketch buckets",
        ANSWER,
        (9, 0, 2, 5, 3),
        [[i, 1] for i in range(m.MAX_SKETCH_BUCKETS + 1)],
    ),
    ("reason", REFUSAL, (6,), "r" * (m.MAX_TEXT + 1)),
    ("error text", ERROR, (2,), "e" * (m.MAX_TEXT + 1)),
    ("node key", CAPABILITIES, (2,), bytes(33)),
    ("purposes", CAPABILITIES, (4, 0, 4, 5), [f"p{i}" for i in range(m.MAX_PURPOSES + 1)]),
    (
        "aggregate kinds",
        CAPABILITIES,
        (4, 0, 4, 6, 0, 1),
        [f"k{i}" for i in range(m.MAX_AGGREGATE_KINDS + 1)],
    ),
    (
        "columns",
        CAPABILITIES,
        (4, 0, 3),
        [["column", f"c{i}", "float", "measure"] for i in range(m.MAX_COLUMNS + 1)],
    ),
]


@pytest.mark.parametrize(
    ("message", "path", "value"),
    [case[1:] for case in _TOO_LARGE],
    ids=[case[0] for case in _TOO_LARGE],
)
def test_over_long_fields_are_too_large(message: msgspec.Struct, path: Path, value: Any) -> None:
    tree = _tree(message)
    _get(tree, path)  # the path exists
    _set(tree, path, value)
    _reject(_pack(tree), type(message), ErrorCode.TOO_LARGE)


def test_too_many_groups_and_datasets_are_too_large() -> None:
    group = _tree(ANSWER)[9][0]
    tree = _tree(ANSWER)
    tree[8] = "answered"
    tree[10] = []
    tree[9] = [[group[0], [i], group[2]] for i in range(m.MAX_GROUPS + 1)]
    _reject(_pack(tree), m.QueryAnswer, ErrorCode.TOO_LARGE)
    caps = _tree(CAPABILITIES)
    dataset = caps[4][0]
    caps[4] = [[dataset[0], f"d{i}", *dataset[2:]] for i in range(m.MAX_DATASETS + 1)]
    _reject(_pack(caps), m.Capabilities, ErrorCode.TOO_LARGE)


def test_limits_themselves_are_accepted() -> None:
    tree = _tree(REQUEST)
    tree[8] = [f"c{i}" for i in range(m.MAX_TARGETS - 1)] + ["oslo"]
    tree[7][2] = [["count", None]] * m.MAX_AGGREGATES
    tree[7][3] = [["filter", "a", "in", ["x" * m.MAX_TEXT] * m.MAX_IN_VALUES]]
    tree[1] = "a" * 128
    decoded = decode_as(_pack(tree), m.QueryRequest)
    assert len(decoded.targets) == m.MAX_TARGETS


def test_body_size_limit() -> None:
    body = encode(ERROR)
    with pytest.raises(TooLargeError) as info:
        decode_as(body, m.ErrorMessage, max_size=len(body) - 1)
    assert info.value.code == ErrorCode.TOO_LARGE
    assert decode_as(body, m.ErrorMessage, max_size=len(body)) == ERROR
    with pytest.raises(TooLargeError):
        decode_as(b"\x00" * (MAX_PAYLOAD_SIZE + 1), m.ErrorMessage)


# --- constraint and cross-field violations -> INVALID_FIELD ---------------------------------------

_INVALID: list[tuple[str, msgspec.Struct, Path, Any]] = [
    ("expires == issued", REQUEST, (3,), 1_000),
    ("expires < issued", REQUEST, (3,), 999),
    ("quorum > targets", REQUEST, (9,), 4),
    ("quorum 0", REQUEST, (9,), 0),
    ("duplicate targets", REQUEST, (8,), ["oslo", "oslo", "lyon"]),
    ("no targets", REQUEST, (8,), []),
    ("negative time", REQUEST, (2,), -1),
    ("time beyond 2**53", REQUEST, (3,), 2**53 + 1),
    ("short nonce", REQUEST, (4,), bytes(15)),
    ("bad identifier", REQUEST, (7, 1), "1trips"),
    ("upper-case city", REQUEST, (8, 0), "Oslo"),
    ("empty identifier", REQUEST, (7, 1), ""),
    ("empty target", REQUEST, (8,), ["oslo", "", "lyon"]),
    ("two cities as one target", REQUEST, (8,), ["oslo", "lyon porto"]),
    ("a bad target among many", REQUEST, (8,), ["oslo", *(f"c{i}" for i in range(300)), "c-"]),
    ("space in a filter column", REQUEST, (7, 3, 0, 1), "zone x"),
    ("bad group key column", REQUEST, (7, 4, 0, 1), "1zone"),
    ("bad histogram column", REQUEST, (7, 2, 1, 1), "fare!"),
    ("double space in analyst", REQUEST, (6, 4), "ana  bob"),
    ("bad purpose", REQUEST, (6, 1), "Audit"),
    ("bad responder", ANSWER, (2,), "oslo."),
    ("bad answer requester", ANSWER, (3,), "ana melbourne"),
    ("bad answer dataset", ANSWER, (5,), "trips\n"),
    ("bad refusal requester", REFUSAL, (3,), "ana!"),
    ("bad capabilities city", CAPABILITIES, (1,), "os lo"),
    ("bad dataset name", CAPABILITIES, (4, 0, 1), "_trips"),
    ("bad column name", CAPABILITIES, (4, 0, 3, 0, 1), "fare x"),
    ("bad profile purpose", CAPABILITIES, (4, 0, 4, 5, 0), "Audit"),
    ("bad profile column", CAPABILITIES, (4, 0, 4, 6, 0, 0), "fa-re"),
    ("bad profile kind", CAPABILITIES, (4, 0, 4, 6, 0, 1, 0), "su m"),
    ("unknown enum", REQUEST, (6, 3), "secret"),
    ("unknown filter op", REQUEST, (7, 3, 0, 2), "like"),
    ("filter arity eq", REQUEST, (7, 3, 0), ["filter", "a", "eq", []]),
    ("filter arity between", REQUEST, (7, 3, 0), ["filter", "a", "between", [1]]),
    ("filter arity is_null", REQUEST, (7, 3, 0), ["filter", "a", "is_null", [1]]),
    ("filter nan", REQUEST, (7, 3, 0, 3, 0), math.nan),
    ("filter inf", REQUEST, (7, 3, 0, 3, 1), -math.inf),
    ("edge nan", REQUEST, (7, 2, 1, 2, 0), math.nan),
    ("edge inf", REQUEST, (7, 2, 1, 2, 1), math.inf),
    ("edges not increasing", REQUEST, (7, 2, 1, 2), [1.0, 1.0]),
    ("rank > 1", REQUEST, (7, 2, 2, 2, 0), 1.5),
    ("rank nan", REQUEST, (7, 2, 2, 2, 0), math.nan),
    ("no aggregates", REQUEST, (7, 2), []),
    ("duplicate group by", REQUEST, (7, 4), [["dimension", "a"], ["dimension", "a"]]),
    ("max groups 0", REQUEST, (7, 5), 0),
    ("empty legal basis", REQUEST, (6, 2), ""),
    ("sum nan", ANSWER, (9, 0, 2, 1, 2), math.nan),
    ("moments inf", ANSWER, (9, 0, 2, 3, 3), math.inf),
    ("minmax null with n > 0", ANSWER, (9, 0, 2, 2, 2), None),
    ("key nan", ANSWER, (9, 0, 1, 0), math.nan),
    ("suppressed key inf", ANSWER, (10, 0, 1, 0), math.inf),
    ("key lengths differ", ANSWER, (10, 0, 1), ["b", "c"]),
    ("duplicate cell key", ANSWER, (10, 0, 1), ["a"]),
    ("answered with suppressed", ANSWER, (8,), "answered"),
    ("negative count", ANSWER, (9, 0, 2, 0, 1), -1),
    ("no histogram bins", ANSWER, (9, 0, 2, 4, 1), []),
    ("sketch alpha 1", ANSWER, (9, 0, 2, 5, 1), 1.0),
    ("sketch alpha nan", ANSWER, (9, 0, 2, 5, 1), math.nan),
    ("sketch unsorted", ANSWER, (9, 0, 2, 5, 3), [[2, 1], [1, 1]]),
    ("moments mean with no rows", ANSWER, (9, 0, 2, 3), ["moments", 0, 0.5, 0.0]),
    ("local-only code", REFUSAL, (5,), 600),
    ("unknown code", ERROR, (1,), 999),
    ("dominance nan", CAPABILITIES, (4, 0, 4, 3), math.nan),
    ("dominance 0", CAPABILITIES, (4, 0, 4, 3), 0.0),
    ("duplicate columns", CAPABILITIES, (4, 0, 3), [["column", "a", "text", "dimension"]] * 2),
    ("no columns", CAPABILITIES, (4, 0, 3), []),
    ("short node key", CAPABILITIES, (2,), bytes(31)),
]


@pytest.mark.parametrize(
    ("message", "path", "value"),
    [case[1:] for case in _INVALID],
    ids=[case[0] for case in _INVALID],
)
def test_constraint_violations_are_invalid_fields(
    message: msgspec.Struct, path: Path, value: Any
) -> None:
    tree = _tree(message)
    _get(tree, path)  # the path exists
    _set(tree, path, value)
    _reject(_pack(tree), type(message), ErrorCode.INVALID_FIELD)


def test_error_detail_is_bounded() -> None:
    tree = _tree(QUERY)
    tree[2][0][0] = "x" * 100_000  # an attacker-chosen tag echoed by msgspec
    error = _reject(_pack(tree), m.Query, ErrorCode.MALFORMED)
    assert len(str(error)) < 300


# --- payload types ----------------------------------------------------------------------------


@given(signed_messages())
def test_decode_by_payload_type(
    message: m.QueryRequest | m.QueryAnswer | m.QueryRefusal | m.Capabilities,
) -> None:
    payload_type = payload_type_of(message)
    assert MESSAGE_TYPES[payload_type] is type(message)
    assert decode(payload_type, encode(message)) == message
    assert decode(str(payload_type), encode(message)) == message


def test_payload_types_are_distinct_and_versioned() -> None:
    assert set(MESSAGE_TYPES) == set(PayloadType)
    assert len({cls for cls in MESSAGE_TYPES.values()}) == len(MESSAGE_TYPES)
    for payload_type in PayloadType:
        assert payload_type.startswith("application/vnd.hansa.")
        assert payload_type.endswith(".v1+msgpack")


@pytest.mark.parametrize(
    "payload_type",
    [
        "",
        "application/vnd.hansa.query-request.v2+msgpack",
        "APPLICATION/VND.HANSA.QUERY-REQUEST.V1+MSGPACK",
        "application/vnd.hansa.query-request.v1+msgpack ",
        "application/vnd.hansa.error.v1+msgpack",
        "x" * 10_000,
    ],
)
def test_unknown_payload_types_are_rejected(payload_type: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(payload_type, encode(REQUEST))
    assert info.value.code == ErrorCode.UNKNOWN_PAYLOAD_TYPE
    assert len(str(info.value)) < 200


def test_a_body_under_another_payload_type_is_rejected() -> None:
    with pytest.raises(ProtocolError) as info:
        decode(PayloadType.QUERY_ANSWER, encode(REQUEST))
    assert info.value.code == ErrorCode.MALFORMED


@pytest.mark.parametrize("message", [ERROR, QUERY, m.Count(), m.CountState(n=1)], ids=repr)
def test_unsigned_structs_have_no_payload_type(message: msgspec.Struct) -> None:
    with pytest.raises(ProtocolError) as info:
        payload_type_of(message)
    assert info.value.code == ErrorCode.UNKNOWN_PAYLOAD_TYPE


# --- encoding ------------------------------------------------------------------------------------


def test_encoding_values_msgpack_cannot_carry_is_a_protocol_error() -> None:
    # Meta bounds are checked on decoding only, so this constructs; it cannot be encoded.
    with pytest.raises(ProtocolError) as info:
        encode(m.CountState(n=2**64))
    assert info.value.code == ErrorCode.INVALID_FIELD


def test_floats_are_always_float64() -> None:
    body = encode(m.MomentsState(n=1, mean=0.5, m2=0.0))
    assert body.count(b"\xcb") == 2  # float64 marker, never float32 (0xca)
    assert math.isclose(decode_as(body, m.MomentsState).mean, 0.5)


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (b"\xdd\xff\xff\xff\xff", ErrorCode.TOO_LARGE),  # array32 of 2**32 - 1 targets
        (b"\xdc\xff\xff", ErrorCode.TOO_LARGE),  # array16 of 65535 targets
        (b"\xdb\xff\xff\xff\xff", ErrorCode.MALFORMED),  # str32 claiming 4 GiB
        (b"\xc6\xff\xff\xff\xff", ErrorCode.MALFORMED),  # bin32 claiming 4 GiB
    ],
)
def test_huge_declared_lengths_are_refused_before_reading(header: bytes, code: ErrorCode) -> None:
    # The header claims far more than the bytes that follow; the limit (or the
    # end of input) is checked before anything is allocated for the elements.
    tree = _tree(REQUEST)
    _reject(_with_raw(tree, (8,), header), m.QueryRequest, code)


@given(payload_type=st.text(max_size=200), body=st.binary(max_size=50))
def test_decode_with_any_payload_type_raises_only_typed_errors(
    payload_type: str, body: bytes
) -> None:
    try:
        decode(payload_type, body)
    except HansaError as exc:
        if payload_type not in set(PayloadType):
            assert exc.code == ErrorCode.UNKNOWN_PAYLOAD_TYPE
