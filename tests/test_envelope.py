"""The signed envelope: PAE, strict parsing, and tamper evidence through seal/open."""

from __future__ import annotations

import hashlib
from typing import Any

import msgpack
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import ANSWER, CAPABILITIES, ERROR, REFUSAL, REQUEST, signed_messages

from hansa.crypto import PublicKey, SigningKey, open_envelope, seal, seal_bytes
from hansa.crypto.keys import verify_signed, verify_strict
from hansa.protocol import messages as m
from hansa.protocol.codec import MESSAGE_TYPES, encode, payload_type_of
from hansa.protocol.envelope import (
    ENVELOPE_VERSION,
    MAX_ENVELOPE_SIZE,
    MAX_PAYLOAD_SIZE,
    Envelope,
    PayloadType,
    decode_envelope,
    encode_envelope,
    message_id,
    pae,
    pae_prefix,
)
from hansa.protocol.errors import (
    ErrorCode,
    HansaError,
    ProtocolError,
    SignatureError,
    TooLargeError,
)

KEY = SigningKey(bytes(range(32)))
OTHER = SigningKey(bytes(range(1, 33)))
TRUSTED: dict[bytes, PublicKey] = {KEY.key_id: KEY.public_key}

SignedMessage = m.QueryRequest | m.QueryAnswer | m.QueryRefusal | m.Capabilities


def _code(exc: pytest.ExceptionInfo[HansaError]) -> ErrorCode:
    return exc.value.code


# --- PAE (DSSE v1) --------------------------------------------------------------------------


