"""C2SP signed notes, transparency-log checkpoints and Ed25519 cosignatures.

This module implements three pinned C2SP specifications, byte for byte:

* ``c2sp.org/signed-note@v1.0.0`` — a *note* is UTF-8 text ending in a
  newline, then a blank line, then one or more signature lines
  ``— <key name> <base64(key ID[4] || signature)>\\n`` (U+2014 EM DASH, then
  U+0020). The signed message is the note text including its final newline,
  excluding the blank line (§Format). Key IDs are
  ``SHA-256(name || 0x0A || signature type || public key)[:4]`` (§Signatures)
  and verifier keys are written ``<name>+<hex8 key ID>+<base64(type || key)>``
  (§Verifier keys).
* ``c2sp.org/tlog-checkpoint@v1.0.0`` — a *checkpoint* is a note whose text
  is exactly ``<origin>\\n<tree size>\\n<base64 root hash>\\n`` followed by
  optional non-empty extension lines (§Note text).
* ``c2sp.org/tlog-cosignature@v1.0.1`` — a *cosignature* is a note signature
  of type ``0x04`` added by a witness. Its payload is
  ``key ID[4] || u64be timestamp || Ed25519 signature[64]`` over
  ``cosignature/v1\\ntime <timestamp>\\n<checkpoint text>`` (§Format,
  §Ed25519 signed message).

Theory of operation
-------------------
Parsing is strict and bounded: a note is at most :data:`MAX_NOTE_SIZE`
bytes with at most :data:`MAX_SIGNATURES` signature lines (the spec asks
verifiers to accept at least 16), must be valid UTF-8 without ASCII control
characters other than ``\\n``, and every base64 field must be canonical
standard base64 (RFC 4648 §4, padded). Anything else raises
:class:`~hansa.protocol.errors.NoteError` before any signature is checked.

Verification follows signed-note §Signatures exactly:

1. a signature line whose (key name, key ID) matches no configured verifier
   is ignored (kept in :attr:`VerifiedNote.unknown`);
2. a line that matches a verifier MUST verify — if any such line fails the
   whole note is rejected;
3. the note is rejected if no configured verifier produced a valid line.

:func:`check_note` reports these outcomes as a :class:`NoteCheck` result and
:func:`verify_note` raises unless the note passes (house-style "result, then
a separate raising call"). Checkpoints add :func:`open_checkpoint` (log
signature + origin + text format + witness cosignatures) on top.

Ed25519 is always :mod:`hansa.crypto.keys` (libsodium, strict): public keys
are rejected unless canonical and of prime order, and verification rejects
non-canonical ``S`` and small-order points. Signing is deterministic
(RFC 8032), so known-answer vectors reproduce byte for byte.

The Ed25519 cosignature message does not commit to the cosigner's name, so
each cosigner must use its own key (tlog-cosignature §Ed25519 signed
message). Consistency between checkpoints (Merkle proofs) is checked
elsewhere; this module only proves who signed what.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

from hansa.crypto.keys import PUBLIC_KEY_SIZE, SEED_SIZE, SIGNATURE_SIZE, PublicKey, SigningKey
from hansa.protocol.errors import NoteError

__all__ = [
    "COSIGNATURE_HEADER",
    "KEY_ID_SIZE",
    "MAX_NOTE_SIZE",
    "MAX_SIGNATURES",
    "MAX_TIMESTAMP",
    "MIN_ACCEPTED_SIGNATURES",
    "Checkpoint",
    "Cosignature",
    "CosignatureSigner",
    "Note",
    "NoteCheck",
    "NoteSignature",
    "NoteSigner",
    "NoteVerifier",
    "SignatureType",
    "VerifiedCheckpoint",
    "VerifiedNote",
    "VerifiedSignature",
    "check_note",
    "cosign_checkpoint",
    "cosignature_message",
    "format_signer_key",
    "note_key_id",
    "open_checkpoint",
    "parse_signer_key",
    "sign_checkpoint",
    "sign_note",
    "validate_key_name",
    "verify_checkpoint",
    "verify_cosignatures",
    "verify_note",
]

MAX_NOTE_SIZE: Final = 1 << 20
"""Largest note accepted or produced, in bytes (signed-note §Format: "SHOULD apply a maximum")."""
MAX_SIGNATURES: Final = 100
"""Largest number of signature lines in one note (same cap as golang.org/x/mod)."""
MIN_ACCEPTED_SIGNATURES: Final = 16
"""signed-note §Format: verifiers "MUST accept at least up to 16 signatures"."""
KEY_ID_SIZE: Final = 4
"""Note key IDs are 32-bit (signed-note §Signatures)."""
MAX_TIMESTAMP: Final = (1 << 63) - 1
"""tlog-cosignature §Format: a timestamp "MUST NOT exceed 2^63 - 1"."""
MAX_TREE_SIZE: Final = (1 << 64) - 1
"""Checkpoint tree sizes are unsigned 64-bit, as in RFC 6962 / RFC 9162."""
COSIGNATURE_HEADER: Final = b"cosignature/v1\n"
"""Domain-separation header of the Ed25519 cosignature message."""

_SIG_PREFIX: Final = "\u2014 "  # EM DASH, SPACE (signed-note §Format)
_SIGNER_KEY_PREFIX: Final = "PRIVATE+KEY+"
_HASH_SIZE: Final = 32
_TIMESTAMP_SIZE: Final = 8
_DECIMAL = re.compile(r"0|[1-9][0-9]*", re.ASCII)
_HEX8 = re.compile(r"[0-9a-f]{8}", re.ASCII)
# The Unicode White_Space property (Go's unicode.IsSpace, which the reference
# implementation uses for key names); str.isspace() misses none of the Zs
# characters but differs on a few, so both are applied.
_WHITE_SPACE: Final = frozenset(
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
    "\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)


class SignatureType(enum.IntEnum):
    """Signature type identifier bytes this module supports (signed-note §Signature types)."""

    ED25519 = 0x01
    """Plain Ed25519 over the note text (signed-note §Ed25519 signatures)."""
    COSIGNATURE_V1 = 0x04
    """Timestamped Ed25519 witness cosignature (tlog-cosignature)."""


# --------------------------------------------------------------------------- helpers


def _fail(message: str) -> NoteError:
    return NoteError(message)


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64decode(text: str, what: str) -> bytes:
    """Decode canonical, padded standard base64 (RFC 4648 §4) or raise NoteError."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError) as exc:
        raise _fail(f"{what} is not valid base64") from exc
    # Reject non-zero padding bits and other non-canonical spellings, so each
    # value has exactly one text form.
    if _b64encode(raw) != text:
        raise _fail(f"{what} is not canonical base64")
    return raw


