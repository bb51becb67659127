"""Strict MessagePack codec for message bodies (``spec/protocol.md`` §5).

``encode`` produces the canonical body bytes of a message; ``decode`` parses
body bytes into the struct type a payload type names, translating every
msgspec failure into a :class:`~hansa.protocol.errors.ProtocolError`.
"""

from __future__ import annotations

from typing import Any, Final, TypeVar

import msgspec

from hansa.protocol.envelope import MAX_PAYLOAD_SIZE, PayloadType
from hansa.protocol.errors import ErrorCode, ProtocolError, TooLargeError
from hansa.protocol.messages import (
    Capabilities,
    ErrorMessage,
    QueryAnswer,
    QueryRefusal,
    QueryRequest,
)

__all__ = ["MESSAGE_TYPES", "Message", "decode", "decode_as", "encode", "payload_type_of"]

Message = QueryRequest | QueryAnswer | QueryRefusal | Capabilities | ErrorMessage
"""Every top-level message body."""

SignedMessage = QueryRequest | QueryAnswer | QueryRefusal | Capabilities

M = TypeVar("M", bound=msgspec.Struct)

MESSAGE_TYPES: Final[dict[PayloadType, type[SignedMessage]]] = {
    PayloadType.QUERY_REQUEST: QueryRequest,
    PayloadType.QUERY_ANSWER: QueryAnswer,
    PayloadType.QUERY_REFUSAL: QueryRefusal,
    PayloadType.CAPABILITIES: Capabilities,
}
_PAYLOAD_TYPES: Final[dict[type[msgspec.Struct], PayloadType]] = {
    cls: pt for pt, cls in MESSAGE_TYPES.items()
}
_encoder: Final = msgspec.msgpack.Encoder()
_decoders: dict[type[Any], msgspec.msgpack.Decoder[Any]] = {}


def encode(message: msgspec.Struct) -> bytes:
    """Encode a message body to MessagePack bytes."""
    return _encoder.encode(message)


def payload_type_of(message: msgspec.Struct) -> PayloadType:
    """Return the envelope payload type for a signed message.

    Raises:
        ProtocolError: the message kind is never carried in an envelope.
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
        cls: the expected struct type.
        max_size: a size limit in bytes.

    Returns:
        The decoded, validated message.

    Raises:
        TooLargeError: ``data`` exceeds ``max_size``.
        ProtocolError: malformed bytes, trailing bytes, wrong tag or type, an
            unknown field, a limit declared in the schema or a cross-field rule.
    """
    if len(data) > max_size:
        raise TooLargeError(f"body of {len(data)} bytes exceeds the limit of {max_size}")
    decoder = _decoders.get(cls)
    if decoder is None:
        decoder = _decoders[cls] = msgspec.msgpack.Decoder(cls)
    try:
        result: M = decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"malformed {cls.__name__}: {exc}") from exc
    except msgspec.ValidationError as exc:
        text = str(exc)
        if "at most length" in text or "length <=" in text:
            raise TooLargeError(f"invalid {cls.__name__}: {text}") from exc
        raise ProtocolError(f"invalid {cls.__name__}: {text}") from exc
    return result


def decode(payload_type: str, data: bytes) -> SignedMessage:
    """Decode a signed body according to its envelope payload type.

    Raises:
        ProtocolError: unknown payload type, or any failure of :func:`decode_as`.
    """
    try:
        cls = MESSAGE_TYPES[PayloadType(payload_type)]
    except ValueError:
        raise ProtocolError(
            f"unknown payload type {payload_type[:64]!r}", ErrorCode.UNKNOWN_PAYLOAD_TYPE
        ) from None
    return decode_as(data, cls)