def test_pae_known_answer_from_the_dsse_spec() -> None:
    assert (
        pae("http://example.com/HelloWorld", b"hello world")
        == b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_pae_edge_cases() -> None:
    assert pae("", b"") == b"DSSEv1 0  0 "
    # LEN counts UTF-8 bytes, not characters.
    assert pae("é", b"\x00") == b"DSSEv1 2 \xc3\xa9 1 \x00"
    assert pae("t", bytes(10)) == b"DSSEv1 1 t 10 " + bytes(10)


@given(payload_type=st.text(max_size=20), body=st.binary(max_size=300))
def test_pae_is_its_prefix_then_the_body(payload_type: str, body: bytes) -> None:
    assert pae(payload_type, body) == pae_prefix(payload_type) + b"%d " % len(body) + body


@given(
    type_a=st.text(max_size=20),
    body_a=st.binary(max_size=40),
    type_b=st.text(max_size=20),
    body_b=st.binary(max_size=40),
)
def test_pae_is_injective(type_a: str, body_a: bytes, type_b: str, body_b: bytes) -> None:
    if (type_a, body_a) != (type_b, body_b):
        assert pae(type_a, body_a) != pae(type_b, body_b)


# --- seal / open ------------------------------------------------------------------------------


@given(signed_messages())
def test_seal_open_round_trip(message: SignedMessage) -> None:
    data = seal(message, KEY)
    opened = open_envelope(data, TRUSTED, type(message))
    assert opened.message == message
    assert opened.signer == KEY.public_key
    assert opened.message_id == hashlib.sha256(data).digest() == message_id(data)
    assert opened.envelope.payload == encode(message)
    assert opened.envelope.payload_type == payload_type_of(message)
    assert opened.envelope.version == ENVELOPE_VERSION
    # Sealing is deterministic (Ed25519), so the id of a message is stable.
    assert seal(message, KEY) == data


def test_the_envelope_is_a_five_element_array() -> None:
    data = seal(REFUSAL, KEY)
    tree = msgpack.unpackb(data)
    assert tree == [
        1,
        PayloadType.QUERY_REFUSAL.value,
        encode(REFUSAL),
        KEY.key_id,
        KEY.sign(pae(PayloadType.QUERY_REFUSAL, encode(REFUSAL))),
    ]


def test_a_callable_key_lookup_works() -> None:
    data = seal(REFUSAL, KEY)
    assert open_envelope(data, TRUSTED.get, m.QueryRefusal).message == REFUSAL


def _tamper_is_rejected(data: bytes, expected: type[msgspec.Struct]) -> HansaError:
    try:
        open_envelope(data, TRUSTED, expected)
    except (ProtocolError, SignatureError) as exc:
        return exc
    raise AssertionError("tampered envelope was accepted")


@pytest.mark.parametrize("message", [REFUSAL, REQUEST], ids=lambda x: type(x).__name__)
def test_every_single_bit_flip_is_rejected(message: SignedMessage) -> None:
    data = seal(message, KEY)
    codes = set()
    for i in range(len(data)):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[i] ^= 1 << bit
            codes.add(_tamper_is_rejected(bytes(flipped), type(message)).code)
    # The flips reach every layer: framing, version, type, key id, signature.
    assert {
        ErrorCode.MALFORMED,
        ErrorCode.UNSUPPORTED_VERSION,
        ErrorCode.UNKNOWN_PAYLOAD_TYPE,
        ErrorCode.UNKNOWN_KEY,
        ErrorCode.BAD_SIGNATURE,
    } <= codes


@given(message=signed_messages(), data=st.data())
def test_a_random_bit_flip_is_rejected(message: SignedMessage, data: st.DataObject) -> None:
    sealed = bytearray(seal(message, KEY))
    position = data.draw(st.integers(min_value=0, max_value=len(sealed) * 8 - 1))
    sealed[position // 8] ^= 1 << (position % 8)
    _tamper_is_rejected(bytes(sealed), type(message))


@given(message=signed_messages(), data=st.data())
def test_every_truncation_of_an_envelope_is_rejected(
    message: SignedMessage, data: st.DataObject
) -> None:
    sealed = seal(message, KEY)
    cut = data.draw(st.integers(min_value=0, max_value=len(sealed) - 1))
    assert _tamper_is_rejected(sealed[:cut], type(message)).code == ErrorCode.MALFORMED


def test_all_truncations_of_one_envelope_are_rejected() -> None:
    sealed = seal(REFUSAL, KEY)
    for cut in range(len(sealed)):
        with pytest.raises(ProtocolError) as info:
            decode_envelope(sealed[:cut])
        assert _code(info) == ErrorCode.MALFORMED


@given(message=signed_messages(), extra=st.binary(min_size=1, max_size=4))
def test_trailing_bytes_after_an_envelope_are_rejected(
    message: SignedMessage, extra: bytes
) -> None:
    error = _tamper_is_rejected(seal(message, KEY) + extra, type(message))
    assert error.code == ErrorCode.MALFORMED


@given(message=signed_messages(), data=st.data())
def test_a_signed_truncated_or_extended_body_is_rejected(
    message: SignedMessage, data: st.DataObject
) -> None:
    # The signer signs broken bytes: the signature holds, the body must not.
    body = encode(message)
    cut = data.draw(st.integers(min_value=0, max_value=len(body) - 1))
    for broken in (body[:cut], body + b"\xc0"):
        sealed = seal_bytes(payload_type_of(message), broken, KEY)
        with pytest.raises(ProtocolError) as info:
            open_envelope(sealed, TRUSTED, type(message))
        assert _code(info) == ErrorCode.MALFORMED


def test_a_signed_body_breaking_a_rule_is_an_invalid_field() -> None:
    tree = msgpack.unpackb(encode(REQUEST))
    tree[9] = 4  # quorum above the three targets
    sealed = seal_bytes(PayloadType.QUERY_REQUEST, msgpack.packb(tree), KEY)
    with pytest.raises(ProtocolError) as info:
        open_envelope(sealed, TRUSTED, m.QueryRequest)
    assert _code(info) == ErrorCode.INVALID_FIELD


@given(st.binary(max_size=400))
def test_arbitrary_bytes_raise_only_typed_errors(data: bytes) -> None:
    for expected in MESSAGE_TYPES.values():
        try:
            open_envelope(data, TRUSTED, expected)
        except HansaError:
            continue
        raise AssertionError("random bytes opened")


# --- payload types and keys -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (REFUSAL, m.QueryAnswer),
        (ANSWER, m.QueryRefusal),
        (REQUEST, m.QueryAnswer),
        (CAPABILITIES, m.QueryRequest),
    ],
)
def test_an_envelope_of_the_wrong_type_for_the_endpoint_is_rejected(
    message: SignedMessage, expected: type[msgspec.Struct]
) -> None:
    with pytest.raises(ProtocolError) as info:
        open_envelope(seal(message, KEY), TRUSTED, expected)
    assert _code(info) == ErrorCode.UNKNOWN_PAYLOAD_TYPE