def _has_control(text: str) -> bool:
    """True if ``text`` holds an ASCII control character other than newline."""
    return any(ch < " " and ch != "\n" for ch in text)


def validate_key_name(name: str) -> str:
    """Check a note key name (signed-note §Format).

    Args:
        name: the key name.

    Returns:
        ``name`` unchanged.

    Raises:
        NoteError: the name is empty, contains a Unicode space, a ``+``, or
            an ASCII control character.
    """
    if not name:
        raise _fail("key name is empty")
    if "+" in name:
        raise _fail(f"key name {name!r} contains '+'")
    if any(ch in _WHITE_SPACE or ch.isspace() or ch < " " for ch in name):
        raise _fail(f"key name {name!r} contains a space or control character")
    return name


def note_key_id(name: str, sig_type: int, public_key: bytes) -> bytes:
    """Return the 4-byte note key ID (signed-note §Signatures).

    ``SHA-256(name || 0x0A || sig_type || public_key)[:4]``.

    Args:
        name: the key name (not validated here).
        sig_type: the one-byte signature type.
        public_key: the public key encoding for that type.

    Returns:
        The big-endian 32-bit key ID as 4 bytes.
    """
    digest = hashlib.sha256(name.encode("utf-8") + b"\n" + bytes([sig_type]) + public_key)
    return digest.digest()[:KEY_ID_SIZE]


def cosignature_message(text: str, timestamp: int) -> bytes:
    """Return the bytes an Ed25519 cosignature signs (tlog-cosignature §Ed25519 signed message).

    Args:
        text: the whole checkpoint note text, with its final newline.
        timestamp: POSIX seconds, at most :data:`MAX_TIMESTAMP`.

    Returns:
        ``cosignature/v1\\ntime <timestamp>\\n`` followed by ``text``.

    Raises:
        NoteError: the timestamp is out of range.
    """
    _check_timestamp(timestamp)
    return COSIGNATURE_HEADER + b"time %d\n" % timestamp + text.encode("utf-8")


def _check_timestamp(timestamp: int) -> None:
    if isinstance(timestamp, bool) or not isinstance(timestamp, int):
        raise _fail("cosignature timestamp must be an integer")
    if not 0 <= timestamp <= MAX_TIMESTAMP:
        raise _fail(f"cosignature timestamp {timestamp} is outside 0..2^63-1")


