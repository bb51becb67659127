"""Ed25519 key files (``spec/protocol.md`` §3, key storage).

A key file holds one Ed25519 signing key. It is a short ASCII text file:
one ``name: value`` field per line, every line ending in ``\\n`` (LF, no
CR), fields in exactly the order below, nothing before, between or after
them. Hex is lower case; decimal numbers have no sign and no leading zero.

An unencrypted key file (``protection: none``)::

    hansa-key v1
    kind: ed25519
    public-key: <64 hex: the 32-byte RFC 8032 public key>
    protection: none
    seed: <64 hex: the 32-byte RFC 8032 secret seed>

A passphrase-protected key file (``protection: argon2id-secretbox``)::

    hansa-key v1
    kind: ed25519
    public-key: <64 hex: the 32-byte RFC 8032 public key>
    protection: argon2id-secretbox
    argon2id-opslimit: <decimal, 1..16>
    argon2id-memlimit: <decimal bytes, a multiple of 1024, 8192..1073741824>
    salt: <32 hex: 16 random bytes>
    nonce: <48 hex: 24 random bytes>
    sealed-seed: <96 hex: 48 bytes>

Sealing, with libsodium's primitives:

* ``key = Argon2id(passphrase, salt)`` giving 32 bytes — libsodium
  ``crypto_pwhash`` with ``crypto_pwhash_ALG_ARGON2ID13``: Argon2 version
  0x13, ``t = opslimit``, ``m = memlimit / 1024`` KiB, parallelism 1.
* ``sealed-seed = XSalsa20-Poly1305(key, nonce, seed)`` — libsodium
  ``crypto_secretbox_easy``: the 16-byte Poly1305 tag followed by the 32
  encrypted seed bytes.

The passphrase is used as raw bytes (the command line passes UTF-8, with
no Unicode normalisation). Writers default to libsodium's "moderate"
limits (opslimit 3, memlimit 256 MiB: about a quarter of a second), as a
key file is opened rarely and guards a long-lived key.

Reading checks, in order: the file is a regular file no larger than 4096
bytes whose mode grants nothing to group or others (``mode & 0o077 == 0``);
the first line is ``hansa-key v1``; every field is present, in order and
well formed; the public key is a canonical prime-order point; the seed
decrypts (when sealed) and derives exactly the stored public key. Each
failure is a :class:`~hansa.protocol.errors.KeyFileError` (code
``KEY_FILE``) with its own message. The ``public-key`` line lets tools
show the key without the passphrase; it is authenticated only when the
seed is read (a file whose public key was altered fails that check).
Messages, logs and reprs never contain the seed or the passphrase.

Writing creates a temporary file in the target directory with mode 0600
from the start (``O_CREAT | O_EXCL``), writes and fsyncs it, then moves it
into place (``link`` when overwriting is refused, so an existing file is
never clobbered; ``rename`` otherwise) and fsyncs the directory.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import nacl.exceptions
import nacl.pwhash.argon2id as argon2id
import nacl.secret

from hansa.crypto.keys import PUBLIC_KEY_SIZE, SEED_SIZE, PublicKey, SigningKey
from hansa.protocol.errors import KeyFileError, SignatureError

__all__ = [
    "DEFAULT_MEMLIMIT",
    "DEFAULT_OPSLIMIT",
    "MAGIC_LINE",
    "MAX_FILE_SIZE",
    "MAX_MEMLIMIT",
    "MAX_OPSLIMIT",
    "MIN_MEMLIMIT",
    "MIN_OPSLIMIT",
    "KeyFileInfo",
    "inspect_key_file",
    "is_encrypted",
    "read_key_file",
    "read_public_key",
    "write_key_file",
]

MAGIC_LINE: Final = "hansa-key v1"
"""The first line of every key file: format name and version."""
_MAGIC_WORD: Final = "hansa-key"
_KIND_ED25519: Final = "ed25519"
_PROTECTION_NONE: Final = "none"
_PROTECTION_SEALED: Final = "argon2id-secretbox"

DEFAULT_OPSLIMIT: Final = argon2id.OPSLIMIT_MODERATE
"""Argon2id passes used when writing (libsodium "moderate": 3)."""
DEFAULT_MEMLIMIT: Final = argon2id.MEMLIMIT_MODERATE
"""Argon2id memory in bytes used when writing (libsodium "moderate": 256 MiB)."""
MIN_OPSLIMIT: Final = argon2id.OPSLIMIT_MIN
"""Smallest accepted opslimit (1; only sensible in tests)."""
MAX_OPSLIMIT: Final = 16
"""Largest accepted opslimit, so a crafted file cannot make reading hang."""
MIN_MEMLIMIT: Final = argon2id.MEMLIMIT_MIN
"""Smallest accepted memlimit in bytes (8 KiB; only sensible in tests)."""
MAX_MEMLIMIT: Final = argon2id.MEMLIMIT_SENSITIVE
"""Largest accepted memlimit in bytes (1 GiB, libsodium "sensitive")."""
MAX_FILE_SIZE: Final = 4096
"""Key files larger than this many bytes are refused unread."""

_SALT_SIZE: Final = argon2id.SALTBYTES
_NONCE_SIZE: Final = nacl.secret.SecretBox.NONCE_SIZE
_SEALED_SIZE: Final = SEED_SIZE + nacl.secret.SecretBox.MACBYTES
_FILE_MODE: Final = 0o600

_HEX: Final = re.compile(r"[0-9a-f]*")
_DECIMAL: Final = re.compile(r"0|[1-9][0-9]{0,15}")


@dataclass(frozen=True, slots=True)
class KeyFileInfo:
    """What a key file says about itself, read without the passphrase.

    Attributes:
        public_key: the stored public key (validated as a point, but only
            checked against the seed when the seed is read).
        encrypted: whether the seed is sealed with a passphrase.
        opslimit: Argon2id opslimit of a sealed file, else None.
        memlimit: Argon2id memlimit in bytes of a sealed file, else None.
    """

    public_key: PublicKey
    encrypted: bool
    opslimit: int | None = None
    memlimit: int | None = None


@dataclass(frozen=True, slots=True)
class _Parsed:
    info: KeyFileInfo
    seed: bytes | None = None
    opslimit: int = 0
    memlimit: int = 0
    salt: bytes = b""
    nonce: bytes = b""
    sealed: bytes = b""

    def __repr__(self) -> str:
        # Never show the seed, even in a debugger or a failing assertion.
        return f"_Parsed({self.info!r})"


def write_key_file(
    path: str | os.PathLike[str],
    key: SigningKey,
    *,
    passphrase: bytes | None = None,
    overwrite: bool = False,
    opslimit: int = DEFAULT_OPSLIMIT,
    memlimit: int = DEFAULT_MEMLIMIT,
) -> None:
    """Write ``key`` to a new key file with mode 0600, atomically.

    Args:
        path: where to write the key file.
        key: the signing key to store.
        passphrase: seal the seed under this passphrase (Argon2id +
            secretbox); None writes the seed in the clear.
        overwrite: replace an existing file instead of refusing.
        opslimit: Argon2id passes (ignored without a passphrase).
        memlimit: Argon2id memory in bytes, a multiple of 1024 (ignored
            without a passphrase).

    Raises:
        KeyFileError: the file exists and ``overwrite`` is false, the
            passphrase is empty, the Argon2id limits are out of range, or
            the file cannot be written.
    """
    target = Path(path)
    directory = target.parent
    if not overwrite and target.exists():
        raise KeyFileError(f"key file {target} already exists; refusing to overwrite it")
    text = _render(key, passphrase, opslimit, memlimit).encode("ascii")
    tmp = directory / f".{target.name}.{secrets.token_hex(8)}.tmp"
    try:
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | _O_NOFOLLOW, _FILE_MODE)
    except OSError as exc:
        raise KeyFileError(f"cannot create key file in {directory}: {exc.strerror}") from exc
    try:
        try:
            # A restrictive umask may have dropped bits; never a wider mode.
            os.fchmod(fd, _FILE_MODE)
            view = memoryview(text)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        _install(tmp, target, overwrite=overwrite)
    except OSError as exc:
        raise KeyFileError(f"cannot write key file {target}: {exc.strerror}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _fsync_directory(directory)


def read_key_file(path: str | os.PathLike[str], *, passphrase: bytes | None = None) -> SigningKey:
    """Read a signing key from a key file.

    Args:
        path: the key file.
        passphrase: the passphrase of a sealed file (ignored for an
            unencrypted one).

    Returns:
        The signing key; its public key equals the file's ``public-key``.

    Raises:
        KeyFileError: the file is missing, too open, not a key file,
            corrupt or truncated, the passphrase is missing or wrong, or the
            public key does not match the seed.
    """
    target = Path(path)
    parsed = _load(target)
    if parsed.seed is not None:
        seed = parsed.seed
    else:
        if passphrase is None:
            raise KeyFileError(f"key file {target} is encrypted; a passphrase is required")
        seed = _unseal(target, parsed, passphrase)
    key = SigningKey(seed)
    if key.public_key != parsed.info.public_key:
        raise KeyFileError(
            f"key file {target} is inconsistent: its public key does not match its secret seed"
        )
    return key


def inspect_key_file(path: str | os.PathLike[str]) -> KeyFileInfo:
    """Read what a key file says about itself, without the passphrase.

    Args:
        path: the key file.

    Returns:
        The stored public key, whether the seed is sealed, and the
        Argon2id limits of a sealed file.

    Raises:
        KeyFileError: the file is missing, too open, not a key file,
            corrupt or truncated.
    """
    return _load(Path(path)).info


def read_public_key(path: str | os.PathLike[str]) -> PublicKey:
    """Return the public key stored in a key file (no passphrase needed).

    Raises:
        KeyFileError: as :func:`inspect_key_file`.
    """
    return inspect_key_file(path).public_key


def is_encrypted(path: str | os.PathLike[str]) -> bool:
    """Return whether a key file's seed is sealed with a passphrase.

    Raises:
        KeyFileError: as :func:`inspect_key_file`.
    """
    return inspect_key_file(path).encrypted


# --- writing ---------------------------------------------------------------

_O_NOFOLLOW: Final = getattr(os, "O_NOFOLLOW", 0)


def _check_limits(opslimit: int, memlimit: int) -> bool:
    return (
        MIN_OPSLIMIT <= opslimit <= MAX_OPSLIMIT
        and MIN_MEMLIMIT <= memlimit <= MAX_MEMLIMIT
        and memlimit % 1024 == 0
    )


def _derive(passphrase: bytes, salt: bytes, opslimit: int, memlimit: int) -> bytes:
    return argon2id.kdf(
        nacl.secret.SecretBox.KEY_SIZE, passphrase, salt, opslimit=opslimit, memlimit=memlimit
    )


def _render(key: SigningKey, passphrase: bytes | None, opslimit: int, memlimit: int) -> str:
    head = [MAGIC_LINE, f"kind: {_KIND_ED25519}", f"public-key: {key.public_key.raw.hex()}"]
    if passphrase is None:
        lines = [*head, f"protection: {_PROTECTION_NONE}", f"seed: {key.seed.hex()}"]
        return "".join(line + "\n" for line in lines)
    if not passphrase:
        raise KeyFileError("the passphrase is empty; give a passphrase or write the key unsealed")
    if not _check_limits(opslimit, memlimit):
        raise KeyFileError(_limits_message())
    salt = secrets.token_bytes(_SALT_SIZE)
    nonce = secrets.token_bytes(_NONCE_SIZE)
    try:
        box = nacl.secret.SecretBox(_derive(passphrase, salt, opslimit, memlimit))
        sealed = box.encrypt(key.seed, nonce).ciphertext
    except (nacl.exceptions.CryptoError, MemoryError) as exc:
        raise KeyFileError("cannot derive the key-file encryption key") from exc
    lines = [
        *head,
        f"protection: {_PROTECTION_SEALED}",
        f"argon2id-opslimit: {opslimit}",
        f"argon2id-memlimit: {memlimit}",
        f"salt: {salt.hex()}",
        f"nonce: {nonce.hex()}",
        f"sealed-seed: {sealed.hex()}",
    ]
    return "".join(line + "\n" for line in lines)


def _install(tmp: Path, target: Path, *, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, target)
        return
    try:
        # link() fails if the target exists: no window in which another
        # writer's file could be clobbered.
        os.link(tmp, target)
    except FileExistsError as exc:
        raise KeyFileError(f"key file {target} already exists; refusing to overwrite it") from exc
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        # Filesystems without hard links: the check above is the best we can do.
        if target.exists():
            raise KeyFileError(
                f"key file {target} already exists; refusing to overwrite it"
            ) from exc
        os.replace(tmp, target)


def _fsync_directory(directory: Path) -> None:
    # Make the rename durable; best effort where directories cannot be opened.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --- reading ---------------------------------------------------------------


def _read_bytes(target: Path) -> bytes:
    try:
        fd = os.open(target, os.O_RDONLY | _O_NOFOLLOW)
    except FileNotFoundError as exc:
        raise KeyFileError(f"key file {target} does not exist") from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise KeyFileError(f"key file {target} is a symbolic link; refusing it") from exc
        raise KeyFileError(f"cannot read key file {target}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"key file {target} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if os.name == "posix" and mode & 0o077:
            raise KeyFileError(
                f"key file {target} is open to other users (mode {mode:04o}); chmod 600 {target}"
            )
        if st.st_size > MAX_FILE_SIZE:
            raise KeyFileError(f"{target} is too large ({st.st_size} bytes) to be a Hansa key file")
        data = os.read(fd, MAX_FILE_SIZE + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {target}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_SIZE:
        raise KeyFileError(f"{target} is too large to be a Hansa key file")
    return data


class _Fields:
    """Reads the ``name: value`` lines of a key file in their fixed order."""

    def __init__(self, target: Path, lines: list[str]) -> None:
        self._target = target
        self._lines = lines
        self._next = 1  # line 0 is the magic line

    def take(self, name: str, what: str) -> str:
        number = self._next + 1
        if self._next >= len(self._lines):
            raise KeyFileError(f"key file {self._target} is truncated (no '{name}' line)")
        line = self._lines[self._next]
        self._next += 1
        prefix = f"{name}: "
        if not line.startswith(prefix):
            raise KeyFileError(
                f"key file {self._target} is corrupt: line {number} should be '{name}: {what}'"
            )
        return line[len(prefix) :]

    def hex(self, name: str, size: int) -> bytes:
        what = f"<{2 * size} lower-case hex digits>"
        value = self.take(name, what)
        if len(value) != 2 * size or not _HEX.fullmatch(value):
            raise KeyFileError(f"key file {self._target} is corrupt: '{name}' should be {what}")
        return bytes.fromhex(value)

    def decimal(self, name: str) -> int:
        value = self.take(name, "<decimal number>")
        if not _DECIMAL.fullmatch(value):
            raise KeyFileError(
                f"key file {self._target} is corrupt: '{name}' should be a decimal number"
            )
        return int(value)

    def finish(self) -> None:
        if self._next != len(self._lines):
            raise KeyFileError(
                f"key file {self._target} is corrupt: unexpected data after line {self._next}"
            )


def _load(target: Path) -> _Parsed:
    data = _read_bytes(target)
    first = data.split(b"\n", 1)[0]
    if not first.startswith(_MAGIC_WORD.encode()):
        raise KeyFileError(f"{target} is not a Hansa key file (no '{MAGIC_LINE}' first line)")
    if not data.endswith(b"\n"):
        raise KeyFileError(f"key file {target} is truncated (its last line is incomplete)")
    if first.rstrip(b"\r") == MAGIC_LINE.encode() and first.endswith(b"\r"):
        raise KeyFileError(f"key file {target} is corrupt: it has CRLF line endings")
    if first != MAGIC_LINE.encode():
        version = first[len(_MAGIC_WORD) :].strip()[:16].decode("ascii", "replace")
        raise KeyFileError(
            f"key file {target} has unsupported format version {version!r}; "
            f"this hansa reads '{MAGIC_LINE}'"
        )
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise KeyFileError(f"key file {target} is corrupt: it contains non-ASCII bytes") from exc
    fields = _Fields(target, text[:-1].split("\n"))
    kind = fields.take("kind", _KIND_ED25519)
    if kind != _KIND_ED25519:
        raise KeyFileError(f"key file {target} holds an unsupported key kind {kind[:32]!r}")
    raw_public = fields.hex("public-key", PUBLIC_KEY_SIZE)
    try:
        public_key = PublicKey(raw_public)
    except SignatureError as exc:
        raise KeyFileError(
            f"key file {target} is corrupt: its public key is not a valid Ed25519 key"
        ) from exc
    protection = fields.take("protection", f"{_PROTECTION_NONE} | {_PROTECTION_SEALED}")
    if protection == _PROTECTION_NONE:
        seed = fields.hex("seed", SEED_SIZE)
        fields.finish()
        return _Parsed(KeyFileInfo(public_key, encrypted=False), seed=seed)
    if protection != _PROTECTION_SEALED:
        raise KeyFileError(f"key file {target} uses an unsupported protection {protection[:32]!r}")
    opslimit = fields.decimal("argon2id-opslimit")
    memlimit = fields.decimal("argon2id-memlimit")
    if not _check_limits(opslimit, memlimit):
        raise KeyFileError(f"key file {target} is corrupt: {_limits_message()}")
    salt = fields.hex("salt", _SALT_SIZE)
    nonce = fields.hex("nonce", _NONCE_SIZE)
    sealed = fields.hex("sealed-seed", _SEALED_SIZE)
    fields.finish()
    info = KeyFileInfo(public_key, encrypted=True, opslimit=opslimit, memlimit=memlimit)
    return _Parsed(
        info, opslimit=opslimit, memlimit=memlimit, salt=salt, nonce=nonce, sealed=sealed
    )


def _unseal(target: Path, parsed: _Parsed, passphrase: bytes) -> bytes:
    try:
        box_key = _derive(passphrase, parsed.salt, parsed.opslimit, parsed.memlimit)
    except (nacl.exceptions.CryptoError, MemoryError) as exc:
        raise KeyFileError(f"cannot derive the decryption key for key file {target}") from exc
    try:
        return nacl.secret.SecretBox(box_key).decrypt(parsed.sealed, parsed.nonce)
    except nacl.exceptions.CryptoError as exc:
        raise KeyFileError(
            f"wrong passphrase for key file {target} (or its sealed seed was altered)"
        ) from exc


def _limits_message() -> str:
    return (
        f"Argon2id limits out of range (opslimit {MIN_OPSLIMIT}..{MAX_OPSLIMIT}, "
        f"memlimit {MIN_MEMLIMIT}..{MAX_MEMLIMIT} bytes in multiples of 1024)"
    )