@pytest.mark.parametrize(
    "payload_type",
    [
        "application/vnd.hansa.query-answer.v2+msgpack",
        "application/vnd.hansa.error.v1+msgpack",
        "text/plain",
        "x",
    ],
)
def test_an_unknown_payload_type_is_rejected(payload_type: str) -> None:
    sealed = seal_bytes(payload_type, encode(ANSWER), KEY)
    with pytest.raises(ProtocolError) as info:
        open_envelope(sealed, TRUSTED, m.QueryAnswer)
    assert _code(info) == ErrorCode.UNKNOWN_PAYLOAD_TYPE


def test_a_relabelled_payload_type_breaks_the_signature() -> None:
    # A refusal signed as a refusal, relabelled as another kind with the same bytes.
    sealed = seal(REFUSAL, KEY)
    env = decode_envelope(sealed)
    relabelled = encode_envelope(
        Envelope(
            version=1,
            payload_type=PayloadType.QUERY_ANSWER,
            payload=env.payload,
            key_id=env.key_id,
            signature=env.signature,
        )
    )
    with pytest.raises(SignatureError) as info:
        open_envelope(relabelled, TRUSTED, m.QueryAnswer)
    assert _code(info) == ErrorCode.BAD_SIGNATURE


_UNREADABLE: list[tuple[str, SignedMessage, ErrorCode]] = [
    (
        "NaN literal",
        msgspec.structs.replace(
            REQUEST,
            query=m.Query(
                dataset="trips",
                aggregates=(m.Count(),),
                filters=(m.Filter("zone", m.FilterOp.EQ, (float("nan"),)),),
            ),
        ),
        ErrorCode.INVALID_FIELD,
    ),
    (
        "infinite key",
        msgspec.structs.replace(
            ANSWER, groups=(m.Group(key=(float("inf"),), states=(m.CountState(n=1),)),)
        ),
        ErrorCode.INVALID_FIELD,
    ),
    (
        "rank above one",
        msgspec.structs.replace(
            REQUEST, query=m.Query(dataset="trips", aggregates=(m.Quantiles("fare", (1.5,)),))
        ),
        ErrorCode.INVALID_FIELD,
    ),
    ("over-long reason", msgspec.structs.replace(REFUSAL, reason="r" * 2000), ErrorCode.TOO_LARGE),
    (
        "bad target",
        msgspec.structs.replace(REQUEST, targets=("oslo", "Lyon")),
        ErrorCode.INVALID_FIELD,
    ),
    ("bad responder", msgspec.structs.replace(ANSWER, responder="os lo"), ErrorCode.INVALID_FIELD),
    (
        "empty column",
        msgspec.structs.replace(REQUEST, query=m.Query("trips", (m.Count(""),))),
        ErrorCode.INVALID_FIELD,
    ),
]


@pytest.mark.parametrize(
    ("message", "code"), [u[1:] for u in _UNREADABLE], ids=[u[0] for u in _UNREADABLE]
)
def test_a_validly_signed_body_that_breaks_a_decoding_rule_is_refused(
    message: SignedMessage, code: ErrorCode
) -> None:
    # Meta bounds and names are not checked on construction, so seal signs these;
    # the receiver checks them after the signature.
    sealed = seal(message, KEY)
    with pytest.raises(ProtocolError) as info:
        open_envelope(sealed, TRUSTED, type(message))
    assert _code(info) == code


@given(message=st.binary(max_size=200), flip=st.integers(min_value=0))
def test_verify_signed_is_verify_strict_on_the_combined_input(message: bytes, flip: int) -> None:
    signature = KEY.sign(message)
    pk = KEY.public_key.raw
    assert verify_signed(pk, signature + message)
    assert verify_strict(pk, message, signature)
    tampered = bytearray(signature + message)
    tampered[flip % len(tampered)] ^= 1 << (flip % 8)
    assert not verify_signed(pk, bytes(tampered))
    assert not verify_strict(pk, bytes(tampered[64:]), bytes(tampered[:64]))