def _check_text(text: str) -> None:
    """Check a note text (signed-note §Format)."""
    if not text.endswith("\n"):
        raise _fail("note text must end with a newline")
    if _has_control(text):
        raise _fail("note text contains an ASCII control character other than newline")


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True, eq=False)
class NoteVerifier:
    """A verifier key: (name, signature type, public key), with its note key ID.

    Build one from a vkey string with :meth:`from_vkey`, or from a known
    public key directly. Supported types: ``0x01`` Ed25519 and ``0x04``
    Ed25519 cosignature/v1.

    Attributes:
        name: the key name (signed-note §Format rules).
        public_key: the strictly validated Ed25519 public key.
        sig_type: the signature type.
        key_id: the 4-byte key ID derived from the three fields above.

    Raises:
        NoteError: invalid name or unsupported type.
    """

    name: str
    public_key: PublicKey
    sig_type: SignatureType = SignatureType.ED25519
    key_id: bytes = field(init=False)

    def __post_init__(self) -> None:
        validate_key_name(self.name)
        try:
            sig_type = SignatureType(self.sig_type)
        except ValueError as exc:
            raise _fail(f"unsupported signature type {self.sig_type:#04x}") from exc
        object.__setattr__(self, "sig_type", sig_type)
        object.__setattr__(self, "key_id", note_key_id(self.name, sig_type, self.public_key.raw))

    @classmethod
    def from_vkey(cls, vkey: str) -> NoteVerifier:
        """Parse ``<name>+<hex8 key ID>+<base64(type || public key)>``.

        Only the first two ``+`` separate fields: the base64 may contain ``+``.

        Args:
            vkey: the verifier key string (surrounding whitespace is not stripped).

        Returns:
            The verifier.

        Raises:
            NoteError: malformed vkey, unsupported type, wrong key length or
                a key ID that does not match the key.
            SignatureError: the public key is not a valid Ed25519 point.
        """
        name, sep1, rest = vkey.partition("+")
        key_id_hex, sep2, key_b64 = rest.partition("+")
        if not sep1 or not sep2:
            raise _fail("malformed vkey: expected <name>+<hex key id>+<base64 key>")
        validate_key_name(name)
        if _HEX8.fullmatch(key_id_hex) is None:
            raise _fail("malformed vkey: key id must be 8 lower-case hex digits")
        raw = _b64decode(key_b64, "vkey public key")
        if not raw:
            raise _fail("malformed vkey: empty key")
        try:
            sig_type = SignatureType(raw[0])
        except ValueError as exc:
            raise _fail(f"vkey has unsupported signature type {raw[0]:#04x}") from exc
        key = raw[1:]
        if len(key) != PUBLIC_KEY_SIZE:
            raise _fail(f"vkey Ed25519 key is {len(key)} bytes, expected {PUBLIC_KEY_SIZE}")
        if note_key_id(name, sig_type, key) != bytes.fromhex(key_id_hex):
            raise _fail(f"vkey key id {key_id_hex} does not match the key")
        return cls(name, PublicKey(key), sig_type)

    @property
    def vkey(self) -> str:
        """The verifier key string ``<name>+<hex8 key ID>+<base64(type || key)>``."""
        encoded = _b64encode(bytes([self.sig_type]) + self.public_key.raw)
        return f"{self.name}+{self.key_id.hex()}+{encoded}"

    def matches(self, signature: NoteSignature) -> bool:
        """Whether a signature line names this key (same name and key ID)."""
        return signature.name == self.name and signature.key_id == self.key_id

    def check(self, text: str, signature: bytes) -> tuple[bool, int | None]:
        """Verify a signature payload (without its key ID) over a note text.

        Args:
            text: the note text, with its final newline.
            signature: the bytes after the 4-byte key ID.

        Returns:
            ``(valid, timestamp)``; ``timestamp`` is the cosignature time for
            type ``0x04`` (None for ``0x01``).
        """
        if self.sig_type is SignatureType.ED25519:
            if len(signature) != SIGNATURE_SIZE:
                return False, None
            return self.public_key.verify(text.encode("utf-8"), signature), None
        # tlog-cosignature §Format: timestamped_signature = u64be timestamp || sig[64].
        if len(signature) != _TIMESTAMP_SIZE + SIGNATURE_SIZE:
            return False, None
        (timestamp,) = struct.unpack(">Q", signature[:_TIMESTAMP_SIZE])
        if timestamp > MAX_TIMESTAMP:
            return False, None
        message = cosignature_message(text, timestamp)
        return self.public_key.verify(message, signature[_TIMESTAMP_SIZE:]), timestamp

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NoteVerifier):
            return NotImplemented
        return (self.name, self.sig_type, self.public_key) == (
            other.name,
            other.sig_type,
            other.public_key,
        )

    def __hash__(self) -> int:
        return hash((self.name, self.sig_type, self.public_key))

    def __repr__(self) -> str:
        return f"NoteVerifier({self.vkey!r})"


