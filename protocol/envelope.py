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
import re
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
    "pae_prefix",
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
    AUDIT_REQUEST = "application/vnd.hansa.audit-request.v1+msgpack"
    AUDIT_RESPONSE = "application/vnd.hansa.audit-response.v1+msgpack"


class Envelope(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """A signed envelope (spec §4.1). Construct through ``hansa.crypto.seal``."""

    version: int
    payload_type: Annotated[str, Meta(min_length=1, max_length=128)]
    payload: Annotated[bytes, Meta(max_length=MAX_PAYLOAD_SIZE)]
    key_id: Annotated[bytes, Meta(min_length=32, max_length=32)]
    signature: Annotated[bytes, Meta(min_length=64, max_length=64)]


_DSSE_PREFIX: Final = b"DSSEv1 "


def pae_prefix(payload_type: str) -> bytes:
    """Return the start of the PAE that depends on the payload type alone.

    ``pae(t, body) == pae_prefix(t) + b"%d " % len(body) + body``; a
    receiver computes the prefix once per payload type.

    Args:
        payload_type: the envelope's payload type string.

    Returns:
        ``"DSSEv1" SP LEN(type) SP type SP``.
    """
    t = payload_type.encode()
    return b"%s%d %s " % (_DSSE_PREFIX, len(t), t)


def pae(payload_type: str, payload: bytes) -> bytes:
    """Return the DSSE v1 pre-authentication encoding of (type, payload).

    Args:
        payload_type: the envelope's payload type string.
        payload: the exact payload bytes.

    Returns:
        The bytes the Ed25519 signature covers.
    """
    return b"%s%d %s" % (pae_prefix(payload_type), len(payload), payload)


_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(Envelope)


class _VersionProbe(msgspec.Struct, array_like=True):
    """The first element of any envelope, whatever its version's layout."""

    version: int


_probe: Final = msgspec.msgpack.Decoder(_VersionProbe)

# msgspec reports every failure as text; these patterns sort its messages
# into the wire codes of spec §9. Tests pin each pattern to a crafted input,
# so a msgspec upgrade that rewords a message fails loudly.
_TOO_LONG: Final = re.compile(r"Expected `[^`]+` of length <= \d+")
_BAD_SHAPE: Final = re.compile(
    r"Expected `[^`]+`, got `"  # wrong MessagePack type (map for array, bin for str, ...)
    r"|Expected `array` of at (?:most|least) length"  # unknown extra or missing element
    r"|Expected `array` of length \d+, got"  # a fixed-size tuple with the wrong arity
    r"|Invalid value "  # a tag that names another message kind
)
_MAX_DETAIL: Final = 200
"""Longest msgspec detail quoted in an error (it may echo attacker-chosen text)."""


def _as_protocol_error(exc: Exception, what: str) -> ProtocolError:
    """Translate a decoding failure into the typed error with its wire code.

    NOTE: package-private; :mod:`hansa.protocol.codec` uses it for bodies.

    Args:
        exc: the failure raised while decoding (msgspec or UTF-8).
        what: what was being decoded, for the message.

    Returns:
        ``TooLargeError`` (``TOO_LARGE``) for a string, byte string or
        sequence over its declared maximum; ``ProtocolError`` with
        ``INVALID_FIELD`` for a well-typed value that breaks a constraint or
        a cross-field rule; ``ProtocolError`` with ``MALFORMED`` otherwise.
    """
    text = str(exc)
    detail = text if len(text) <= _MAX_DETAIL else text[:_MAX_DETAIL] + "…"
    if isinstance(exc, msgspec.ValidationError):
        if isinstance(exc.__cause__, ValueError | TypeError):
            # Raised by a __post_init__ cross-field rule.
            return ProtocolError(f"invalid {what}: {detail}", ErrorCode.INVALID_FIELD)
        if _TOO_LONG.match(text):
            return TooLargeError(f"{what} too large: {detail}")
        if _BAD_SHAPE.match(text):
            return ProtocolError(f"malformed {what}: {detail}", ErrorCode.MALFORMED)
        return ProtocolError(f"invalid {what}: {detail}", ErrorCode.INVALID_FIELD)
    return ProtocolError(f"malformed {what}: {detail}", ErrorCode.MALFORMED)


def encode_envelope(envelope: Envelope) -> bytes:
    """Serialize an envelope to its canonical wire bytes.

    Args:
        envelope: the envelope to serialize.

    Returns:
        The MessagePack array with shortest-form headers.
    """
    return _encoder.encode(envelope)


def decode_envelope(data: bytes, *, max_size: int = MAX_ENVELOPE_SIZE) -> Envelope:
    """Parse envelope bytes strictly; the signature is *not* checked here.

    Only the canonical encoding is accepted (shortest-form integers and
    headers, as :func:`encode_envelope` writes them). The envelope fields
    other than the payload are not signed, so without this rule anyone could
    re-encode a signed envelope into different bytes, and so a different
    :func:`message_id`, that still verifies.

    Args:
        data: the received bytes.
        max_size: the endpoint's size limit.

    Returns:
        The parsed envelope.

    Raises:
        TooLargeError: ``data`` is longer than ``max_size``, or a field is
            longer than its declared maximum.
        ProtocolError: ``UNSUPPORTED_VERSION`` when the first element is a
            version other than 1; ``MALFORMED`` for bytes that are not exactly
            one canonical envelope (truncated, trailing bytes, a map, a wrong
            type, a missing or extra element); ``INVALID_FIELD`` for a
            well-typed field that breaks a constraint.
    """
    if len(data) > max_size:
        raise TooLargeError(f"envelope of {len(data)} bytes exceeds the limit of {max_size}")
    try:
        env = _decoder.decode(data)
    except (msgspec.MsgspecError, ValueError) as exc:
        _check_version(data)
        raise _as_protocol_error(exc, "envelope") from exc
    if env.version != ENVELOPE_VERSION:
        raise _unsupported(env.version)
    if _encoder.encode(env) != data:
        raise ProtocolError("envelope is not canonically encoded", ErrorCode.MALFORMED)
    return env


def _unsupported(version: int) -> ProtocolError:
    return ProtocolError(
        f"envelope version {version} is not supported", ErrorCode.UNSUPPORTED_VERSION
    )


def _check_version(data: bytes) -> None:
    """Report a readable version other than ours ahead of any layout error."""
    try:
        version = _probe.decode(data).version
    except (msgspec.MsgspecError, ValueError):
        return
    if version != ENVELOPE_VERSION:
        raise _unsupported(version)


def message_id(envelope_bytes: bytes) -> bytes:
    """Return the message id: SHA-256 of the exact envelope bytes.

    Args:
        envelope_bytes: the envelope as received or sent.

    Returns:
        The 32-byte digest.
    """
    return hashlib.sha256(envelope_bytes).digest()