def test_verify_signed_refuses_short_inputs_and_keys() -> None:
    signature = KEY.sign(b"")
    pk = KEY.public_key.raw
    assert verify_signed(pk, signature)  # the empty message
    assert not verify_signed(pk, signature[:63])
    assert not verify_signed(pk, b"")
    assert not verify_signed(pk[:31], signature)
    assert not verify_strict(pk, b"", signature[:63])


def test_unsigned_messages_cannot_be_sealed() -> None:
    with pytest.raises(ProtocolError) as info:
        seal(ERROR, KEY)
    assert _code(info) == ErrorCode.UNKNOWN_PAYLOAD_TYPE


def test_an_untrusted_signer_is_an_unknown_key() -> None:
    with pytest.raises(SignatureError) as info:
        open_envelope(seal(REFUSAL, OTHER), TRUSTED, m.QueryRefusal)
    assert _code(info) == ErrorCode.UNKNOWN_KEY


def test_a_key_id_naming_another_trusted_key_is_a_bad_signature() -> None:
    keys = {**TRUSTED, OTHER.key_id: OTHER.public_key}
    env = decode_envelope(seal(REFUSAL, OTHER))
    swapped = encode_envelope(msgspec.structs.replace(env, key_id=KEY.key_id))
    with pytest.raises(SignatureError) as info:
        open_envelope(swapped, keys, m.QueryRefusal)
    assert _code(info) == ErrorCode.BAD_SIGNATURE


# --- strict parsing ----------------------------------------------------------------------------


def _fields(message: SignedMessage = REFUSAL) -> list[Any]:
    fields: list[Any] = msgpack.unpackb(seal(message, KEY))
    return fields


def _raw_envelope(*elements: bytes, header: bytes = b"\x95") -> bytes:
    return header + b"".join(elements)


def _parts(message: SignedMessage = REFUSAL) -> list[bytes]:
    """The five elements of a sealed envelope, each packed on its own (canonical)."""
    return [msgpack.packb(x, use_bin_type=True) for x in _fields(message)]


def test_the_canonical_parts_reassemble_the_envelope() -> None:
    assert _raw_envelope(*_parts()) == seal(REFUSAL, KEY)


def _str16(text: str) -> bytes:
    raw = text.encode()
    return b"\xda" + len(raw).to_bytes(2, "big") + raw


def _bin16(raw: bytes) -> bytes:
    return b"\xc5" + len(raw).to_bytes(2, "big") + raw


def _bin32(raw: bytes) -> bytes:
    return b"\xc6" + len(raw).to_bytes(4, "big") + raw


_WIDE: list[tuple[str, int | None, Any]] = [
    ("array16 header", None, lambda f: b"\xdc\x00\x05"),
    ("array32 header", None, lambda f: b"\xdd\x00\x00\x00\x05"),
    ("uint8 version", 0, lambda f: b"\xcc\x01"),
    ("uint64 version", 0, lambda f: b"\xcf" + (1).to_bytes(8, "big")),
    ("int8 version", 0, lambda f: b"\xd0\x01"),
    ("str16 payload type", 1, lambda f: _str16(f[1])),
    ("bin32 payload", 2, lambda f: _bin32(f[2])),
    ("bin16 key id", 3, lambda f: _bin16(f[3])),
    ("bin16 signature", 4, lambda f: _bin16(f[4])),
]


@pytest.mark.parametrize(("index", "wide"), [w[1:] for w in _WIDE], ids=[w[0] for w in _WIDE])
def test_non_canonical_envelopes_are_rejected(index: int | None, wide: Any) -> None:
    fields = _fields()
    parts = _parts()
    header = b"\x95"
    if index is None:
        header = wide(fields)
    else:
        parts[index] = wide(fields)
    data = _raw_envelope(*parts, header=header)
    # The same logical envelope in other bytes: it would get another message id.
    assert msgpack.unpackb(data) == fields
    assert data != seal(REFUSAL, KEY)
    with pytest.raises(ProtocolError) as info:
        decode_envelope(data)
    assert _code(info) == ErrorCode.MALFORMED
    with pytest.raises(ProtocolError):
        open_envelope(data, TRUSTED, m.QueryRefusal)