class _Signer:
    """What both note signers share: a validated name, a key and its verifier."""

    __slots__ = ("_key", "name", "verifier")

    sig_type: SignatureType

    def __init__(self, name: str, key: SigningKey) -> None:
        self.name: str = validate_key_name(name)
        self._key = key
        self.verifier: NoteVerifier = NoteVerifier(name, key.public_key, self.sig_type)

    @property
    def key_id(self) -> bytes:
        """The 4-byte note key ID (computed with this signer's type byte)."""
        return self.verifier.key_id

    @property
    def vkey(self) -> str:
        """The verifier key string for this signer."""
        return self.verifier.vkey

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.vkey!r})"


class NoteSigner(_Signer):
    """An Ed25519 (type ``0x01``) note signer (signed-note §Ed25519 signatures).

    Args:
        name: the key name (for a log, SHOULD equal the checkpoint origin).
        key: the Ed25519 signing key.

    Raises:
        NoteError: invalid key name.
    """

    __slots__ = ()

    sig_type = SignatureType.ED25519

    @property
    def signing_key(self) -> SigningKey:
        """The underlying Ed25519 signing key (handle with care)."""
        return self._key

    def sign(self, text: str) -> NoteSignature:
        """Sign a note text and return the signature line.

        Args:
            text: the note text, ending in a newline.

        Returns:
            The signature line for this key.

        Raises:
            NoteError: the text is not a valid note text.
        """
        _check_text(text)
        return NoteSignature(self.name, self.key_id, self._key.sign(text.encode("utf-8")))


class CosignatureSigner(_Signer):
    """An Ed25519 cosignature/v1 (type ``0x04``) signer for witnesses (tlog-cosignature).

    Args:
        name: the cosigner name (SHOULD be a schema-less URL).
        key: the Ed25519 key; use a distinct key per cosigner, because the
            cosigned message does not commit to the name.

    Raises:
        NoteError: invalid key name.
    """

    __slots__ = ()

    sig_type = SignatureType.COSIGNATURE_V1

    def sign(self, text: str, timestamp: int) -> NoteSignature:
        """Cosign a note text at ``timestamp``.

        Args:
            text: the checkpoint note text, ending in a newline.
            timestamp: POSIX seconds of the cosignature (injected, never read
                from a clock here).

        Returns:
            The signature line, payload ``u64be timestamp || signature``.

        Raises:
            NoteError: invalid text or timestamp out of range.
        """
        _check_text(text)
        signature = self._key.sign(cosignature_message(text, timestamp))
        return NoteSignature(self.name, self.key_id, struct.pack(">Q", timestamp) + signature)


def parse_signer_key(text: str) -> NoteSigner:
    """Parse a golang.org/x/mod signer key ``PRIVATE+KEY+<name>+<hex8 id>+base64(0x01 || seed)``.

    This is an x/mod convention (not part of C2SP); only type ``0x01`` exists.

    Args:
        text: the signer key string.

    Returns:
        The signer.

    Raises:
        NoteError: malformed string, unsupported type, wrong seed length or
            key ID mismatch.
    """
    if not text.startswith(_SIGNER_KEY_PREFIX):
        raise _fail("malformed signer key: missing PRIVATE+KEY+ prefix")
    name, sep1, rest = text[len(_SIGNER_KEY_PREFIX) :].partition("+")
    key_id_hex, sep2, key_b64 = rest.partition("+")
    if not sep1 or not sep2:
        raise _fail("malformed signer key: expected PRIVATE+KEY+<name>+<id>+<key>")
    validate_key_name(name)
    if _HEX8.fullmatch(key_id_hex) is None:
        raise _fail("malformed signer key: key id must be 8 lower-case hex digits")
    raw = _b64decode(key_b64, "signer key")
    if len(raw) != 1 + SEED_SIZE or raw[0] != SignatureType.ED25519:
        raise _fail("signer key must be base64(0x01 || 32-byte Ed25519 seed)")
    signer = NoteSigner(name, SigningKey(raw[1:]))
    if signer.key_id.hex() != key_id_hex:
        raise _fail(f"signer key id {key_id_hex} does not match the key")
    return signer


def format_signer_key(signer: NoteSigner) -> str:
    """Format a signer in the golang.org/x/mod ``PRIVATE+KEY+...`` form.

    The result contains the secret seed: never log or print it.

    Args:
        signer: the signer.

    Returns:
        ``PRIVATE+KEY+<name>+<hex8 id>+base64(0x01 || seed)``.
    """
    encoded = _b64encode(bytes([SignatureType.ED25519]) + signer.signing_key.seed)
    return f"{_SIGNER_KEY_PREFIX}{signer.name}+{signer.key_id.hex()}+{encoded}"


