"""The ``hansa-audit/v1`` leaf codec: entry types, strict encoding and decoding.

One codec for every reader and writer of audit leaves: the node's store
(:mod:`hansa.node.auditlog`, which re-exports these names), the auditor
(:mod:`hansa.federation.audit`) and tools. Pure: bytes in, typed values out, or a
typed error; no I/O (spec §16.2).

Two decoded forms share one strict check, :func:`unpack_leaf`:

* :func:`decode_entry` returns a typed entry dataclass (:data:`AuditEntry`), for code
  that builds, stores and reads entries one at a time;
* :func:`unpack_leaf` returns a flat :class:`LeafFields` tuple, for readers that go over
  whole logs (an auditor parses every leaf; the flat tuple is the cheapest shape, and
  the common ``request_received`` leaf is checked with one ``struct`` unpack).

Leaf layout (``hansa-audit/v1``)
================================

Every leaf is at most :data:`MAX_LEAF_SIZE` (65,535) bytes, so it fits a C2SP
``tlog-tiles`` entry bundle. All integers are unsigned big-endian; ``[32]`` is a raw
32-byte hash. The layout is a common header, a fixed body chosen by ``entry_type``, and
one trailing length-prefixed byte string ``data``::

    offset  size  field
    0       15    magic        "hansa-audit/v1\\n" (ASCII, version in the magic)
    15      1     entry_type   u8, below
    16      8     log_time_ms  u64, POSIX milliseconds when the node logged the event
    24      B     body         fixed size B for the entry type, below
    24+B    2     data_len     u16
    26+B    n     data         n = data_len bytes; the leaf ends here exactly

    entry_type              body fields (in order)                               B   data
    0x01 request_received   message_id[32] requester_key_id[32]                 64  empty
    0x02 decision           message_id[32] u8 outcome u16 reason                43  data version
                            u64 disclosure_version                                  (UTF-8)
    0x03 answer_sent        request_id[32] answer_id[32]                        64  empty
    0x04 roster_installed   roster_digest[32] u64 roster_version                40  empty
    0x05 key_rotated        old_key_id[32] new_key_id[32]                       64  key role (UTF-8)
    0x06 settings_changed   u8 scope digest[32] u64 settings_version            41  subject (UTF-8)

* ``message_id`` / ``request_id`` / ``answer_id``: SHA-256 of the exact envelope bytes
  (:func:`hansa.protocol.envelope.message_id`). The envelopes themselves are stored
  beside the tree, keyed by that hash (crypto-audit-anchors §6.2): an auditor checks
  they hash to the leaf fields and verifies their signatures.
* ``requester_key_id``, ``old_key_id``, ``new_key_id``: Hansa key ids
  (:func:`hansa.crypto.keys.key_id`); ``old_key_id`` is 32 zero bytes for a first key.
* ``outcome``: 1 answered, 2 answered with suppressed cells, 3 refused. ``reason`` is 0
  for the two answered outcomes and a non-zero wire :class:`ErrorCode` for a refusal.
  ``disclosure_version`` is the dataset's disclosure-settings version the decision
  applied (0 when none applied, e.g. a refusal before the dataset was resolved); ``data``
  holds the dataset's data version string (``"v<counter>-<12 hex>"``), or is empty.
* ``scope``: 1 node configuration, 2 a dataset's disclosure settings; ``data`` names the
  subject (the dataset for scope 2, empty for scope 1). ``digest`` is SHA-256 of the new
  settings as the node holds them.
* Decoding is strict: exact length (no truncation, no trailing bytes), known magic and
  entry type, known enum values, empty ``data`` where the table says so, and valid
  UTF-8 text. A leaf hash is ``SHA-256(0x00 || leaf)`` (RFC 9162 §2.1.1).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final, NamedTuple

from hansa.protocol.errors import ErrorCode, ProtocolError, TooLargeError

__all__ = [
    "ENTRY_NAMES",
    "KEY_ROLE_LOG",
    "KEY_ROLE_NODE",
    "KEY_ROLE_WITNESS",
    "MAGIC",
    "MAX_LEAF_SIZE",
    "AnswerSent",
    "AuditEntry",
    "Decision",
    "EntryType",
    "KeyRotated",
    "LeafFields",
    "Outcome",
    "RequestReceived",
    "RosterInstalled",
    "SettingsChanged",
    "SettingsScope",
    "decode_entry",
    "encode_entry",
    "unpack_leaf",
]

MAGIC: Final = b"hansa-audit/v1\n"
"""The leaf prefix; the format version lives in it."""
_MAGIC_FAMILY: Final = b"hansa-audit/"
MAX_LEAF_SIZE: Final = 65_535
"""Largest leaf in bytes (fits a C2SP tlog-tiles entry bundle, crypto-audit-anchors §0)."""
KEY_ROLE_NODE: Final = "node"
"""``key_rotated`` role of the node key (signs answers, refusals, capabilities)."""
KEY_ROLE_LOG: Final = "log"
"""``key_rotated`` role of the log key (signs checkpoints)."""
KEY_ROLE_WITNESS: Final = "witness"
"""``key_rotated`` role of the witness key (cosigns other cities' checkpoints)."""
HASH_SIZE: Final = 32
"""Size of every hash field (SHA-256; the same as ``hansa.crypto.merkle.HASH_SIZE``)."""
_HEADER: Final = struct.Struct(">15sBQ")
_DATA_LEN: Final = struct.Struct(">H")


class EntryType(enum.IntEnum):
    """``entry_type`` byte of a leaf (module docstring, "Leaf layout")."""

    REQUEST_RECEIVED = 0x01
    DECISION = 0x02
    ANSWER_SENT = 0x03
    ROSTER_INSTALLED = 0x04
    KEY_ROTATED = 0x05
    SETTINGS_CHANGED = 0x06


ENTRY_NAMES: Final[dict[int, str]] = {int(k): k.name.lower() for k in EntryType}
"""Entry type byte to its name in the spec (``request_received`` ...)."""


class Outcome(enum.IntEnum):
    """What the node decided about a request."""

    ANSWERED = 1
    ANSWERED_SUPPRESSED = 2
    REFUSED = 3


class SettingsScope(enum.IntEnum):
    """Which settings a ``settings_changed`` entry records."""

    CONFIG = 1
    DISCLOSURE = 2


def _field_error(message: str) -> ProtocolError:
    return ProtocolError(message, ErrorCode.INVALID_FIELD)


def _check_hash(value: object, name: str) -> None:
    if not isinstance(value, bytes) or len(value) != HASH_SIZE:
        raise _field_error(f"audit entry {name} must be {HASH_SIZE} bytes")


def _check_uint(value: object, bits: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < (1 << bits):
        raise _field_error(f"audit entry {name} must be an integer in 0..2^{bits}-1")


def _check_text(value: object, name: str) -> None:
    if not isinstance(value, str):
        raise _field_error(f"audit entry {name} must be a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates
        raise _field_error(f"audit entry {name} is not encodable as UTF-8") from exc


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """A signed request arrived (logged before the node evaluates it).

    Attributes:
        log_time_ms: POSIX milliseconds when logged.
        message_id: SHA-256 of the request envelope bytes.
        requester_key_id: the requester's Hansa key id.
    """

    log_time_ms: int
    message_id: bytes
    requester_key_id: bytes

    def __post_init__(self) -> None:
        _check_uint(self.log_time_ms, 64, "log_time_ms")
        _check_hash(self.message_id, "message_id")
        _check_hash(self.requester_key_id, "requester_key_id")


@dataclass(frozen=True, slots=True)
class Decision:
    """The node's decision about a request (logged before the answer is sent).

    Attributes:
        log_time_ms: POSIX milliseconds when logged.
        message_id: SHA-256 of the request envelope the decision is about.
        outcome: answered, answered with suppressed cells, or refused.
        reason: 0 when answered; the non-zero wire error code when refused.
        disclosure_version: the disclosure-settings version applied (0: none).
        data_version: the dataset's data version string, or empty.
    """

    log_time_ms: int
    message_id: bytes
    outcome: Outcome
    reason: int = 0
    disclosure_version: int = 0
    data_version: str = ""

    def __post_init__(self) -> None:
        _check_uint(self.log_time_ms, 64, "log_time_ms")
        _check_hash(self.message_id, "message_id")
        if not isinstance(self.outcome, Outcome):
            raise _field_error("decision outcome must be an Outcome")
        _check_uint(self.reason, 16, "reason")
        if (self.outcome is Outcome.REFUSED) != (self.reason != 0):
            raise _field_error("a refusal needs a non-zero reason; an answer needs reason 0")
        _check_uint(self.disclosure_version, 64, "disclosure_version")
        _check_text(self.data_version, "data_version")


@dataclass(frozen=True, slots=True)
class AnswerSent:
    """An answer or refusal envelope is about to be sent.

    Attributes:
        log_time_ms: POSIX milliseconds when logged.
        request_id: SHA-256 of the request envelope answered.
        answer_id: SHA-256 of the answer (or refusal) envelope bytes.
    """

    log_time_ms: int
    request_id: bytes
    answer_id: bytes

    def __post_init__(self) -> None:
        _check_uint(self.log_time_ms, 64, "log_time_ms")
        _check_hash(self.request_id, "request_id")
        _check_hash(self.answer_id, "answer_id")


@dataclass(frozen=True, slots=True)
class RosterInstalled:
    """The node installed a new alliance roster.

    Attributes:
        log_time_ms: POSIX milliseconds when logged.
        roster_digest: SHA-256 of the roster body.
        roster_version: the roster's version number.
    """

    log_time_ms: int
    roster_digest: bytes
    roster_version: int

    def __post_init__(self) -> None:
        _check_uint(self.log_time_ms, 64, "log_time_ms")
        _check_hash(self.roster_digest, "roster_digest")
        _check_uint(self.roster_version, 64, "roster_version")


@dataclass(frozen=True, slots=True)
class KeyRotated:
    """One of the node's keys was replaced.

    Attributes:
        log_time_ms: POSIX milliseconds when logged.
        old_key_id: key id of the retired key (32 zero bytes for a first key).
        new_key_id: key id of the new key.
        role: which key (e.g. ``"node"`` or ``"log"``).
    """

    log_time_ms: int
    old_key_id: bytes
    new_key_id: bytes
    role: str = ""

    def __post_init__(self) -> None:
        _check_uint(self.log_time_ms, 64, "log_time_ms")
        _check_hash(self.old_key_id, "old_key_id")
        _check_hash(self.new_key_id, "new_key_id")
        _check_text(self.role, "role")


@dataclass(frozen=True, slots=True)
class SettingsChanged:
    """The node's configuration or a dataset's disclosure settings changed.

    Attributes:
        log_time_ms: POSIX milliseconds when logged.
        scope: configuration or disclosure settings.
        digest: SHA-256 of the new settings.
        settings_version: the new settings version.
        subject: the dataset name for disclosure settings; empty for configuration.
    """

    log_time_ms: int
    scope: SettingsScope
    digest: bytes
    settings_version: int
    subject: str = ""

    def __post_init__(self) -> None:
        _check_uint(self.log_time_ms, 64, "log_time_ms")
        if not isinstance(self.scope, SettingsScope):
            raise _field_error("settings scope must be a SettingsScope")
        _check_hash(self.digest, "digest")
        _check_uint(self.settings_version, 64, "settings_version")
        _check_text(self.subject, "subject")


AuditEntry = (
    RequestReceived | Decision | AnswerSent | RosterInstalled | KeyRotated | SettingsChanged
)
"""Any decoded audit log entry."""

# Fixed body layouts (module docstring table). Each is packed after the header and
# followed by ``u16 data_len || data``.
_REQUEST: Final = struct.Struct(">32s32s")
_DECISION: Final = struct.Struct(">32sBHQ")
_ANSWER: Final = struct.Struct(">32s32s")
_ROSTER: Final = struct.Struct(">32sQ")
_KEY: Final = struct.Struct(">32s32s")
_SETTINGS: Final = struct.Struct(">B32sQ")
_BODIES: Final[dict[int, struct.Struct]] = {
    int(EntryType.REQUEST_RECEIVED): _REQUEST,
    int(EntryType.DECISION): _DECISION,
    int(EntryType.ANSWER_SENT): _ANSWER,
    int(EntryType.ROSTER_INSTALLED): _ROSTER,
    int(EntryType.KEY_ROTATED): _KEY,
    int(EntryType.SETTINGS_CHANGED): _SETTINGS,
}
_HAS_DATA: Final = frozenset(
    int(k) for k in (EntryType.DECISION, EntryType.KEY_ROTATED, EntryType.SETTINGS_CHANGED)
)
# A whole request_received leaf (header, body, data_len = 0): the common entry.
_REQUEST_LEAF: Final = struct.Struct(">15sBQ32s32sH")
_REQUEST_LEAF_SIZE: Final = _REQUEST_LEAF.size
_unpack_request_leaf: Final = _REQUEST_LEAF.unpack
_pack_request_leaf: Final = _REQUEST_LEAF.pack
_pack_pair_leaf: Final = _REQUEST_LEAF.pack  # answer_sent has the same shape
_DECISION_HEAD: Final = struct.Struct(">15sBQ32sBHQH")
_pack_decision_head: Final = _DECISION_HEAD.pack
_DECISION_TEXT_MAX: Final = MAX_LEAF_SIZE - _DECISION_HEAD.size
# Plain ints for the decoder's comparisons (an IntEnum member costs an attribute lookup).
_REQUEST_KIND: Final = int(EntryType.REQUEST_RECEIVED)
_DECISION_KIND: Final = int(EntryType.DECISION)
_ANSWER_KIND: Final = int(EntryType.ANSWER_SENT)
_ROSTER_KIND: Final = int(EntryType.ROSTER_INSTALLED)
_SETTINGS_KIND: Final = int(EntryType.SETTINGS_CHANGED)
_REFUSED: Final = int(Outcome.REFUSED)
_OUTCOMES: Final = frozenset(int(o) for o in Outcome)
_SCOPES: Final = frozenset(int(s) for s in SettingsScope)


def _parts(entry: AuditEntry) -> tuple[EntryType, bytes, bytes]:
    """Return (type, packed body, data) of an entry."""
    if isinstance(entry, RequestReceived):
        body = _REQUEST.pack(entry.message_id, entry.requester_key_id)
        return EntryType.REQUEST_RECEIVED, body, b""
    if isinstance(entry, Decision):
        body = _DECISION.pack(
            entry.message_id, entry.outcome, entry.reason, entry.disclosure_version
        )
        return EntryType.DECISION, body, entry.data_version.encode("utf-8")
    if isinstance(entry, AnswerSent):
        return EntryType.ANSWER_SENT, _ANSWER.pack(entry.request_id, entry.answer_id), b""
    if isinstance(entry, RosterInstalled):
        body = _ROSTER.pack(entry.roster_digest, entry.roster_version)
        return EntryType.ROSTER_INSTALLED, body, b""
    if isinstance(entry, KeyRotated):
        body = _KEY.pack(entry.old_key_id, entry.new_key_id)
        return EntryType.KEY_ROTATED, body, entry.role.encode("utf-8")
    if isinstance(entry, SettingsChanged):
        body = _SETTINGS.pack(entry.scope, entry.digest, entry.settings_version)
        return EntryType.SETTINGS_CHANGED, body, entry.subject.encode("utf-8")
    raise _field_error(f"not an audit entry: {type(entry).__name__}")


def encode_entry(entry: AuditEntry) -> bytes:
    """Encode an entry as a ``hansa-audit/v1`` leaf.

    Args:
        entry: the entry (its fields were validated when it was built).

    Returns:
        The leaf bytes.

    Raises:
        TooLargeError: the leaf would exceed :data:`MAX_LEAF_SIZE`.
        ProtocolError: ``entry`` is not an audit entry (code ``INVALID_FIELD``).
    """
    # The node logs these three for every request: each is one pack (header, body and
    # data length together), the same bytes as the general path below.
    kind = type(entry)
    if kind is RequestReceived:
        assert isinstance(entry, RequestReceived)
        return _pack_request_leaf(
            MAGIC, _REQUEST_KIND, entry.log_time_ms, entry.message_id, entry.requester_key_id, 0
        )
    if kind is AnswerSent:
        assert isinstance(entry, AnswerSent)
        return _pack_pair_leaf(
            MAGIC, _ANSWER_KIND, entry.log_time_ms, entry.request_id, entry.answer_id, 0
        )
    if kind is Decision:
        assert isinstance(entry, Decision)
        text = entry.data_version.encode("utf-8")
        if len(text) <= _DECISION_TEXT_MAX:
            head = _pack_decision_head(
                MAGIC,
                _DECISION_KIND,
                entry.log_time_ms,
                entry.message_id,
                entry.outcome,
                entry.reason,
                entry.disclosure_version,
                len(text),
            )
            return head + text if text else head
    code, body, data = _parts(entry)
    size = _HEADER.size + len(body) + _DATA_LEN.size + len(data)
    if size > MAX_LEAF_SIZE:
        raise TooLargeError(f"audit leaf of {size} bytes exceeds {MAX_LEAF_SIZE}")
    return b"".join(
        (_HEADER.pack(MAGIC, code, entry.log_time_ms), body, _DATA_LEN.pack(len(data)), data)
    )


class LeafFields(NamedTuple):
    """A strictly checked leaf in flat form (:func:`unpack_leaf`).

    Attributes:
        kind: the entry type byte (an :class:`EntryType` value).
        log_time_ms: when the node says it logged the event.
        first: the first 32-byte field (message id, request id, roster digest, old key
            id, or settings digest).
        second: the second 32-byte field (requester key id, answer id, new key id) or
            empty.
        outcome: decision outcome (an :class:`Outcome` value), or settings scope (a
            :class:`SettingsScope` value); else 0.
        reason: decision reason code; else 0.
        version: disclosure, roster or settings version; else 0.
        text: the trailing UTF-8 data (data version, key role, settings subject).
    """

    kind: int
    log_time_ms: int
    first: bytes
    second: bytes = b""
    outcome: int = 0
    reason: int = 0
    version: int = 0
    text: str = ""


def unpack_leaf(leaf: bytes) -> LeafFields:
    """Check a ``hansa-audit/v1`` leaf strictly and return its fields.

    Strict: exact length (no truncation, no trailing bytes), known magic and entry
    type, known enum values, a reason that fits the outcome, empty ``data`` where the
    layout says so, and valid UTF-8 text.

    Args:
        leaf: the leaf bytes.

    Returns:
        The leaf's fields.

    Raises:
        TooLargeError: the leaf exceeds :data:`MAX_LEAF_SIZE`.
        ProtocolError: truncated, trailing bytes or bad magic (``MALFORMED``), another
            format version (``UNSUPPORTED_VERSION``), or an unknown entry type, enum value,
            non-empty data where none is allowed, or invalid UTF-8 (``INVALID_FIELD``).
    """
    if type(leaf) is not bytes:  # the common case skips the isinstance chain
        if not isinstance(leaf, bytes | bytearray | memoryview):
            raise ProtocolError("an audit leaf must be bytes")
        leaf = bytes(leaf)
    size = len(leaf)
    if size == _REQUEST_LEAF_SIZE and leaf[15] == _REQUEST_KIND:
        # The common entry in one unpack; the same rules as below (magic, empty data).
        magic, _kind, t, mid, kid, n = _unpack_request_leaf(leaf)
        if magic == MAGIC and n == 0:
            return LeafFields(_REQUEST_KIND, t, mid, kid)
    if size > MAX_LEAF_SIZE:
        raise TooLargeError(f"audit leaf of {size} bytes exceeds {MAX_LEAF_SIZE}")
    if size < _HEADER.size:
        raise ProtocolError("audit leaf is truncated (no complete header)")
    magic, kind, t = _HEADER.unpack_from(leaf)
    if magic != MAGIC:
        if magic.startswith(_MAGIC_FAMILY):
            raise ProtocolError(
                f"unsupported audit leaf version {magic!r}", ErrorCode.UNSUPPORTED_VERSION
            )
        raise ProtocolError("not an audit leaf (bad magic)")
    body = _BODIES.get(kind)
    if body is None:
        raise _field_error(f"unknown audit entry type 0x{kind:02x}")
    data_at = _HEADER.size + body.size
    if size < data_at + _DATA_LEN.size:
        raise ProtocolError("audit leaf is truncated (incomplete body)")
    (n,) = _DATA_LEN.unpack_from(leaf, data_at)
    end = data_at + _DATA_LEN.size + n
    if size < end:
        raise ProtocolError("audit leaf is truncated (incomplete data)")
    if size > end:
        raise ProtocolError("audit leaf has trailing bytes")
    text = ""
    if n:
        if kind not in _HAS_DATA:
            raise _field_error(f"audit leaf of type {ENTRY_NAMES[kind]} must carry no data")
        try:
            text = leaf[end - n :].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _field_error("audit leaf data is not valid UTF-8") from exc
    fields = body.unpack_from(leaf, _HEADER.size)
    if kind == _DECISION_KIND:
        mid, outcome, reason, version = fields
        if outcome not in _OUTCOMES:
            raise _field_error(f"unknown decision outcome {outcome}")
        if (outcome == _REFUSED) != (reason != 0):
            raise _field_error("a refusal needs a non-zero reason; an answer needs reason 0")
        return LeafFields(kind, t, mid, b"", outcome, reason, version, text)
    if kind == _ROSTER_KIND:
        digest, version = fields
        return LeafFields(kind, t, digest, version=version)
    if kind == _SETTINGS_KIND:
        scope, digest, version = fields
        if scope not in _SCOPES:
            raise _field_error(f"unknown settings scope {scope}")
        return LeafFields(kind, t, digest, b"", scope, 0, version, text)
    first, second = fields
    return LeafFields(kind, t, first, second, text=text)


def decode_entry(leaf: bytes) -> AuditEntry:
    """Decode a ``hansa-audit/v1`` leaf strictly into its typed entry.

    Args:
        leaf: the leaf bytes.

    Returns:
        The entry.

    Raises:
        TooLargeError: as for :func:`unpack_leaf`.
        ProtocolError: as for :func:`unpack_leaf`.
    """
    f = unpack_leaf(leaf)
    kind, t = f.kind, f.log_time_ms
    if kind == EntryType.REQUEST_RECEIVED:
        return RequestReceived(t, f.first, f.second)
    if kind == EntryType.DECISION:
        return Decision(t, f.first, Outcome(f.outcome), f.reason, f.version, f.text)
    if kind == EntryType.ANSWER_SENT:
        return AnswerSent(t, f.first, f.second)
    if kind == EntryType.ROSTER_INSTALLED:
        return RosterInstalled(t, f.first, f.version)
    if kind == EntryType.KEY_ROTATED:
        return KeyRotated(t, f.first, f.second, f.text)
    return SettingsChanged(t, SettingsScope(f.outcome), f.first, f.version, f.text)
