"""Strict MessagePack codec for message bodies (``spec/protocol.md`` §5).

``encode`` produces the canonical body bytes of a message; ``decode`` parses
body bytes into the struct type a payload type names, translating every
failure into a :class:`~hansa.protocol.errors.ProtocolError`:

- ``MALFORMED``: not exactly one MessagePack value (truncated, trailing
  bytes, invalid UTF-8), or not the expected shape: a map where an array is
  expected (so a duplicate-key map is rejected wherever it appears), a wrong
  type, a wrong tag, a missing or an unknown extra element, an ext value;
- ``TOO_LARGE`` (:class:`~hansa.protocol.errors.TooLargeError`): the body,
  or a string, byte string or sequence in it, exceeds its declared maximum;
- ``INVALID_FIELD``: a well-typed value that breaks a declared constraint
  (pattern, range, enum) or a cross-field rule of the message;
- ``UNKNOWN_PAYLOAD_TYPE``: a payload type this codec does not know.

Non-minimal integer widths are accepted in bodies: bodies are signed as
exact bytes and never re-encoded (spec §4.2), so they cannot be malleated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, TypeVar

import msgspec

from hansa.protocol.envelope import MAX_PAYLOAD_SIZE, PayloadType, _as_protocol_error
from hansa.protocol.errors import ErrorCode, ProtocolError, TooLargeError
from hansa.protocol.messages import (
    AddCheckpoint,
    AuditRequest,
    AuditResponse,
    Capabilities,
    ErrorMessage,
    QueryAnswer,
    QueryRefusal,
    QueryRequest,
    name_check,
)

__all__ = [
    "MESSAGE_TYPES",
    "Message",
    "SignedMessage",
    "decode",
    "decode_as",
    "encode",
    "payload_type_of",
]

SignedMessage = (
    QueryRequest | QueryAnswer | QueryRefusal | Capabilities | AuditRequest | AuditResponse
)
"""Every body that travels inside a signed envelope."""

Message = SignedMessage | ErrorMessage | AddCheckpoint
"""Every top-level message body."""

M = TypeVar("M", bound=msgspec.Struct)

MESSAGE_TYPES: Final[dict[PayloadType, type[SignedMessage]]] = {
    PayloadType.QUERY_REQUEST: QueryRequest,
    PayloadType.QUERY_ANSWER: QueryAnswer,
    PayloadType.QUERY_REFUSAL: QueryRefusal,
    PayloadType.CAPABILITIES: Capabilities,
    PayloadType.AUDIT_REQUEST: AuditRequest,
    PayloadType.AUDIT_RESPONSE: AuditResponse,
}
_PAYLOAD_TYPES: Final[dict[type[msgspec.Struct], PayloadType]] = {
    cls: pt for pt, cls in MESSAGE_TYPES.items()
}
_encoder: Final = msgspec.msgpack.Encoder()
_Decoding = tuple[Callable[[bytes], Any], Callable[[Any], None] | None]
_decoders: dict[type[Any], _Decoding] = {}
"""Per struct type: its decoder and the check of the names it carries."""


def encode(message: msgspec.Struct) -> bytes:
    """Encode a message body to MessagePack bytes.

    The encoding is deterministic: bodies hold no maps, integers take their
    shortest form and floats are always float64.

    NOTE: the schema's ``Meta`` constraints (lengths, ranges, finite
    floats) and the name shapes are checked only when decoding; only the
    ``__post_init__`` cross-field rules run on construction too. A message
    built in Python with, say, a malformed identifier or a NaN encodes fine
    and is then refused by its receiver.

    Args:
        message: any wire struct (top-level or nested).

    Returns:
        The body bytes.

    Raises:
        ProtocolError: (``INVALID_FIELD``) a value MessagePack cannot carry,
            such as an integer outside ``[-2**63, 2**64 - 1]``.
    """
    try:
        return _encoder.encode(message)
    except (msgspec.EncodeError, OverflowError, TypeError, ValueError) as exc:
        raise ProtocolError(
            f"cannot encode {type(message).__name__}: {exc}", ErrorCode.INVALID_FIELD
        ) from exc


def payload_type_of(message: msgspec.Struct) -> PayloadType:
    """Return the envelope payload type for a signed message.

    Args:
        message: a top-level signed body.

    Returns:
        The payload type it travels under.

    Raises:
        ProtocolError: (``UNKNOWN_PAYLOAD_TYPE``) the message kind is never
            carried in an envelope.
    """
    try:
        return _PAYLOAD_TYPES[type(message)]
    except KeyError:
        raise ProtocolError(
            f"{type(message).__name__} is not a signed message", ErrorCode.UNKNOWN_PAYLOAD_TYPE
        ) from None


def decode_as(data: bytes, cls: type[M], *, max_size: int = MAX_PAYLOAD_SIZE) -> M:
    """Strictly decode ``data`` as exactly one ``cls`` value.

    Args:
        data: body bytes.
        cls: the expected struct type (any wire struct, nested ones included).
        max_size: a size limit in bytes.

    Returns:
        The decoded, validated message.

    Raises:
        TooLargeError: ``data`` exceeds ``max_size``, or a field exceeds its
            declared maximum (``TOO_LARGE``).
        ProtocolError: ``MALFORMED`` for bytes that are not exactly one
            ``cls`` value; ``INVALID_FIELD`` for a broken constraint or
            cross-field rule (see the module docstring).
    """
    if len(data) > max_size:
        raise TooLargeError(f"body of {len(data)} bytes exceeds the limit of {max_size}")
    decoding = _decoders.get(cls)
    if decoding is None:
        decoding = _decoders[cls] = (msgspec.msgpack.Decoder(cls).decode, name_check(cls))
    decode_body, check_names = decoding
    try:
        result: M = decode_body(data)
    except (msgspec.MsgspecError, ValueError) as exc:
        # ValueError: msgspec lets UnicodeDecodeError through for invalid UTF-8.
        raise _as_protocol_error(exc, cls.__name__) from exc
    if check_names is not None:
        # Every name in the value, in one batch (see hansa.protocol.messages).
        try:
            check_names(result)
        except ValueError as exc:
            raise ProtocolError(f"invalid {cls.__name__}: {exc}", ErrorCode.INVALID_FIELD) from exc
    return result


def decode(payload_type: str, data: bytes, *, max_size: int = MAX_PAYLOAD_SIZE) -> SignedMessage:
    """Decode a signed body according to its envelope payload type.

    Args:
        payload_type: the envelope's payload type.
        data: the body bytes (already verified by the caller).
        max_size: a size limit in bytes.

    Returns:
        The decoded message of the type ``payload_type`` names.

    Raises:
        ProtocolError: ``UNKNOWN_PAYLOAD_TYPE`` for a payload type not in
            :data:`MESSAGE_TYPES`, or any failure of :func:`decode_as`.
    """
    try:
        cls = MESSAGE_TYPES[PayloadType(payload_type)]
    except ValueError:
        raise ProtocolError(
            f"unknown payload type {payload_type[:64]!r}", ErrorCode.UNKNOWN_PAYLOAD_TYPE
        ) from None
    return decode_as(data, cls, max_size=max_size)