@pytest.mark.parametrize("version", [0, 2, 255, 2**32])
def test_other_envelope_versions_are_unsupported(version: int) -> None:
    fields = _fields()
    fields[0] = version
    data = msgpack.packb(fields)
    with pytest.raises(ProtocolError) as info:
        decode_envelope(data)
    assert _code(info) == ErrorCode.UNSUPPORTED_VERSION
    # A future version may have another layout: the version is still reported.
    other = msgpack.packb([version, "x", {"a": 1}])
    with pytest.raises(ProtocolError) as info:
        decode_envelope(other)
    assert _code(info) == ErrorCode.UNSUPPORTED_VERSION


@pytest.mark.parametrize(
    ("edit", "code"),
    [
        (lambda f: dict(enumerate(f)), ErrorCode.MALFORMED),  # a map, not an array
        (lambda f: f[:4], ErrorCode.MALFORMED),  # missing signature
        (lambda f: [*f, b""], ErrorCode.MALFORMED),  # an extra element
        (lambda f: ["1", *f[1:]], ErrorCode.MALFORMED),  # version as str
        (lambda f: [True, *f[1:]], ErrorCode.MALFORMED),  # version as bool
        (lambda f: [f[0], f[1].encode(), *f[2:]], ErrorCode.MALFORMED),  # type as bin
        (lambda f: [*f[:2], f[2].hex(), *f[3:]], ErrorCode.MALFORMED),  # payload as str
        (lambda f: [*f[:3], f[3][:31], f[4]], ErrorCode.INVALID_FIELD),  # key id 31 bytes
        (lambda f: [*f[:3], f[3] + b"\x00", f[4]], ErrorCode.TOO_LARGE),  # key id 33 bytes
        (lambda f: [*f[:4], f[4][:63]], ErrorCode.INVALID_FIELD),  # signature 63 bytes
        (lambda f: [*f[:4], f[4] + b"\x00"], ErrorCode.TOO_LARGE),  # signature 65 bytes
        (lambda f: [f[0], "", *f[2:]], ErrorCode.INVALID_FIELD),  # empty payload type
        (lambda f: [f[0], "t" * 129, *f[2:]], ErrorCode.TOO_LARGE),  # long payload type
    ],
)
def test_malformed_envelopes_are_rejected(edit: Any, code: ErrorCode) -> None:
    data = msgpack.packb(edit(_fields()), use_bin_type=True)
    with pytest.raises(ProtocolError) as info:
        decode_envelope(data)
    assert _code(info) == code
    if code == ErrorCode.TOO_LARGE:
        assert isinstance(info.value, TooLargeError)


def test_envelope_size_limits() -> None:
    sealed = seal(REFUSAL, KEY)
    with pytest.raises(TooLargeError):
        decode_envelope(sealed, max_size=len(sealed) - 1)
    assert decode_envelope(sealed, max_size=len(sealed)).payload == encode(REFUSAL)
    with pytest.raises(TooLargeError):
        open_envelope(sealed, TRUSTED, m.QueryRefusal, max_size=len(sealed) - 1)
    # A payload over the protocol-wide maximum, inside a large enough envelope limit.
    big = seal_bytes(PayloadType.QUERY_REFUSAL, bytes(MAX_PAYLOAD_SIZE + 1), KEY)
    assert len(big) > MAX_ENVELOPE_SIZE - 256
    with pytest.raises(TooLargeError) as info:
        decode_envelope(big, max_size=len(big))
    assert _code(info) == ErrorCode.TOO_LARGE


def test_message_id_is_sha256_of_the_exact_bytes() -> None:
    sealed = seal(REFUSAL, KEY)
    assert message_id(sealed) == hashlib.sha256(sealed).digest()
    assert len(message_id(sealed)) == 32
    assert message_id(seal(ANSWER, KEY)) != message_id(sealed)
