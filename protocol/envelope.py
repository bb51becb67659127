"""The signed envelope and its pre-authentication encoding (``spec/protocol.md`` §4).

An envelope is the MessagePack array::

    [ version: uint (=1), payload_type: str, payload: bin, key_id: bin(32), signature: bin(64) ]

The signature is Ed25519 over ``PAE(payload_type, payload)``, the DSSE v1
pre-authentication encoding::

    "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body

where LEN is the ASCII decimal byte length without leading zeros. The payload
type names the message kind and its version, giving domain separation between
message kinds. Receivers verify the signature over the exact received payload
bytes before decoding them; nothing is ever re-encoded to be verified.

The message id of an envelope is ``SHA-256(envelope bytes)``.
"""

from __future__ import annotations

import enum
import hashlib
from typing import Annotated, Final

import msgspec
from msgspec import Meta

from hansa.protocol.errors import ErrorCode, ProtocolError, TooLargeError

__all__ = [
    "ENVELOPE_VERSION",
    "MAX_ENVELOPE_SIZE",
    "MAX_PAYLOAD_SIZE",
    "Envelope",
    "PayloadType",
    "decode_envelope",
    "encode_envelope",
    "message_id",
    "pae",
]

ENVELOPE_VERSION: Final = 1
MAX_PAYLOAD_SIZE: Final = 4 * 1024 * 1024
"""Largest payload any endpoint accepts (4 MiB); endpoints may set lower limits."""
MAX_ENVELOPE_SIZE: Final = MAX_PAYLOAD_SIZE + 256


class PayloadType(enum.StrEnum):
    """Envelope payload types: message kind plus version (domain separation)."""

    QUERY_REQUEST = "application/vnd.hansa.query-request.v1+msgpack"
    QUERY_ANSWER = "application/vnd.hansa.query-answer.v1+msgpack"
    QUERY_REFUSAL = "application/vnd.hansa.query-refusal.v1+msgpack"
    CAPABILITIES = "application/vnd.hansa.capabilities.v1+msgpack"


class Envelope(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """A signed envelope (spec §4.1). Construct through ``hansa.crypto.seal``."""

    version: int
    payload_type: Annotated[str, Meta(min_length=1, max_length=128)]
    payload: Annotated[bytes, Meta(max_length=MAX_PAYLOAD_SIZE)]
    key_id: Annotated[bytes, Meta(min_length=32, max_length=32)]
    signature: Annotated[bytes, Meta(min_length=64, max_length=64)]


_DSSE_PREFIX: Final = b"DSSEv1 "


def pae(payload_type: str, payload: bytes) -> bytes:
    """Return the DSSE v1 pre-authentication encoding of (type, payload).

    Args:
        payload_type: the envelope's payload type string.
        payload: the exact payload bytes.

    Returns:
        The bytes the Ed25519 signature covers.
    """
    t = payload_type.encode()
    return b"%s%d %s %d %s" % (_DSSE_PREFIX, len(t), t, len(payload), payload)


_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(Envelope)


def encode_envelope(envelope: Envelope) -> bytes:
    """Serialize an envelope to its wire bytes."""
    return _encoder.encode(envelope)


def decode_envelope(data: bytes, *, max_size: int = MAX_ENVELOPE_SIZE) -> Envelope:
    """Parse envelope bytes strictly; the signature is *not* checked here.

    Args:
        data: the received bytes.
        max_size: the endpoint's size limit.

    Returns:
        The parsed envelope.

    Raises:
        TooLargeError: ``data`` is longer than ``max_size``.
        ProtocolError: malformed bytes, trailing bytes, or an unsupported version.
    """
    if len(data) > max_size:
        raise TooLargeError(f"envelope of {len(data)} bytes exceeds the limit of {max_size}")
    try:
        env = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"malformed envelope: {exc}") from exc
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"invalid envelope: {exc}") from exc
    if env.version != ENVELOPE_VERSION:
        raise ProtocolError(
            f"envelope version {env.version} is not supported", ErrorCode.UNSUPPORTED_VERSION
        )
    return env


def message_id(envelope_bytes: bytes) -> bytes:
    """Return the message id: SHA-256 of the exact envelope bytes."""
    return hashlib.sha256(envelope_bytes).digest()
