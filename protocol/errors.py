"""Wire error codes and the single exception tree of Hansa.

Every failure Hansa reports, locally or on the wire, is a :class:`HansaError`
carrying an :class:`ErrorCode`. The codes are part of the protocol
(``spec/protocol.md`` §9); their numeric values never change meaning.

The tree is shallow and split by concern::

    HansaError
    ├── ProtocolError        bytes that do not form a valid message
    │   └── TooLargeError    a declared size or count limit was exceeded
    ├── SignatureError       a signature, key or key id failed verification
    ├── FreshnessError       expired, future-dated, wrong audience or replayed
    ├── KeyFileError         a key file is unreadable, corrupt or too open
    ├── NoteError            a C2SP signed note or checkpoint is malformed or unverified
    ├── ProofError           a Merkle proof request is impossible (bad size or index)
    ├── QueryError           a query is invalid against a dataset's schema
    ├── PolicyDenied         the node's policy refuses the request (a verdict)
    └── ConfigError          operator configuration is invalid
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = [
    "ConfigError",
    "ErrorCode",
    "FreshnessError",
    "HansaError",
    "KeyFileError",
    "NoteError",
    "PolicyDenied",
    "ProofError",
    "ProtocolError",
    "QueryError",
    "SignatureError",
    "TooLargeError",
]


class ErrorCode(enum.IntEnum):
    """Wire error codes (``spec/protocol.md`` §9).

    Codes are grouped by hundreds: 1xx envelope and encoding, 2xx
    authentication and freshness, 3xx query validity, 4xx policy and
    disclosure, 5xx execution and node state, 6xx local-only (never sent).
    """

    # 1xx — the bytes are not an acceptable message
    MALFORMED = 100
    TOO_LARGE = 101
    UNSUPPORTED_VERSION = 102
    UNKNOWN_PAYLOAD_TYPE = 103
    INVALID_FIELD = 104

    # 2xx — who sent it and whether it is fresh
    BAD_SIGNATURE = 200
    UNKNOWN_KEY = 201
    INVALID_KEY = 202
    WRONG_AUDIENCE = 203
    EXPIRED = 204
    NOT_YET_VALID = 205
    VALIDITY_TOO_LONG = 206
    REPLAYED = 207
    ROSTER_MISMATCH = 208
    REPLAY_CACHE_FULL = 209

    # 3xx — the query does not fit the dataset
    UNKNOWN_DATASET = 300
    UNKNOWN_COLUMN = 301
    TYPE_MISMATCH = 302
    COLUMN_ROLE_FORBIDDEN = 303
    AGGREGATE_NOT_ALLOWED = 304
    TOO_MANY_GROUPS = 305
    INVALID_QUERY = 306

    # 4xx — the node's policy says no
    PURPOSE_NOT_ALLOWED = 400
    REQUESTER_NOT_ALLOWED = 401
    SCOPE_NOT_ALLOWED = 402
    QUORUM_TOO_SMALL = 403
    BUDGET_EXHAUSTED = 404
    RATE_LIMITED = 405
    POLICY_REFUSED = 406

    # 5xx — the node could not complete the work
    QUERY_TIMEOUT = 500
    RESOURCE_LIMIT = 501
    UNAVAILABLE = 502
    INTERNAL = 503

    # 6xx — local failures that are never put on the wire
    KEY_FILE = 600
    CONFIG = 601
    NOTE = 602
    PROOF = 603

    @property
    def meaning(self) -> str:
        """One-line meaning of the code, as written in the spec."""
        return _MEANINGS[self]

    @property
    def on_wire(self) -> bool:
        """Whether the code may be sent to a peer (every code below 600)."""
        return self.value < _LOCAL_ONLY


_LOCAL_ONLY: Final = 600


_MEANINGS: dict[ErrorCode, str] = {
    ErrorCode.MALFORMED: "bytes are not a well-formed message of the expected type",
    ErrorCode.TOO_LARGE: "a message, field or count exceeds its declared limit",
    ErrorCode.UNSUPPORTED_VERSION: "envelope or message version is not supported",
    ErrorCode.UNKNOWN_PAYLOAD_TYPE: "envelope payload type is not one this endpoint accepts",
    ErrorCode.INVALID_FIELD: "a field is well-typed but violates a rule of the message",
    ErrorCode.BAD_SIGNATURE: "the signature does not verify over the received bytes",
    ErrorCode.UNKNOWN_KEY: "the signer key id is not trusted for this role",
    ErrorCode.INVALID_KEY: "a public key is not a canonical, prime-order Ed25519 point",
    ErrorCode.WRONG_AUDIENCE: "the request is addressed to another city",
    ErrorCode.EXPIRED: "the request's expires_at, or the node's roster, has passed",
    ErrorCode.NOT_YET_VALID: "the request's issued_at is further in the future than the skew",
    ErrorCode.VALIDITY_TOO_LONG: "expires_at - issued_at exceeds the maximum validity",
    ErrorCode.REPLAYED: "this message id or (requester, nonce) was already seen",
    ErrorCode.ROSTER_MISMATCH: "the request names a roster version the node does not hold",
    ErrorCode.REPLAY_CACHE_FULL: "the replay cache is full of unexpired entries; retry later",
    ErrorCode.UNKNOWN_DATASET: "no dataset with that name is published",
    ErrorCode.UNKNOWN_COLUMN: "no column with that name in the dataset",
    ErrorCode.TYPE_MISMATCH: "a literal does not match its column's type",
    ErrorCode.COLUMN_ROLE_FORBIDDEN: "the column's role forbids this use",
    ErrorCode.AGGREGATE_NOT_ALLOWED: "the aggregate is not offered on this column",
    ErrorCode.TOO_MANY_GROUPS: "the answer would exceed the cap on groups",
    ErrorCode.INVALID_QUERY: "the query is structurally invalid",
    ErrorCode.PURPOSE_NOT_ALLOWED: "the purpose is not allowed for this dataset or this analyst",
    ErrorCode.REQUESTER_NOT_ALLOWED: "the requester may not query this dataset",
    ErrorCode.SCOPE_NOT_ALLOWED: "the requested result scope is not allowed",
    ErrorCode.QUORUM_TOO_SMALL: "fewer participating cities than the node's minimum",
    ErrorCode.BUDGET_EXHAUSTED: "the requester's privacy budget is exhausted",
    ErrorCode.RATE_LIMITED: "too many requests from this requester",
    ErrorCode.POLICY_REFUSED: "the node's policy refuses the request",
    ErrorCode.QUERY_TIMEOUT: "the query exceeded the node's time limit",
    ErrorCode.RESOURCE_LIMIT: "the query exceeded the node's memory or size limit",
    ErrorCode.UNAVAILABLE: "the node is temporarily unable to answer",
    ErrorCode.INTERNAL: "an unexpected error inside the node",
    ErrorCode.KEY_FILE: "a key file could not be read, decrypted or trusted",
    ErrorCode.CONFIG: "the configuration is invalid",
    ErrorCode.NOTE: "a signed note or checkpoint is malformed or does not verify",
    ErrorCode.PROOF: "a Merkle proof cannot be produced for these sizes or index",
}


class HansaError(Exception):
    """Root of every error Hansa raises.

    Attributes:
        code: the wire error code describing the failure.
        message: a one-line human readable explanation (never contains secrets).
    """

    default_code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code if code is not None else self.default_code

    def __str__(self) -> str:
        return self.message


class ProtocolError(HansaError):
    """The bytes do not form a valid message (malformed, wrong type, bad field)."""

    default_code = ErrorCode.MALFORMED


class TooLargeError(ProtocolError):
    """A declared size or count limit was exceeded."""

    default_code = ErrorCode.TOO_LARGE


class SignatureError(HansaError):
    """A signature, public key or key id failed verification."""

    default_code = ErrorCode.BAD_SIGNATURE


class FreshnessError(HansaError):
    """A request is expired, future-dated, misaddressed or replayed."""

    default_code = ErrorCode.EXPIRED


class KeyFileError(HansaError):
    """A key file is missing, corrupt, too open, or the passphrase is wrong."""

    default_code = ErrorCode.KEY_FILE


class NoteError(HansaError):
    """A C2SP signed note, checkpoint or cosignature is malformed or unverified."""

    default_code = ErrorCode.NOTE


class ProofError(HansaError):
    """A Merkle proof cannot be produced (index or size out of range)."""

    default_code = ErrorCode.PROOF


class QueryError(HansaError):
    """A query does not validate against the dataset's schema."""

    default_code = ErrorCode.INVALID_QUERY


class PolicyDenied(HansaError):
    """The node's policy refuses the request; ``code`` says which rule."""

    default_code = ErrorCode.POLICY_REFUSED


class ConfigError(HansaError):
    """Operator configuration is invalid."""

    default_code = ErrorCode.CONFIG
