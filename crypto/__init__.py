"""Hansa cryptography: Ed25519 keys, envelopes, Merkle trees, signed notes.

No network I/O and no asyncio.
"""

from hansa.crypto.envelope import Opened, open_envelope, seal, seal_bytes
from hansa.crypto.keys import PublicKey, SigningKey, key_id, verify_strict

__all__ = [
    "Opened",
    "PublicKey",
    "SigningKey",
    "key_id",
    "open_envelope",
    "seal",
    "seal_bytes",
    "verify_strict",
]
