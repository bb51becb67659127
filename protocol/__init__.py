"""Hansa wire protocol: typed messages, strict codec, envelope, freshness.

Pure: bytes in, typed values out, or a typed error. No I/O, no asyncio.
"""

from hansa.protocol.codec import Message, decode, decode_as, encode, payload_type_of
from hansa.protocol.envelope import Envelope, PayloadType, decode_envelope, message_id, pae
from hansa.protocol.errors import ErrorCode, HansaError, ProtocolError
from hansa.protocol.freshness import FreshnessLimits, ReplayGuard

__all__ = [
    "Envelope",
    "ErrorCode",
    "FreshnessLimits",
    "HansaError",
    "Message",
    "PayloadType",
    "ProtocolError",
    "ReplayGuard",
    "decode",
    "decode_as",
    "decode_envelope",
    "encode",
    "message_id",
    "pae",
    "payload_type_of",
]
