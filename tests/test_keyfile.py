"""Key files: layout, permissions, sealing, atomic writes and every refusal."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import nacl.exceptions
import nacl.pwhash.argon2id as argon2id
import nacl.secret
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hansa.crypto.keyfile import (
    MAGIC_LINE,
    MAX_FILE_SIZE,
    KeyFileInfo,
    inspect_key_file,
    is_encrypted,
    read_key_file,
    read_public_key,
    write_key_file,
)
from hansa.crypto.keys import SigningKey
from hansa.protocol.errors import ErrorCode, KeyFileError

# The lowest limits libsodium allows keep the tests fast; production files
# use the module defaults.
OPS, MEM = argon2id.OPSLIMIT_MIN, argon2id.MEMLIMIT_MIN
SEED = bytes(range(32))
KEY = SigningKey(SEED)
PASS = b"correct horse battery staple"
OTHER_KEY = SigningKey(bytes(range(1, 33)))
# An order-8 point: a valid-looking 32 bytes that is never an acceptable key.
SMALL_ORDER_PK = "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa"

needs_posix_modes = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    path = tmp_path / "plain.key"
    write_key_file(path, KEY)
    return path


@pytest.fixture
def sealed(tmp_path: Path) -> Path:
    path = tmp_path / "sealed.key"
    write_key_file(path, KEY, passphrase=PASS, opslimit=OPS, memlimit=MEM)
    return path


@pytest.fixture
def umask_zero() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _rewrite(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


def _error(path: Path, passphrase: bytes | None = PASS) -> KeyFileError:
    with pytest.raises(KeyFileError) as info:
        read_key_file(path, passphrase=passphrase)
    err = info.value
    assert err.code is ErrorCode.KEY_FILE
    # Secrets never reach a message.
    assert SEED.hex() not in err.message
    assert PASS.decode() not in err.message
    assert "\n" not in err.message
    return err


# --- round trips and layout ---------------------------------------------------


def test_plain_round_trip_and_exact_layout(plain: Path) -> None:
    assert read_key_file(plain).seed == SEED
    assert plain.read_text() == (
        "hansa-key v1\n"
        "kind: ed25519\n"
        f"public-key: {KEY.public_key.raw.hex()}\n"
        "protection: none\n"
        f"seed: {SEED.hex()}\n"
    )
    assert inspect_key_file(plain) == KeyFileInfo(KEY.public_key, encrypted=False)
    assert not is_encrypted(plain)


def test_plain_file_ignores_a_passphrase(plain: Path) -> None:
    assert read_key_file(plain, passphrase=b"anything").seed == SEED


def test_sealed_round_trip(sealed: Path) -> None:
    key = read_key_file(sealed, passphrase=PASS)
    assert key.seed == SEED
    assert key.public_key == KEY.public_key
    assert is_encrypted(sealed)
    assert read_public_key(sealed) == KEY.public_key
    info = inspect_key_file(sealed)
    assert (info.opslimit, info.memlimit) == (OPS, MEM)
    text = sealed.read_text()
    assert SEED.hex() not in text
    assert [line.split(":")[0] for line in text.splitlines()] == [
        MAGIC_LINE,
        "kind",
        "public-key",
        "protection",
        "argon2id-opslimit",
        "argon2id-memlimit",
        "salt",
        "nonce",
        "sealed-seed",
    ]


def test_sealing_is_randomised(tmp_path: Path) -> None:
    a, b = tmp_path / "a.key", tmp_path / "b.key"
    write_key_file(a, KEY, passphrase=PASS, opslimit=OPS, memlimit=MEM)
    write_key_file(b, KEY, passphrase=PASS, opslimit=OPS, memlimit=MEM)
    assert a.read_bytes() != b.read_bytes()  # fresh salt and nonce each time


def test_default_limits_are_written(tmp_path: Path) -> None:
    path = tmp_path / "default.key"
    write_key_file(path, KEY, passphrase=PASS)
    info = inspect_key_file(path)
    assert info.opslimit == argon2id.OPSLIMIT_MODERATE
    assert info.memlimit == argon2id.MEMLIMIT_MODERATE
    assert read_key_file(path, passphrase=PASS).seed == SEED


def test_independent_encoder_matches_documented_layout(tmp_path: Path) -> None:
    # A second implementation built from the module docstring alone:
    # Argon2id -> 32-byte secretbox key; sealed-seed = tag || ciphertext.
    salt, nonce = bytes(16), bytes(range(24))
    box_key = argon2id.kdf(32, PASS, salt, opslimit=1, memlimit=8192)
    sealed_seed = nacl.secret.SecretBox(box_key).encrypt(SEED, nonce).ciphertext
    path = tmp_path / "handmade.key"
    _rewrite(
        path,
        (
            "hansa-key v1\n"
            "kind: ed25519\n"
            f"public-key: {KEY.public_key.raw.hex()}\n"
            "protection: argon2id-secretbox\n"
            "argon2id-opslimit: 1\n"
            "argon2id-memlimit: 8192\n"
            f"salt: {salt.hex()}\n"
            f"nonce: {nonce.hex()}\n"
            f"sealed-seed: {sealed_seed.hex()}\n"
        ).encode(),
    )
    assert read_key_file(path, passphrase=PASS).seed == SEED


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.binary(min_size=32, max_size=32), passphrase=st.binary(min_size=1, max_size=64))
def test_round_trip_any_seed_and_passphrase(tmp_path: Path, seed: bytes, passphrase: bytes) -> None:
    path = tmp_path / "any.key"
    write_key_file(
        path, SigningKey(seed), passphrase=passphrase, overwrite=True, opslimit=OPS, memlimit=MEM
    )
    assert read_key_file(path, passphrase=passphrase).seed == seed


# --- permissions and atomic writes ----------------------------------------------


@needs_posix_modes
def test_written_mode_is_0600_even_with_umask_zero(tmp_path: Path, umask_zero: None) -> None:
    for name, passphrase in (("p.key", None), ("s.key", PASS)):
        path = tmp_path / name
        write_key_file(path, KEY, passphrase=passphrase, opslimit=OPS, memlimit=MEM)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


@needs_posix_modes
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o610, 0o601, 0o666])
def test_too_open_file_is_refused(plain: Path, mode: int) -> None:
    plain.chmod(mode)
    err = _error(plain)
    assert f"(mode {mode:04o})" in err.message
    assert f"chmod 600 {plain}" in err.message
    with pytest.raises(KeyFileError, match="chmod 600"):
        read_public_key(plain)


@needs_posix_modes
def test_owner_only_modes_are_accepted(plain: Path) -> None:
    plain.chmod(0o400)
    assert read_key_file(plain).seed == SEED


def test_overwrite_is_refused_and_file_untouched(plain: Path) -> None:
    before = plain.read_bytes()
    with pytest.raises(KeyFileError, match="already exists"):
        write_key_file(plain, OTHER_KEY)
    assert plain.read_bytes() == before
    assert sorted(p.name for p in plain.parent.iterdir()) == [plain.name]


@needs_posix_modes
def test_overwrite_true_replaces_with_mode_0600(plain: Path) -> None:
    plain.chmod(0o400)
    write_key_file(plain, OTHER_KEY, overwrite=True)
    assert read_key_file(plain).public_key == OTHER_KEY.public_key
    assert stat.S_IMODE(plain.stat().st_mode) == 0o600
    assert sorted(p.name for p in plain.parent.iterdir()) == [plain.name]


def test_write_into_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot create key file"):
        write_key_file(tmp_path / "no" / "such.key", KEY)


def test_empty_passphrase_is_refused_on_write(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="passphrase is empty"):
        write_key_file(tmp_path / "e.key", KEY, passphrase=b"", opslimit=OPS, memlimit=MEM)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("opslimit", "memlimit"), [(0, 8192), (17, 8192), (1, 4096), (1, 8193), (1, 2**31)]
)
def test_out_of_range_limits_are_refused_on_write(
    tmp_path: Path, opslimit: int, memlimit: int
) -> None:
    with pytest.raises(KeyFileError, match="Argon2id limits out of range"):
        write_key_file(
            tmp_path / "l.key", KEY, passphrase=PASS, opslimit=opslimit, memlimit=memlimit
        )
    assert list(tmp_path.iterdir()) == []


# --- reading refusals, each with its own message ------------------------------------


def test_missing_passphrase(sealed: Path) -> None:
    assert "is encrypted; a passphrase is required" in _error(sealed, passphrase=None).message


def test_wrong_passphrase_is_translated(sealed: Path) -> None:
    err = _error(sealed, passphrase=b"wrong")
    assert err.message.startswith("wrong passphrase for key file")
    assert isinstance(err.__cause__, nacl.exceptions.CryptoError)


def test_missing_file(tmp_path: Path) -> None:
    assert "does not exist" in _error(tmp_path / "absent.key").message


def test_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "dir.key").mkdir(mode=0o700)
    assert "is not a regular file" in _error(tmp_path / "dir.key").message


@needs_posix_modes
def test_symlink_is_refused(plain: Path) -> None:
    link = plain.parent / "link.key"
    link.symlink_to(plain)
    assert "symbolic link" in _error(link).message


def test_oversized_file_is_refused(plain: Path) -> None:
    _rewrite(plain, plain.read_bytes() + b"#" * MAX_FILE_SIZE)
    assert "too large" in _error(plain).message


def _swap(text: str, old: str, new: str) -> bytes:
    assert old in text
    return text.replace(old, new, 1).encode()


@pytest.mark.parametrize(
    ("old", "new", "fragment"),
    [
        ("hansa-key v1", "ssh-key v1", "is not a Hansa key file"),
        ("hansa-key v1", "hansa-key v2", "unsupported format version 'v2'"),
        ("kind: ed25519", "kind: ed448", "unsupported key kind 'ed448'"),
        ("kind: ed25519", "kind:ed25519", "line 2 should be 'kind: ed25519'"),
        ("protection: none", "protection: rot13", "unsupported protection 'rot13'"),
        ("public-key: ", "publickey: ", "line 3 should be 'public-key: "),
        ("public-key: ", "public-key: 00", "'public-key' should be <64 lower-case hex digits>"),
        ("seed: ", "seed: zz", "'seed' should be <64 lower-case hex digits>"),
        ("\nseed: ", "\nextra: 1\nseed: ", "line 5 should be 'seed: "),
        ("kind: ed25519", "kind: \u00e9d25519", "non-ASCII"),
    ],
)
def test_corrupt_plain_fields(plain: Path, old: str, new: str, fragment: str) -> None:
    _rewrite(plain, _swap(plain.read_text(), old, new))
    assert fragment in _error(plain).message


def test_upper_case_hex_is_corrupt(plain: Path) -> None:
    text = plain.read_text()
    _rewrite(plain, _swap(text, SEED.hex(), SEED.hex().upper()))
    assert "'seed' should be <64 lower-case hex digits>" in _error(plain).message


def test_crlf_line_endings(plain: Path) -> None:
    _rewrite(plain, plain.read_bytes().replace(b"\n", b"\r\n"))
    assert "CRLF" in _error(plain).message


def test_trailing_data(plain: Path) -> None:
    _rewrite(plain, plain.read_bytes() + b"comment: hi\n")
    assert "unexpected data after line 5" in _error(plain).message


def test_public_key_not_matching_seed(plain: Path) -> None:
    text = plain.read_text()
    _rewrite(plain, _swap(text, KEY.public_key.raw.hex(), OTHER_KEY.public_key.raw.hex()))
    assert "does not match its secret seed" in _error(plain).message
    # The shown public key is the stored one: only reading the seed detects this.
    assert read_public_key(plain) == OTHER_KEY.public_key


def test_sealed_public_key_not_matching_seed(sealed: Path) -> None:
    text = sealed.read_text()
    _rewrite(sealed, _swap(text, KEY.public_key.raw.hex(), OTHER_KEY.public_key.raw.hex()))
    assert "does not match its secret seed" in _error(sealed).message


def test_small_order_public_key_is_corrupt(plain: Path) -> None:
    _rewrite(plain, _swap(plain.read_text(), KEY.public_key.raw.hex(), SMALL_ORDER_PK))
    assert "not a valid Ed25519 key" in _error(plain).message
    with pytest.raises(KeyFileError, match="not a valid Ed25519 key"):
        inspect_key_file(plain)


@pytest.mark.parametrize(
    ("old", "new", "fragment"),
    [
        ("argon2id-opslimit: 1", "argon2id-opslimit: 0", "Argon2id limits out of range"),
        ("argon2id-opslimit: 1", "argon2id-opslimit: 99", "Argon2id limits out of range"),
        ("argon2id-memlimit: 8192", "argon2id-memlimit: 8200", "Argon2id limits out of range"),
        (
            "argon2id-memlimit: 8192",
            "argon2id-memlimit: 1099511627776",
            "Argon2id limits out of range",
        ),
        ("argon2id-opslimit: 1", "argon2id-opslimit: 01", "'argon2id-opslimit' should be a"),
        ("argon2id-opslimit: 1", "argon2id-opslimit: +1", "'argon2id-opslimit' should be a"),
        ("protection: argon2id-secretbox", "protection: argon2i", "unsupported protection"),
        ("salt: ", "salt: 00", "'salt' should be <32 lower-case hex digits>"),
        ("nonce: ", "nonce: 00", "'nonce' should be <48 lower-case hex digits>"),
        ("sealed-seed: ", "sealed-seed: 00", "'sealed-seed' should be <96 lower-case hex"),
    ],
)
def test_corrupt_sealed_fields(sealed: Path, old: str, new: str, fragment: str) -> None:
    _rewrite(sealed, _swap(sealed.read_text(), old, new))
    assert fragment in _error(sealed).message


@pytest.mark.parametrize("which", ["plain", "sealed"])
def test_every_truncation_is_refused(tmp_path: Path, which: str) -> None:
    source = tmp_path / "source.key"
    write_key_file(
        source, KEY, passphrase=None if which == "plain" else PASS, opslimit=OPS, memlimit=MEM
    )
    data = source.read_bytes()
    cut = tmp_path / "cut.key"
    for length in range(len(data)):
        _rewrite(cut, data[:length])
        err = _error(cut)
        if length >= len(b"hansa-key"):
            assert "is truncated" in err.message, (length, err.message)
        else:
            assert "is not a Hansa key file" in err.message, (length, err.message)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_single_byte_change_is_refused(tmp_path: Path, data: st.DataObject) -> None:
    # Every byte of both layouts matters: a changed field is either malformed,
    # feeds the key derivation/authentication, or is checked against the seed.
    which = data.draw(st.sampled_from(["plain.key", "sealed.key"]))
    path = tmp_path / which
    if not path.exists():
        passphrase = None if which == "plain.key" else PASS
        write_key_file(path, KEY, passphrase=passphrase, opslimit=OPS, memlimit=MEM)
    original = path.read_bytes()
    index = data.draw(st.integers(0, len(original) - 1))
    byte = data.draw(st.integers(0, 255).filter(lambda b: b != original[index]))
    changed = tmp_path / "changed.key"
    _rewrite(changed, original[:index] + bytes([byte]) + original[index + 1 :])
    _error(changed)
