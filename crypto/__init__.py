"""Hansa cryptography: Ed25519 keys, key files, envelopes, Merkle trees, signed notes.

No network I/O and no asyncio. Submodules: :mod:`hansa.crypto.keys`,
:mod:`hansa.crypto.keyfile`, :mod:`hansa.crypto.envelope`,
:mod:`hansa.crypto.merkle`, :mod:`hansa.crypto.note`.
"""

from hansa.crypto.envelope import Opened, open_envelope, seal, seal_bytes
from hansa.crypto.keyfile import read_key_file, read_public_key, write_key_file
from hansa.crypto.keys import PublicKey, SigningKey, key_id, verify_strict

__all__ = [
    "Opened",
    "PublicKey",
    "SigningKey",
    "key_id",
    "open_envelope",
    "read_key_file",
    "read_public_key",
    "seal",
    "seal_bytes",
    "verify_strict",
    "write_key_file",
]
