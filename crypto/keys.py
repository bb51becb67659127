"""Ed25519 keys with strict (libsodium) semantics (``spec/protocol.md`` §3).

Public keys are validated when imported: a key must be the canonical
encoding of a point in the prime-order subgroup (libsodium's
``crypto_core_ed25519_is_valid_point``), which rejects small-order and
non-canonical encodings. Verification is libsodium's
``crypto_sign_open``/``crypto_sign_verify_detached``: it rejects
non-canonical ``S`` (``S >= L``), small-order ``R`` and ``A``, and
non-canonical ``R``.

Key ids: ``key_id(pk) = SHA-256("hansa/key-id/v1\\n" || 0x01 || pk)``, 32
bytes, shown as lower-case hex. The 0x01 byte is the signature-algorithm
identifier (Ed25519), as in C2SP signed notes.
"""

from __future__ import annotations

import hashlib
from typing import Final

import nacl.bindings as sodium
from nacl._sodium import ffi, lib

from hansa.protocol.errors import ErrorCode, SignatureError

__all__ = [
    "PUBLIC_KEY_SIZE",
    "SEED_SIZE",
    "SIGNATURE_SIZE",
    "PublicKey",
    "SigningKey",
    "key_id",
    "verify_signed",
    "verify_strict",
]

_ffi_new: Final = ffi.new_allocator(should_clear_after_alloc=False)
"""Allocates libsodium's output buffers without zeroing them first (it writes them whole)."""

PUBLIC_KEY_SIZE: Final = 32
SEED_SIZE: Final = 32
SIGNATURE_SIZE: Final = 64
_KEY_ID_PREFIX: Final = b"hansa/key-id/v1\n\x01"


def key_id(public_key: bytes) -> bytes:
    """Return the 32-byte Hansa key id of an Ed25519 public key."""
    return hashlib.sha256(_KEY_ID_PREFIX + public_key).digest()


def verify_signed(public_key: bytes, signed: bytes) -> bool:
    """Verify a combined ``signature || message`` with libsodium's strict rules.

    ``public_key`` must already be validated (see :class:`PublicKey`). The
    call goes straight to libsodium's ``crypto_sign_open`` (PyNaCl exposes
    no detached verify) and releases the GIL. It passes no output buffers:
    libsodium's ``crypto_sign_ed25519_open`` skips writing the message and
    its length when they are NULL, so nothing is allocated or copied, and
    nothing is shared between threads.

    Args:
        public_key: 32-byte public key.
        signed: the 64-byte signature followed by the exact signed bytes.

    Returns:
        True if and only if the signature is valid.
    """
    if len(signed) < SIGNATURE_SIZE or len(public_key) != PUBLIC_KEY_SIZE:
        return False
    rc: int = lib.crypto_sign_open(ffi.NULL, ffi.NULL, signed, len(signed), public_key)
    return rc == 0


def verify_strict(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """Verify an Ed25519 signature with libsodium's strict rules.

    ``public_key`` must already be validated (see :class:`PublicKey`). See
    :func:`verify_signed`, which this calls with ``signature + message``.

    Args:
        public_key: 32-byte public key.
        message: the exact signed bytes.
        signature: 64-byte signature.

    Returns:
        True if and only if the signature is valid.
    """
    if len(signature) != SIGNATURE_SIZE:
        return False
    return verify_signed(public_key, signature + message)


class PublicKey:
    """A validated Ed25519 public key with its cached key id.

    Args:
        raw: the 32-byte RFC 8032 encoding.

    Raises:
        SignatureError: (code ``INVALID_KEY``) wrong length, non-canonical
            encoding, not on the curve, or of small order.
    """

    __slots__ = ("key_id", "raw")

    def __init__(self, raw: bytes) -> None:
        if len(raw) != PUBLIC_KEY_SIZE:
            raise SignatureError(
                f"an Ed25519 public key is 32 bytes, got {len(raw)}", ErrorCode.INVALID_KEY
            )
        if not sodium.crypto_core_ed25519_is_valid_point(raw):
            raise SignatureError(
                "public key is not a canonical prime-order Ed25519 point", ErrorCode.INVALID_KEY
            )
        self.raw: bytes = bytes(raw)
        self.key_id: bytes = key_id(self.raw)

    def verify(self, message: bytes, signature: bytes) -> bool:
        """Return whether ``signature`` is valid for ``message`` under this key."""
        return verify_strict(self.raw, message, signature)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"PublicKey({self.raw.hex()})"


class SigningKey:
    """An Ed25519 signing key (seed kept in memory; never printed).

    Args:
        seed: the 32-byte secret seed.

    Raises:
        SignatureError: (code ``INVALID_KEY``) the seed is not 32 bytes.
    """

    __slots__ = ("_secret", "public_key")

    def __init__(self, seed: bytes) -> None:
        if len(seed) != SEED_SIZE:
            raise SignatureError("an Ed25519 seed is 32 bytes", ErrorCode.INVALID_KEY)
        pk, sk = sodium.crypto_sign_seed_keypair(bytes(seed))
        self._secret: bytes = sk
        self.public_key: PublicKey = PublicKey(pk)

    @classmethod
    def generate(cls) -> SigningKey:
        """Create a new key from the operating system's randomness."""
        return cls(sodium.randombytes(SEED_SIZE))

    @property
    def seed(self) -> bytes:
        """The 32-byte secret seed (handle with care)."""
        return sodium.crypto_sign_ed25519_sk_to_seed(self._secret)

    @property
    def key_id(self) -> bytes:
        """The key id of the public half."""
        return self.public_key.key_id

    def sign(self, message: bytes) -> bytes:
        """Return the 64-byte Ed25519 signature of ``message``.

        Calls libsodium's ``crypto_sign`` directly (PyNaCl binds no detached
        signing) and copies out only the signature, not the signed message
        behind it; the call releases the GIL.
        """
        signed = _ffi_new("unsigned char[]", len(message) + SIGNATURE_SIZE)
        if lib.crypto_sign(signed, ffi.NULL, message, len(message), self._secret) != 0:
            raise SignatureError("libsodium could not sign", ErrorCode.INTERNAL)
        signature: bytes = ffi.buffer(signed, SIGNATURE_SIZE)[:]
        return signature

    def __repr__(self) -> str:
        return f"SigningKey(public={self.public_key.raw.hex()})"
