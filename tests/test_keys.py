"""Ed25519 keys: key ids, key admission (strict), signing and verification."""

from __future__ import annotations

import hashlib

import nacl.bindings as sodium
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hansa.crypto.keys import (
    PUBLIC_KEY_SIZE,
    SIGNATURE_SIZE,
    PublicKey,
    SigningKey,
    key_id,
    verify_strict,
)
from hansa.protocol.errors import ErrorCode, SignatureError

# RFC 8032 §7.1 TEST 1 (hard-coded so this file runs without ../shared).
RFC_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC_PK = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
# key_id(RFC_PK), computed once and pinned: a change here breaks every roster.
RFC_KEY_ID = "76e5a779ef1305dac49ad495fe9a6a1c4cc7fb630530e5f79c536f68e8690c19"

# The eight points of the 8-torsion subgroup, canonically encoded (the list
# libsodium and ed25519-dalek block): identity, order 2, two of order 4 and
# four of order 8.
SMALL_ORDER = [
    "0100000000000000000000000000000000000000000000000000000000000000",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000080",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
]
P = 2**255 - 19
# Every encoding with y >= p (non-canonical), with either sign bit; includes
# the speccheck non-canonical key ecff..ff (cases 10, 11).
NON_CANONICAL = [
    (y | sign << 255).to_bytes(32, "little") for y in range(P, 2**255) for sign in (0, 1)
]
# Canonical y with the sign bit set although x = 0 (identity, order 2).
SIGN_BIT_ON_ZERO_X = [
    "0100000000000000000000000000000000000000000000000000000000000080",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
]

KEY = SigningKey(bytes(range(32)))


def _assert_invalid_key(raw: bytes) -> None:
    with pytest.raises(SignatureError) as info:
        PublicKey(raw)
    assert info.value.code is ErrorCode.INVALID_KEY


def test_key_id_known_answer() -> None:
    assert key_id(RFC_PK).hex() == RFC_KEY_ID
    assert PublicKey(RFC_PK).key_id.hex() == RFC_KEY_ID
    assert SigningKey(RFC_SEED).key_id.hex() == RFC_KEY_ID


def test_key_id_is_the_documented_hash() -> None:
    # spec: SHA-256("hansa/key-id/v1\n" || 0x01 || pk)
    assert key_id(RFC_PK) == hashlib.sha256(b"hansa/key-id/v1\n\x01" + RFC_PK).digest()
    assert key_id(RFC_PK) != key_id(KEY.public_key.raw)


@pytest.mark.parametrize("hex_point", SMALL_ORDER)
def test_small_order_keys_are_rejected(hex_point: str) -> None:
    raw = bytes.fromhex(hex_point)
    # Check the list itself: doubling three times gives the identity.
    acc = raw
    for _ in range(3):
        acc = sodium.crypto_core_ed25519_add(acc, acc)
    assert acc == bytes.fromhex(SMALL_ORDER[0])
    _assert_invalid_key(raw)


@pytest.mark.parametrize("hex_point", SMALL_ORDER[1:])
def test_mixed_order_keys_are_rejected(hex_point: str) -> None:
    # An honest key plus a torsion point: decodes fine, is not small, but is
    # outside the prime-order subgroup (speccheck's "mixed" A).
    mixed = sodium.crypto_core_ed25519_add(KEY.public_key.raw, bytes.fromhex(hex_point))
    assert mixed != KEY.public_key.raw
    _assert_invalid_key(mixed)


@pytest.mark.parametrize(
    "raw", NON_CANONICAL, ids=lambda raw: raw.hex()[:4] + ".." + raw.hex()[-2:]
)
def test_non_canonical_keys_are_rejected(raw: bytes) -> None:
    _assert_invalid_key(raw)


@pytest.mark.parametrize("hex_point", SIGN_BIT_ON_ZERO_X)
def test_negative_zero_x_is_rejected(hex_point: str) -> None:
    _assert_invalid_key(bytes.fromhex(hex_point))


