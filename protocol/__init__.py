"""Hansa wire protocol: typed messages, strict codec, envelope, freshness.

Pure: bytes in, typed values out, or a typed error. No I/O, no asyncio.
"""

from hansa.protocol.codec import (
    MESSAGE_TYPES,
    Message,
    SignedMessage,
    decode,
    decode_as,
    encode,
    payload_type_of,
)
from hansa.protocol.envelope import (
    ENVELOPE_VERSION,
    Envelope,
    PayloadType,
    decode_envelope,
    encode_envelope,
    message_id,
    pae,
)
from hansa.protocol.errors import (
    ErrorCode,
    FreshnessError,
    HansaError,
    ProtocolError,
    SignatureError,
    TooLargeError,
)
from hansa.protocol.freshness import FreshnessLimits, ReplayGuard

__all__ = [
    "ENVELOPE_VERSION",
    "MESSAGE_TYPES",
    "Envelope",
    "ErrorCode",
    "FreshnessError",
    "FreshnessLimits",
    "HansaError",
    "Message",
    "PayloadType",
    "ProtocolError",
    "ReplayGuard",
    "SignatureError",
    "SignedMessage",
    "TooLargeError",
    "decode",
    "decode_as",
    "decode_envelope",
    "encode",
    "encode_envelope",
    "message_id",
    "pae",
    "payload_type_of",
]