# --------------------------------------------------------------------------- notes


@dataclass(frozen=True)
class NoteSignature:
    """One signature line: ``— <name> <base64(key_id || signature)>``.

    Attributes:
        name: the key name.
        key_id: the 4-byte key ID.
        signature: the algorithm-specific bytes after the key ID (for type
            ``0x04``, the timestamp and the Ed25519 signature).

    Raises:
        NoteError: invalid name, key ID length or empty signature.
    """

    name: str
    key_id: bytes
    signature: bytes

    def __post_init__(self) -> None:
        validate_key_name(self.name)
        if len(self.key_id) != KEY_ID_SIZE:
            raise _fail("a note key id is 4 bytes")
        if not self.signature:
            raise _fail("a note signature is empty")

    @property
    def line(self) -> str:
        """The signature line, with its final newline."""
        return f"{_SIG_PREFIX}{self.name} {_b64encode(self.key_id + self.signature)}\n"

    @classmethod
    def from_line(cls, line: str) -> NoteSignature:
        """Parse one signature line without its final newline.

        Raises:
            NoteError: the line is malformed.
        """
        if not line.startswith(_SIG_PREFIX):
            raise _fail("signature line does not start with an em dash and a space")
        name, sep, b64 = line[len(_SIG_PREFIX) :].partition(" ")
        if not sep or not b64:
            raise _fail("signature line lacks a key name or signature")
        raw = _b64decode(b64, "signature")
        # A key ID plus at least one byte of signature (as x/mod requires).
        if len(raw) <= KEY_ID_SIZE:
            raise _fail("signature is too short")
        return cls(name, raw[:KEY_ID_SIZE], raw[KEY_ID_SIZE:])


@dataclass(frozen=True)
class Note:
    """A syntactically valid signed note (not yet verified).

    Attributes:
        text: the note text, ending in a newline.
        signatures: the signature lines in order (at least one).

    Raises:
        NoteError: invalid text, no signatures, too many signatures or the
            encoded note exceeds :data:`MAX_NOTE_SIZE`.
    """

    text: str
    signatures: tuple[NoteSignature, ...]

    def __post_init__(self) -> None:
        _check_text(self.text)
        if not self.signatures:
            raise _fail("a signed note needs at least one signature")
        if len(self.signatures) > MAX_SIGNATURES:
            raise _fail(f"note has more than {MAX_SIGNATURES} signatures")
        if len(self.to_bytes()) > MAX_NOTE_SIZE:
            raise _fail(f"note is larger than {MAX_NOTE_SIZE} bytes")

    @classmethod
    def from_bytes(cls, data: bytes) -> Note:
        """Parse a signed note (signed-note §Format).

        The text is separated from the signatures by the *last* blank line.

        Args:
            data: the encoded note.

        Returns:
            The parsed note.

        Raises:
            NoteError: the note is malformed or too large.
        """
        if len(data) > MAX_NOTE_SIZE:
            raise _fail(f"note is larger than {MAX_NOTE_SIZE} bytes")
        try:
            decoded = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _fail("note is not valid UTF-8") from exc
        if _has_control(decoded):
            raise _fail("note contains an ASCII control character other than newline")
        split = decoded.rfind("\n\n")
        if split < 0:
            raise _fail("note has no blank line before its signatures")
        text, block = decoded[: split + 1], decoded[split + 2 :]
        if not block.endswith("\n"):
            raise _fail("note does not end with a signature line and a newline")
        # Count before decoding anything, so the work is bounded.
        if block.count("\n") > MAX_SIGNATURES:
            raise _fail(f"note has more than {MAX_SIGNATURES} signatures")
        lines = block[:-1].split("\n")
        return cls(text, tuple(NoteSignature.from_line(line) for line in lines))

    def to_bytes(self) -> bytes:
        """Encode the note: text, blank line, signature lines."""
        return (self.text + "\n" + "".join(s.line for s in self.signatures)).encode("utf-8")

    def with_signatures(self, *signatures: NoteSignature) -> Note:
        """Return a copy with ``signatures`` appended.

        Raises:
            NoteError: a new line names a (name, key ID) already present, or
                the result breaks a limit.
        """
        present = {(s.name, s.key_id) for s in self.signatures}
        for sig in signatures:
            if (sig.name, sig.key_id) in present:
                raise _fail(f"note already has a signature by {sig.name}+{sig.key_id.hex()}")
            present.add((sig.name, sig.key_id))
        return Note(self.text, self.signatures + signatures)