@pytest.mark.parametrize("size", [0, 1, 31, 33, 64])
def test_wrong_public_key_length(size: int) -> None:
    _assert_invalid_key(bytes(size))


@pytest.mark.parametrize("size", [0, 31, 33, 64])
def test_wrong_seed_length(size: int) -> None:
    with pytest.raises(SignatureError) as info:
        SigningKey(bytes(size))
    assert info.value.code is ErrorCode.INVALID_KEY


def test_verify_strict_wrong_lengths_are_false() -> None:
    sig = KEY.sign(b"m")
    pk = KEY.public_key.raw
    assert verify_strict(pk, b"m", sig)
    assert not verify_strict(pk, b"m", sig[:-1])
    assert not verify_strict(pk, b"m", sig + b"\x00")
    assert not verify_strict(pk[:-1], b"m", sig)
    assert not verify_strict(pk + b"\x00", b"m", sig)
    assert not verify_strict(pk, b"m", b"")


def test_sign_verify_round_trip_and_determinism() -> None:
    sig = KEY.sign(b"hello")
    assert len(sig) == SIGNATURE_SIZE
    assert sig == KEY.sign(b"hello")  # RFC 8032 signatures are deterministic
    assert KEY.public_key.verify(b"hello", sig)
    assert not KEY.public_key.verify(b"hello!", sig)
    other = SigningKey(bytes(32)).public_key
    assert not other.verify(b"hello", sig)


def test_seed_and_public_key_round_trip() -> None:
    assert SigningKey(RFC_SEED).public_key.raw == RFC_PK
    assert SigningKey(KEY.seed).public_key == KEY.public_key
    generated = SigningKey.generate()
    assert len(generated.public_key.raw) == PUBLIC_KEY_SIZE
    assert generated.public_key != KEY.public_key


def test_reprs_never_show_the_seed() -> None:
    assert KEY.seed.hex() not in repr(KEY)
    assert KEY.public_key.raw.hex() in repr(KEY)


def test_public_key_equality_and_hash() -> None:
    a, b = PublicKey(RFC_PK), PublicKey(bytes(RFC_PK))
    assert a == b and hash(a) == hash(b)
    assert a != KEY.public_key
    assert a != RFC_PK  # a PublicKey never equals raw bytes


@given(raw=st.binary(min_size=32, max_size=32))
def test_arbitrary_32_bytes_either_admitted_or_invalid_key(raw: bytes) -> None:
    try:
        key = PublicKey(raw)
    except SignatureError as exc:
        assert exc.code is ErrorCode.INVALID_KEY
        assert not sodium.crypto_core_ed25519_is_valid_point(raw)
    else:
        assert key.raw == raw
        assert sodium.crypto_core_ed25519_is_valid_point(raw)


@given(message=st.binary(max_size=256), data=st.data())
def test_flipping_any_message_bit_breaks_the_signature(message: bytes, data: st.DataObject) -> None:
    sig = KEY.sign(message)
    assert KEY.public_key.verify(message, sig)
    if message:
        bit = data.draw(st.integers(0, 8 * len(message) - 1))
        flipped = bytearray(message)
        flipped[bit // 8] ^= 1 << (bit % 8)
        assert not KEY.public_key.verify(bytes(flipped), sig)
    # Appending or dropping bytes is also a different message.
    assert not KEY.public_key.verify(message + b"\x00", sig)
    if message:
        assert not KEY.public_key.verify(message[:-1], sig)


@given(message=st.binary(max_size=256), bit=st.integers(0, 8 * SIGNATURE_SIZE - 1))
def test_flipping_any_signature_bit_breaks_the_signature(message: bytes, bit: int) -> None:
    sig = bytearray(KEY.sign(message))
    sig[bit // 8] ^= 1 << (bit % 8)
    assert not KEY.public_key.verify(message, bytes(sig))
