"""Sealing and opening signed envelopes (``spec/protocol.md`` §4.2).

``seal`` encodes a message body, signs ``PAE(payload_type, body)`` and returns
the envelope bytes. ``open_envelope`` is the receive path and the hot path:
parse the envelope, look up the signer by key id, verify the signature over
the exact received payload bytes, and only then decode the body.

NOTE: ``seal`` signs what it is given. The schema's bounds and name shapes
are checked when decoding, not when a message is built (see
``hansa.protocol.messages``), so a sender that builds messages from
untrusted values can run ``decode_as(encode(m), type(m))`` first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Final, Generic, TypeVar

import msgspec

from hansa.crypto.keys import PublicKey, SigningKey, verify_signed
from hansa.protocol.codec import MESSAGE_TYPES, decode_as, encode, payload_type_of
from hansa.protocol.envelope import (
    ENVELOPE_VERSION,
    MAX_ENVELOPE_SIZE,
    Envelope,
    decode_envelope,
    encode_envelope,
    message_id,
    pae_prefix,
)
from hansa.protocol.errors import ErrorCode, ProtocolError, SignatureError

__all__ = ["KeyLookup", "Opened", "open_envelope", "seal", "seal_bytes"]

M = TypeVar("M", bound=msgspec.Struct)

KeyLookup = Mapping[bytes, PublicKey] | Callable[[bytes], PublicKey | None]
"""Where the receiver finds trusted keys: a mapping or a function of the key id."""


class Opened(msgspec.Struct, Generic[M], frozen=True):
    """A verified envelope and its decoded body (a msgspec Struct: cheap to build).

    Attributes:
        message: the decoded body.
        envelope: the parsed envelope (payload bytes included).
        signer: the public key that signed it.
        message_id: SHA-256 of the envelope bytes.
    """

    message: M
    envelope: Envelope
    signer: PublicKey
    message_id: bytes


def seal_bytes(payload_type: str, payload: bytes, key: SigningKey) -> bytes:
    """Sign already-encoded payload bytes and return the envelope bytes."""
    known = _BY_PAYLOAD_TYPE.get(payload_type)
    prefix = pae_prefix(payload_type) if known is None else known[1]
    signature = key.sign(b"%s%d %s" % (prefix, len(payload), payload))  # PAE(type, payload)
    return encode_envelope(
        Envelope(
            version=ENVELOPE_VERSION,
            payload_type=payload_type,
            payload=payload,
            key_id=key.key_id,
            signature=signature,
        )
    )


def seal(message: msgspec.Struct, key: SigningKey) -> bytes:
    """Encode ``message``, sign it with ``key`` and return the envelope bytes.

    Raises:
        ProtocolError: the message kind is not one carried in envelopes, or
            it holds an integer MessagePack cannot carry.
    """
    return seal_bytes(payload_type_of(message), encode(message), key)


_BY_PAYLOAD_TYPE: Final[dict[str, tuple[type[msgspec.Struct], bytes]]] = {
    pt.value: (cls, pae_prefix(pt.value)) for pt, cls in MESSAGE_TYPES.items()
}
"""Per payload type: its body type and the start of its PAE (spec §4.2)."""


def open_envelope(
    data: bytes,
    keys: KeyLookup,
    expected: type[M],
    *,
    max_size: int = MAX_ENVELOPE_SIZE,
) -> Opened[M]:
    """Verify envelope bytes and decode the body as ``expected``.

    Args:
        data: the exact received envelope bytes.
        keys: trusted keys by key id.
        expected: the body type this endpoint accepts.
        max_size: the endpoint's size limit in bytes.

    Returns:
        The verified message.

    Raises:
        TooLargeError: ``data`` exceeds ``max_size``.
        ProtocolError: malformed envelope or body, or a payload type other
            than the one ``expected`` is carried under.
        SignatureError: unknown key id (``UNKNOWN_KEY``) or a signature that
            does not verify (``BAD_SIGNATURE``).
    """
    env = decode_envelope(data, max_size=max_size)
    known = _BY_PAYLOAD_TYPE.get(env.payload_type)
    if known is None:
        raise ProtocolError(
            f"unknown payload type {env.payload_type[:64]!r}", ErrorCode.UNKNOWN_PAYLOAD_TYPE
        )
    cls, prefix = known
    if cls is not expected:
        raise ProtocolError(
            f"expected a {expected.__name__}, got {env.payload_type!r}",
            ErrorCode.UNKNOWN_PAYLOAD_TYPE,
        )
    signer = keys(env.key_id) if callable(keys) else keys.get(env.key_id)
    if signer is None:
        raise SignatureError(f"unknown signer key id {env.key_id.hex()}", ErrorCode.UNKNOWN_KEY)
    payload = env.payload
    # libsodium's combined input, signature || PAE(type, payload), built in one
    # step from the cached PAE prefix: one copy of the payload, no output buffer.
    signed = b"%s%s%d %s" % (env.signature, prefix, len(payload), payload)
    if not verify_signed(signer.raw, signed):
        raise SignatureError("envelope signature does not verify", ErrorCode.BAD_SIGNATURE)
    message = decode_as(payload, expected)
    return Opened(message=message, envelope=env, signer=signer, message_id=message_id(data))