@dataclass(frozen=True)
class VerifiedSignature:
    """A signature line that verified under a configured key.

    Attributes:
        signature: the line.
        verifier: the key that verified it.
        timestamp: the cosignature time for type ``0x04``, else None.
    """

    signature: NoteSignature
    verifier: NoteVerifier
    timestamp: int | None


@dataclass(frozen=True)
class NoteCheck:
    """The outcome of checking a note's signatures; true iff it is acceptable.

    Attributes:
        note: the parsed note.
        verified: lines from configured keys that verified, in note order.
        failed: lines from configured keys that did NOT verify.
        unknown: lines from keys not configured (ignored per signed-note).
    """

    note: Note
    verified: tuple[VerifiedSignature, ...]
    failed: tuple[NoteSignature, ...]
    unknown: tuple[NoteSignature, ...]

    def __bool__(self) -> bool:
        return bool(self.verified) and not self.failed

    @property
    def reason(self) -> str:
        """Why the note is not acceptable (empty if it is)."""
        if self.failed:
            first = self.failed[0]
            return f"signature by known key {first.name}+{first.key_id.hex()} does not verify"
        if not self.verified:
            return "note is not signed by any known key"
        return ""


@dataclass(frozen=True)
class VerifiedNote:
    """A note that passed :func:`verify_note`.

    Attributes:
        text: the verified note text (with its final newline).
        verified: the lines that verified, in note order.
        unknown: lines from unknown keys, kept but unverified.
        note: the parsed note.
    """

    text: str
    verified: tuple[VerifiedSignature, ...]
    unknown: tuple[NoteSignature, ...]
    note: Note

    @property
    def verifiers(self) -> tuple[NoteVerifier, ...]:
        """The distinct keys that verified, in order of first appearance."""
        return tuple(dict.fromkeys(v.verifier for v in self.verified))

    def verified_by(self, verifier: NoteVerifier) -> bool:
        """Whether ``verifier`` produced a valid signature on this note."""
        return any(v.verifier == verifier for v in self.verified)


def _as_note(note: bytes | Note) -> Note:
    return note if isinstance(note, Note) else Note.from_bytes(note)


def _index_verifiers(
    verifiers: Iterable[NoteVerifier],
) -> dict[tuple[str, bytes], NoteVerifier]:
    index: dict[tuple[str, bytes], NoteVerifier] = {}
    for verifier in verifiers:
        slot = (verifier.name, verifier.key_id)
        other = index.get(slot)
        if other is not None and other != verifier:
            # Two different keys that a line could not tell apart.
            raise _fail(f"ambiguous verifiers: two keys named {verifier.name} share key id")
        index[slot] = verifier
    return index


def check_note(note: bytes | Note, verifiers: Iterable[NoteVerifier]) -> NoteCheck:
    """Check every signature of a note against the configured verifiers.

    Does not raise for signature problems; see :func:`verify_note`.

    Args:
        note: the encoded note (or an already parsed :class:`Note`).
        verifiers: the trusted keys.

    Returns:
        The result; ``bool(result)`` is True iff at least one known key
        verified and no known key failed (signed-note §Signatures).

    Raises:
        NoteError: the note is malformed, or two verifiers are ambiguous.
    """
    parsed = _as_note(note)
    index = _index_verifiers(verifiers)
    verified: list[VerifiedSignature] = []
    failed: list[NoteSignature] = []
    unknown: list[NoteSignature] = []
    for sig in parsed.signatures:
        verifier = index.get((sig.name, sig.key_id))
        if verifier is None:
            unknown.append(sig)
            continue
        ok, timestamp = verifier.check(parsed.text, sig.signature)
        if ok:
            verified.append(VerifiedSignature(sig, verifier, timestamp))
        else:
            failed.append(sig)
    return NoteCheck(parsed, tuple(verified), tuple(failed), tuple(unknown))


def verify_note(note: bytes | Note, verifiers: Iterable[NoteVerifier]) -> VerifiedNote:
    """Verify a signed note (signed-note §Signatures).

    Unknown (name, key ID) lines are ignored; a known key whose signature
    fails rejects the whole note; at least one known key must verify.

    Args:
        note: the encoded note (or a parsed :class:`Note`).
        verifiers: the trusted keys.

    Returns:
        The verified note.

    Raises:
        NoteError: malformed note, a failed known signature, or no known
            signature.
    """
    result = check_note(note, verifiers)
    if not result:
        raise _fail(result.reason)
    return VerifiedNote(result.note.text, result.verified, result.unknown, result.note)


def sign_note(text: str, signers: Sequence[NoteSigner]) -> bytes:
    """Sign ``text`` with each signer and return the encoded note.

    Args:
        text: the note text, ending in a newline, no control characters.
        signers: at least one signer.

    Returns:
        The signed note bytes.

    Raises:
        NoteError: invalid text, no signers or a limit is exceeded.
    """
    if not signers:
        raise _fail("sign_note needs at least one signer")
    return Note(text, tuple(s.sign(text) for s in signers)).to_bytes()


# --------------------------------------------------------------------------- checkpoints


def _check_line(value: str, what: str) -> None:
    if not value:
        raise _fail(f"checkpoint {what} is empty")
    if "\n" in value or _has_control(value):
        raise _fail(f"checkpoint {what} contains a newline or control character")


@dataclass(frozen=True)
class Checkpoint:
    """A transparency-log checkpoint body (tlog-checkpoint §Note text).

    Attributes:
        origin: the log identity; non-empty, no Unicode space, no ``+``
            (Hansa enforces the spec's SHOULD).
        size: the tree size, 0 ≤ size < 2^64.
        root_hash: the 32-byte RFC 6962 root hash.
        extensions: optional non-empty extension lines (NOT RECOMMENDED).

    Raises:
        NoteError: any field violates the rules above.
    """

    origin: str
    size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_line(self.origin, "origin")
        if "+" in self.origin or any(ch in _WHITE_SPACE or ch.isspace() for ch in self.origin):
            raise _fail("checkpoint origin must not contain spaces or '+'")
        if isinstance(self.size, bool) or not isinstance(self.size, int):
            raise _fail("checkpoint size must be an integer")
        if not 0 <= self.size <= MAX_TREE_SIZE:
            raise _fail("checkpoint size is outside 0..2^64-1")
        if len(self.root_hash) != _HASH_SIZE:
            raise _fail("checkpoint root hash must be 32 bytes")
        object.__setattr__(self, "root_hash", bytes(self.root_hash))
        if not isinstance(self.extensions, tuple):
            raise _fail("checkpoint extensions must be a tuple of lines")
        for line in self.extensions:
            _check_line(line, "extension line")

    def to_text(self) -> str:
        """Return the checkpoint note text (ends with a newline)."""
        lines = [self.origin, str(self.size), _b64encode(self.root_hash), *self.extensions]
        return "".join(line + "\n" for line in lines)

    @classmethod
    def from_text(cls, text: str) -> Checkpoint:
        """Parse a checkpoint note text.

        Args:
            text: the note text, ending in a newline.

        Returns:
            The checkpoint.

        Raises:
            NoteError: the text is not exactly a checkpoint.
        """
        if len(text) > MAX_NOTE_SIZE:
            raise _fail("checkpoint text is too large")
        if not text.endswith("\n"):
            raise _fail("checkpoint text must end with a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise _fail("checkpoint needs origin, size and root hash lines")
        origin, size_text, root_text, *extensions = lines
        if len(size_text) > 20 or _DECIMAL.fullmatch(size_text) is None:
            raise _fail("checkpoint size is not a decimal without leading zeros")
        root = _b64decode(root_text, "checkpoint root hash")
        return cls(origin, int(size_text), root, tuple(extensions))


def sign_checkpoint(checkpoint: Checkpoint, signer: NoteSigner) -> bytes:
    """Sign a checkpoint as a log (tlog-checkpoint §Signatures).

    Args:
        checkpoint: the checkpoint.
        signer: the log's key (its name SHOULD equal the origin).

    Returns:
        The signed note bytes.
    """
    return sign_note(checkpoint.to_text(), [signer])


@dataclass(frozen=True)
class Cosignature:
    """A verified witness cosignature on a checkpoint.

    Attributes:
        verifier: the witness key that verified it.
        timestamp: the cosignature time (POSIX seconds).
        signature: the signature line.
    """

    verifier: NoteVerifier
    timestamp: int
    signature: NoteSignature

    @property
    def name(self) -> str:
        """The cosigner name."""
        return self.verifier.name


@dataclass(frozen=True)
class VerifiedCheckpoint:
    """A checkpoint whose log signature (and any known cosignatures) verified.

    Attributes:
        checkpoint: the parsed checkpoint.
        note: the verified note (all lines).
        cosignatures: verified cosignatures from configured witnesses.
    """

    checkpoint: Checkpoint
    note: VerifiedNote
    cosignatures: tuple[Cosignature, ...]

    def cosigners(self) -> frozenset[str]:
        """Names of the witnesses that cosigned."""
        return frozenset(c.name for c in self.cosignatures)


def _cosignatures(
    verified: Iterable[VerifiedSignature], witnesses: set[NoteVerifier]
) -> tuple[Cosignature, ...]:
    out: list[Cosignature] = []
    for v in verified:
        if v.verifier in witnesses and v.timestamp is not None:
            out.append(Cosignature(v.verifier, v.timestamp, v.signature))
    return tuple(out)


def _check_witnesses(witnesses: Sequence[NoteVerifier]) -> set[NoteVerifier]:
    for w in witnesses:
        if w.sig_type is not SignatureType.COSIGNATURE_V1:
            raise _fail(f"witness {w.name} is not a cosignature/v1 (type 0x04) key")
    return set(witnesses)


def open_checkpoint(
    note: bytes,
    log_verifier: NoteVerifier,
    *,
    origin: str | None = None,
    witnesses: Sequence[NoteVerifier] = (),
) -> VerifiedCheckpoint:
    """Verify a checkpoint note and its witness cosignatures.

    Steps 1-3 of an auditor's checks (tlog-checkpoint): the log signature
    verifies, the origin is the expected one and the text is exactly a
    checkpoint. Cosignatures from ``witnesses`` are verified too; a known
    witness whose cosignature fails rejects the note (signed-note
    §Signatures). Quorum policy and consistency are the caller's job.

    Args:
        note: the encoded checkpoint note.
        log_verifier: the log's key.
        origin: the expected origin; defaults to ``log_verifier.name``.
        witnesses: trusted cosignature/v1 (type ``0x04``) keys.

    Returns:
        The verified checkpoint with its verified cosignatures.

    Raises:
        NoteError: malformed note or checkpoint, missing or bad log
            signature, bad known cosignature, or wrong origin.
    """
    expected = log_verifier.name if origin is None else origin
    witness_set = _check_witnesses(witnesses)
    verified = verify_note(note, [log_verifier, *witnesses])
    if not verified.verified_by(log_verifier):
        raise _fail(f"checkpoint is not signed by the log key {log_verifier.name}")
    checkpoint = Checkpoint.from_text(verified.text)
    if checkpoint.origin != expected:
        raise _fail(f"checkpoint origin {checkpoint.origin!r} is not {expected!r}")
    witness_set.discard(log_verifier)
    return VerifiedCheckpoint(checkpoint, verified, _cosignatures(verified.verified, witness_set))


def verify_checkpoint(
    note: bytes, log_verifier: NoteVerifier, *, origin: str | None = None
) -> Checkpoint:
    """Verify a checkpoint note's log signature and return the checkpoint.

    Args:
        note: the encoded checkpoint note.
        log_verifier: the log's key.
        origin: the expected origin; defaults to ``log_verifier.name``.

    Returns:
        The checkpoint.

    Raises:
        NoteError: as for :func:`open_checkpoint`.
    """
    return open_checkpoint(note, log_verifier, origin=origin).checkpoint


def verify_cosignatures(
    note: bytes | Note, witnesses: Sequence[NoteVerifier]
) -> tuple[Cosignature, ...]:
    """List the verified witness cosignatures on a checkpoint note.

    The log signature is not checked here (use :func:`open_checkpoint`). A
    note with no cosignature from these witnesses gives an empty tuple.

    Args:
        note: the encoded (or parsed) checkpoint note.
        witnesses: trusted cosignature/v1 (type ``0x04``) keys.

    Returns:
        The verified cosignatures in note order.

    Raises:
        NoteError: malformed note or checkpoint text, a non-``0x04``
            witness key, or a known witness whose cosignature fails.
    """
    witness_set = _check_witnesses(witnesses)
    result = check_note(note, witnesses)
    Checkpoint.from_text(result.note.text)
    if result.failed:
        raise _fail(result.reason)
    return _cosignatures(result.verified, witness_set)


def cosign_checkpoint(note: bytes, cosigner: CosignatureSigner, timestamp: int) -> bytes:
    """Add a cosignature/v1 line to a checkpoint note (tlog-cosignature).

    This does NOT verify the log signature or consistency: a witness must do
    both (with :func:`open_checkpoint` and a consistency proof) before
    cosigning, as tlog-witness requires.

    Args:
        note: the encoded checkpoint note.
        cosigner: the witness key.
        timestamp: POSIX seconds, 0 ≤ timestamp ≤ 2^63-1.

    Returns:
        The note with the cosignature line appended.

    Raises:
        NoteError: malformed note, text not a checkpoint, bad timestamp, or
            the note already carries a line from this cosigner.
    """
    parsed = Note.from_bytes(note)
    Checkpoint.from_text(parsed.text)
    return parsed.with_signatures(cosigner.sign(parsed.text, timestamp)).to_bytes()
