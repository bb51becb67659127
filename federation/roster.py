"""The alliance roster: who is in the alliance, with which keys and roles.

Theory of operation
-------------------
A roster is a versioned, expiring document (:class:`Roster`) naming the
member cities (node key, endpoint, roles, and optionally the keys of their
audit logs: the log key that signs checkpoints and, for a witness, the key
that cosigns others'; :meth:`Roster.log_verifier`,
:meth:`Roster.witness_verifier`), the analysts (key, home city,
allowed purposes), the purpose vocabulary, an optional witness quorum, and
the *root keys* allowed to sign roster updates with their threshold: one
governance key per member city, as TUF's root role (research notes §5.3).

The body is a tagged MessagePack array like every wire message
(:mod:`hansa.protocol.messages`). It travels as a :class:`SignedRoster`: the
exact body bytes plus any number of ``(key_id, signature)`` pairs, each an
Ed25519 signature over ``PAE(ROSTER_PAYLOAD_TYPE, body)``
(:func:`hansa.protocol.envelope.pae`). Signatures cover the exact bytes; the
body is never re-encoded to be verified.

Trust follows TUF's root rotation (research notes §5.3, client rules 1–4):

- The first roster is trusted because the operator pins it (its SHA-256 is
  given out of band, or it comes with the install); it must carry a
  threshold of signatures by its *own* root keys.
- Version N+1 is accepted only if a threshold of the root keys of version N
  *and* a threshold of its own root keys signed it, its version is exactly
  N+1 and it names the same alliance. :func:`update_chain` walks several
  versions one at a time.
- A version lower than or equal to the trusted one is a rollback and is
  refused. An expired roster is refused (for a chain: the final one).
- Thresholds count unique key ids: a key that signs twice counts once.
- Revocation is signing a new version without the member, analyst or key.

All functions are pure: the caller passes the current time in milliseconds.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import re
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Final

import msgspec
from msgspec import Meta

from hansa.crypto.keys import PublicKey, SigningKey
from hansa.crypto.note import NoteVerifier, SignatureType
from hansa.protocol.codec import decode_as, encode
from hansa.protocol.envelope import pae
from hansa.protocol.errors import (
    ErrorCode,
    FreshnessError,
    HansaError,
    ProtocolError,
    SignatureError,
)
from hansa.protocol.messages import (
    CITY_ID_PATTERN,
    PRINCIPAL_ID_PATTERN,
    TOKEN_PATTERN,
    CityId,
    PrincipalId,
    PublicKeyBytes,
    Token,
)

__all__ = [
    "MAX_ANALYSTS",
    "MAX_MEMBERS",
    "MAX_ROSTER_SIGNATURES",
    "MAX_ROSTER_SIZE",
    "ROSTER_PAYLOAD_TYPE",
    "Analyst",
    "KeyHolder",
    "Member",
    "Role",
    "RootKey",
    "Roster",
    "RosterSignature",
    "SignedRoster",
    "decode_roster",
    "decode_signed_roster",
    "default_log_origin",
    "encode_signed_roster",
    "roster_digest",
    "sign_roster",
    "signed_by",
    "unsigned",
    "update_chain",
    "verify_roster",
]

ROSTER_PAYLOAD_TYPE: Final = "application/vnd.hansa.roster.v1+msgpack"
"""The PAE payload type roster signatures cover (domain separation from envelopes)."""

MAX_MEMBERS: Final = 1000
MAX_ANALYSTS: Final = 10_000
MAX_PURPOSES: Final = 256
MAX_ROSTER_SIGNATURES: Final = 1000
MAX_ROSTER_SIZE: Final = 4 * 1024 * 1024
MAX_ALLIANCE_NAME: Final = 128
MAX_DISPLAY_NAME: Final = 256
MAX_URL: Final = 2048

AllianceName = Annotated[str, Meta(min_length=1, max_length=MAX_ALLIANCE_NAME)]
DisplayName = Annotated[str, Meta(min_length=1, max_length=MAX_DISPLAY_NAME)]
Url = Annotated[str, Meta(min_length=1, max_length=MAX_URL)]
Version = Annotated[int, Meta(ge=1, le=2**53)]
Millis = Annotated[int, Meta(ge=0, le=2**53)]
KeyId = Annotated[bytes, Meta(min_length=32, max_length=32)]
SignatureBytes = Annotated[bytes, Meta(min_length=64, max_length=64)]

_CITY_RE: Final = re.compile(CITY_ID_PATTERN)
_PRINCIPAL_RE: Final = re.compile(PRINCIPAL_ID_PATTERN)
_TOKEN_RE: Final = re.compile(TOKEN_PATTERN)
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NOT_IN_ORIGIN: Final = re.compile(r"[^!-*,-~]")  # printable ASCII except "+"


def default_log_origin(alliance: str | None, city: str) -> str:
    """Return a city's default log origin, ``hansa/<alliance>/<city>`` (spec §16.1).

    Args:
        alliance: the alliance name, or None for a node outside any alliance
            (``hansa/local/<city>``).
        city: the city id.

    Returns:
        The origin; every character of the alliance name outside printable ASCII,
        and every ``+``, becomes ``-`` (origins carry no white space and no ``+``).
    """
    name = _NOT_IN_ORIGIN.sub("-", alliance) if alliance else "local"
    return f"hansa/{name}/{city}"


class Role(enum.StrEnum):
    """What a key may do in the alliance."""

    MEMBER = "member"
    """A city node that answers queries."""
    ANALYST = "analyst"
    """A principal that may send queries."""
    AUDITOR = "auditor"
    """May fetch and verify audit logs."""
    WITNESS = "witness"
    """Cosigns other cities' log checkpoints."""


class _RosterWire(
    msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True, tag_field="kind"
):
    """Base of the roster structs: immutable, positional, tagged."""


def _check_key(raw: bytes, what: str) -> PublicKey:
    try:
        return PublicKey(raw)
    except HansaError as exc:
        # msgspec turns ValueError raised in __post_init__ into INVALID_FIELD.
        raise ValueError(f"{what}: {exc.message}") from exc


def _check_name(pattern: re.Pattern[str], name: str, what: str) -> None:
    if pattern.fullmatch(name) is None:
        shown = name if len(name) <= 64 else name[:64] + "…"
        raise ValueError(f"invalid {what} {shown!r}")


def _check_text(text: str, what: str) -> None:
    if not text.strip() or _CONTROL.search(text) is not None:
        raise ValueError(f"{what} must be non-blank text without control characters")


def _check_url(url: str) -> None:
    """Accept only absolute http(s) URLs with a host and no credentials or fragment."""
    _check_text(url, "endpoint")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # raises ValueError for a port out of range or not a number
    except ValueError as exc:
        raise ValueError(f"invalid endpoint URL {url[:64]!r}: {exc}") from exc
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"endpoint {url[:64]!r} must be an http or https URL")
    if not parts.hostname:
        raise ValueError(f"endpoint {url[:64]!r} has no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"endpoint {url[:64]!r} must not carry credentials")
    if parts.fragment or url.endswith("#"):
        raise ValueError(f"endpoint {url[:64]!r} must not have a fragment")
    if port == 0 or " " in url:
        raise ValueError(f"endpoint {url[:64]!r} is not a usable URL")


def _unique(values: Sequence[object]) -> bool:
    return len(set(values)) == len(values)


class RootKey(_RosterWire, frozen=True, tag="root-key"):
    """A governance key allowed to sign roster updates, held by one city.

    Attributes:
        city: the city holding the key.
        public_key: its 32-byte Ed25519 public key.
    """

    city: CityId
    public_key: PublicKeyBytes

    def __post_init__(self) -> None:
        _check_name(_CITY_RE, self.city, "city id")
        _check_key(self.public_key, f"root key of {self.city}")


class Member(_RosterWire, frozen=True, tag="member"):
    """A member city.

    The two trailing keys are optional so that rosters written before they existed
    still decode; a roster that names them ends trust on first use of the city's
    ``GET /v1/log/keys`` (spec §16.1).

    Attributes:
        city: its city id (as :data:`hansa.protocol.messages.CityId`).
        name: display name.
        public_key: the node's message-signing key.
        endpoint: base URL of its node (http or https).
        roles: what the city does in the alliance (unique, non-empty).
        log_key: the Ed25519 key that signs the city's log checkpoints (its
            ``log.key``), or None when the roster does not pin it.
        witness_key: the Ed25519 key the city cosigns other logs' checkpoints
            with (its ``witness.key``), or None; only for a city with the
            witness role.
    """

    city: CityId
    name: DisplayName
    public_key: PublicKeyBytes
    endpoint: Url
    roles: Annotated[tuple[Role, ...], Meta(min_length=1, max_length=4)]
    log_key: PublicKeyBytes | None = None
    witness_key: PublicKeyBytes | None = None

    def __post_init__(self) -> None:
        _check_name(_CITY_RE, self.city, "city id")
        _check_text(self.name, "display name")
        _check_key(self.public_key, f"node key of {self.city}")
        _check_url(self.endpoint)
        if not self.roles or not _unique(self.roles):
            raise ValueError(f"roles of {self.city} must be non-empty and unique")
        if self.log_key is not None:
            _check_key(self.log_key, f"log key of {self.city}")
        if self.witness_key is not None:
            if Role.WITNESS not in self.roles:
                raise ValueError(f"{self.city} has a witness key but not the witness role")
            _check_key(self.witness_key, f"witness key of {self.city}")

    def keys(self) -> list[bytes]:
        """Return the keys this member signs with (node, then log and witness if named)."""
        return [k for k in (self.public_key, self.log_key, self.witness_key) if k is not None]


class Analyst(_RosterWire, frozen=True, tag="analyst"):
    """A person or service that may send queries for some purposes.

    Attributes:
        principal: the analyst's principal id (e.g. ``ana@melbourne``).
        public_key: the key that signs its requests.
        home_city: the member city vouching for it.
        purposes: purposes it may query for (tokens of the roster vocabulary).
    """

    principal: PrincipalId
    public_key: PublicKeyBytes
    home_city: CityId
    purposes: Annotated[tuple[Token, ...], Meta(max_length=MAX_PURPOSES)]

    def __post_init__(self) -> None:
        _check_name(_PRINCIPAL_RE, self.principal, "principal id")
        _check_name(_CITY_RE, self.home_city, "city id")
        _check_key(self.public_key, f"key of analyst {self.principal}")
        for purpose in self.purposes:
            _check_name(_TOKEN_RE, purpose, "purpose")
        if not _unique(self.purposes):
            raise ValueError(f"purposes of analyst {self.principal} repeat")


@dataclass(frozen=True, slots=True)
class KeyHolder:
    """Who holds a (non-root) key the roster names, and what it may do.

    Attributes:
        principal: a city id (node key) or an analyst principal id.
        public_key: the key.
        roles: the roles the key may act in.
    """

    principal: str
    public_key: PublicKey
    roles: frozenset[Role]


class Roster(_RosterWire, frozen=True, tag="roster", dict=True):
    """One version of the alliance roster (the signed body).

    Every rule below is checked on construction and on decoding, so a
    :class:`Roster` value is always a consistent roster.

    Attributes:
        alliance: the alliance's name (constant across versions).
        version: 1 for the first roster, then exactly +1 per update.
        expires_ms: expiry, milliseconds since the Unix epoch (UTC).
        threshold: how many distinct root keys must sign (1..len(root_keys)).
        root_keys: the governance keys allowed to sign roster updates.
        members: member cities (unique city ids).
        analysts: analysts (unique principals, home city a member).
        purposes: the purpose vocabulary (unique tokens).
        witness_quorum: how many witness cosignatures a checkpoint needs, or
            None. A city's own cosignature never counts for its own log, so it is at
            most the number of witness cities other than any one member (the
            number of witness cities minus one when there is one).
    """

    alliance: AllianceName
    version: Version
    expires_ms: Millis
    threshold: Annotated[int, Meta(ge=1, le=MAX_MEMBERS)]
    root_keys: Annotated[tuple[RootKey, ...], Meta(min_length=1, max_length=MAX_MEMBERS)]
    members: Annotated[tuple[Member, ...], Meta(max_length=MAX_MEMBERS)]
    analysts: Annotated[tuple[Analyst, ...], Meta(max_length=MAX_ANALYSTS)]
    purposes: Annotated[tuple[Token, ...], Meta(max_length=MAX_PURPOSES)]
    witness_quorum: Annotated[int, Meta(ge=1, le=MAX_MEMBERS)] | None = None

    def __post_init__(self) -> None:
        _check_text(self.alliance, "alliance name")
        if self.version < 1:
            raise ValueError("roster version must be at least 1")
        if not 1 <= self.threshold <= len(self.root_keys):
            raise ValueError(
                f"threshold {self.threshold} must be between 1 and the "
                f"{len(self.root_keys)} root keys"
            )
        if not _unique([k.public_key for k in self.root_keys]):
            raise ValueError("a root key is listed twice")
        if not _unique([k.city for k in self.root_keys]):
            raise ValueError("a city holds more than one root key")
        cities = [m.city for m in self.members]
        if not _unique(cities):
            raise ValueError("a member city is listed twice")
        city_set = set(cities)
        for key in self.root_keys:
            if key.city not in city_set:
                raise ValueError(f"root key holder {key.city!r} is not a member city")
        for purpose in self.purposes:
            _check_name(_TOKEN_RE, purpose, "purpose")
        if not _unique(self.purposes):
            raise ValueError("a purpose is listed twice")
        vocabulary = set(self.purposes)
        principals = [a.principal for a in self.analysts]
        if not _unique(principals):
            raise ValueError("an analyst is listed twice")
        for analyst in self.analysts:
            if analyst.principal in city_set:
                raise ValueError(f"analyst {analyst.principal!r} has the id of a member city")
            if analyst.home_city not in city_set:
                raise ValueError(
                    f"home city {analyst.home_city!r} of {analyst.principal!r} is not a member"
                )
            unknown = [p for p in analyst.purposes if p not in vocabulary]
            if unknown:
                raise ValueError(
                    f"purpose {unknown[0]!r} of {analyst.principal!r} is not in the vocabulary"
                )
        # One key, one holder: a node or analyst key names exactly one principal,
        # so a signature never leaves doubt about who made it.
        if not _unique(
            [m.public_key for m in self.members] + [a.public_key for a in self.analysts]
        ):
            raise ValueError("a node or analyst key is listed twice")
        # One key, one role (spec §3.4): a log or witness key is no node, analyst or
        # other log or witness key.
        if not _unique(
            [k for m in self.members for k in m.keys()] + [a.public_key for a in self.analysts]
        ):
            raise ValueError("a log or witness key is listed twice or is also another key")
        if self.witness_quorum is not None:
            witnesses = sum(Role.WITNESS in m.roles for m in self.members)
            # A city's own cosignature never counts for its own log (spec §15.1), so every
            # member's log must be able to reach the quorum with the *other* witness cities:
            # a witness city's log has one fewer to draw on.
            reachable = min(
                (witnesses - (Role.WITNESS in m.roles) for m in self.members), default=0
            )
            if not 1 <= self.witness_quorum <= reachable:
                raise ValueError(
                    f"witness quorum {self.witness_quorum} must be between 1 and {reachable}: "
                    f"with {witnesses} witness cities, a witness city's own log can gather "
                    f"at most {max(witnesses - 1, 0)} cosignatures (it does not witness itself)"
                )

    # --- derived indexes (computed once per value) --------------------------------

    @functools.cached_property
    def root_key_ids(self) -> Mapping[bytes, PublicKey]:
        """Root keys by key id: who may sign the next roster version."""
        return {(pk := PublicKey(k.public_key)).key_id: pk for k in self.root_keys}

    @functools.cached_property
    def _members(self) -> Mapping[str, Member]:
        return {m.city: m for m in self.members}

    @functools.cached_property
    def _analysts(self) -> Mapping[str, Analyst]:
        return {a.principal: a for a in self.analysts}

    @functools.cached_property
    def holders(self) -> Mapping[bytes, KeyHolder]:
        """Every node and analyst key by key id, with its holder and roles."""
        table: dict[bytes, KeyHolder] = {}
        for m in self.members:
            pk = PublicKey(m.public_key)
            table[pk.key_id] = KeyHolder(m.city, pk, frozenset(m.roles))
        for a in self.analysts:
            pk = PublicKey(a.public_key)
            table[pk.key_id] = KeyHolder(a.principal, pk, frozenset({Role.ANALYST}))
        return table

    @functools.cached_property
    def _by_role(self) -> Mapping[Role, Mapping[bytes, PublicKey]]:
        table: dict[Role, dict[bytes, PublicKey]] = {role: {} for role in Role}
        for kid, holder in self.holders.items():
            for role in holder.roles:
                table[role][kid] = holder.public_key
        return table

    # --- queries ---------------------------------------------------------------

    def member(self, city: str) -> Member | None:
        """Return the member city ``city``, or None if it is not a member."""
        return self._members.get(city)

    def analyst(self, principal: str) -> Analyst | None:
        """Return the analyst ``principal``, or None if the roster does not name it."""
        return self._analysts.get(principal)

    def log_verifier(self, city: str, origin: str | None = None) -> NoteVerifier | None:
        """Return the log key the roster pins for ``city`` as a checkpoint verifier.

        Args:
            city: the member city.
            origin: the log's origin, the verifier's name (default:
                :func:`default_log_origin` of this alliance and ``city``).

        Returns:
            An Ed25519 (type ``0x01``) note verifier, or None when ``city`` is no
            member or its entry names no log key (the caller then falls back to
            trust on first use, and says so).

        Raises:
            NoteError: ``origin`` is not a valid note key name.
        """
        member = self._members.get(city)
        if member is None or member.log_key is None:
            return None
        name = default_log_origin(self.alliance, city) if origin is None else origin
        return NoteVerifier(name, PublicKey(member.log_key))

    def witness_verifier(self, city: str) -> NoteVerifier | None:
        """Return the witness key the roster pins for ``city`` as a cosignature verifier.

        Args:
            city: the member city.

        Returns:
            A cosignature/v1 (type ``0x04``) verifier named ``witness/<city>``, or
            None when ``city`` is no witness member or its entry names no witness key.
        """
        member = self._members.get(city)
        if member is None or member.witness_key is None:
            return None
        return NoteVerifier(
            f"witness/{city}", PublicKey(member.witness_key), SignatureType.COSIGNATURE_V1
        )

    def keys_for_role(self, role: Role) -> Mapping[bytes, PublicKey]:
        """Return the keys that may act in ``role``, by key id.

        The mapping is a :data:`hansa.crypto.envelope.KeyLookup`: pass it to
        ``open_envelope`` to accept messages only from keys in that role.

        Args:
            role: the role asked for (analyst keys for :attr:`Role.ANALYST`
                include member cities that hold the analyst role).

        Returns:
            Key id to public key.
        """
        return self._by_role[role]

    def holder(self, kid: bytes) -> KeyHolder | None:
        """Return who holds the key with id ``kid``, or None (a ``KeyLookup`` helper).

        Args:
            kid: a 32-byte key id.

        Returns:
            The holder, its key and roles; None for a key the roster does not name.
        """
        return self.holders.get(kid)

    def lookup(self, kid: bytes) -> PublicKey | None:
        """Return the public key with id ``kid`` if the roster names it (any role).

        Usable directly as a :data:`hansa.crypto.envelope.KeyLookup`.
        """
        holder = self.holders.get(kid)
        return None if holder is None else holder.public_key

    def is_allowed(self, principal: str, kid: bytes, role: Role) -> bool:
        """Return whether ``principal`` signing with key ``kid`` may act in ``role``.

        Args:
            principal: the claimed city id or analyst principal id.
            kid: the key id that signed.
            role: the role the message needs.

        Returns:
            True only if the roster names that key for that principal with
            that role.
        """
        holder = self.holders.get(kid)
        return holder is not None and holder.principal == principal and role in holder.roles

    def allows_purpose(self, principal: str, purpose: str) -> bool:
        """Return whether analyst ``principal`` may query for ``purpose``.

        Member cities holding the analyst role may use any purpose of the vocabulary.
        """
        analyst = self._analysts.get(principal)
        if analyst is not None:
            return purpose in analyst.purposes
        member = self._members.get(principal)
        return member is not None and Role.ANALYST in member.roles and purpose in self.purposes


class RosterSignature(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """One signature on a roster: ``[key_id, signature]``."""

    key_id: KeyId
    signature: SignatureBytes


class SignedRoster(_RosterWire, frozen=True, tag="signed-roster"):
    """A roster body with its signatures (the roster file format).

    Attributes:
        body: the exact MessagePack bytes of a :class:`Roster`.
        signatures: Ed25519 signatures over ``pae(ROSTER_PAYLOAD_TYPE, body)``.
    """

    body: Annotated[bytes, Meta(max_length=MAX_ROSTER_SIZE)]
    signatures: Annotated[tuple[RosterSignature, ...], Meta(max_length=MAX_ROSTER_SIGNATURES)]


# --- codec ---------------------------------------------------------------------


def decode_roster(body: bytes) -> Roster:
    """Strictly decode roster body bytes.

    Args:
        body: the body bytes.

    Returns:
        The roster.

    Raises:
        ProtocolError: malformed bytes, or a field or rule violated.
    """
    return decode_as(body, Roster, max_size=MAX_ROSTER_SIZE)


def encode_signed_roster(signed: SignedRoster) -> bytes:
    """Return the file/wire bytes of a signed roster."""
    return encode(signed)


def decode_signed_roster(data: bytes) -> SignedRoster:
    """Strictly decode signed-roster bytes (the body is not decoded here).

    Raises:
        ProtocolError: the bytes are not one signed roster.
    """
    return decode_as(data, SignedRoster, max_size=MAX_ROSTER_SIZE + 65 * MAX_ROSTER_SIGNATURES + 64)


def roster_digest(signed: SignedRoster) -> bytes:
    """Return SHA-256 of the roster body: what an operator pins for the first roster."""
    return hashlib.sha256(signed.body).digest()


def unsigned(roster: Roster) -> SignedRoster:
    """Encode ``roster`` as a signed roster without signatures (a draft).

    Raises:
        ProtocolError: the roster breaks a rule its receivers check when decoding.
    """
    body = encode(roster)
    decode_roster(body)  # only sign what every receiver accepts (like hansa.crypto.seal)
    return SignedRoster(body=body, signatures=())


def sign_roster(signed: SignedRoster, key: SigningKey) -> SignedRoster:
    """Add (or replace) ``key``'s signature; signatures stay sorted by key id.

    The caller decides whether the key may sign (see :func:`verify_roster`);
    a signature by a key no roster names is simply never counted.

    Args:
        signed: the roster to sign.
        key: the signing key.

    Returns:
        The roster with one signature by ``key``.
    """
    signature = key.sign(pae(ROSTER_PAYLOAD_TYPE, signed.body))
    others = [s for s in signed.signatures if s.key_id != key.key_id]
    merged = sorted([*others, RosterSignature(key.key_id, signature)], key=lambda s: s.key_id)
    return SignedRoster(body=signed.body, signatures=tuple(merged))


def signed_by(signed: SignedRoster, keys: Mapping[bytes, PublicKey]) -> frozenset[bytes]:
    """Return the ids of the keys in ``keys`` with a valid signature on ``signed``.

    Unknown key ids and invalid signatures are ignored; a key id that
    appears several times counts once (TUF: thresholds count unique key ids).
    """
    message = pae(ROSTER_PAYLOAD_TYPE, signed.body)
    valid: set[bytes] = set()
    for sig in signed.signatures:
        if sig.key_id in valid:
            continue
        pk = keys.get(sig.key_id)
        if pk is not None and pk.verify(message, sig.signature):
            valid.add(sig.key_id)
    return frozenset(valid)


# --- trust (TUF root rotation) -------------------------------------------------


def _require_threshold(signed: SignedRoster, signers: Roster, whose: str, version: int) -> None:
    count = len(signed_by(signed, signers.root_key_ids))
    if count < signers.threshold:
        raise SignatureError(
            f"roster version {version} has {count} valid signature(s) by {whose} root keys; "
            f"{signers.threshold} needed",
            ErrorCode.BAD_SIGNATURE,
        )


def _verify_step(signed: SignedRoster, trusted: Roster | None, pin: bytes | None) -> Roster:
    if trusted is None and pin is not None and roster_digest(signed) != pin:
        raise SignatureError(
            "the roster does not match its pinned SHA-256", ErrorCode.ROSTER_MISMATCH
        )
    roster = decode_roster(signed.body)
    if trusted is not None:
        if roster.alliance != trusted.alliance:
            raise SignatureError(
                f"roster is for alliance {roster.alliance!r}, not {trusted.alliance!r}",
                ErrorCode.ROSTER_MISMATCH,
            )
        if roster.version <= trusted.version:
            raise FreshnessError(
                f"roster version {roster.version} is not newer than the trusted version "
                f"{trusted.version} (rollback refused)",
                ErrorCode.ROSTER_MISMATCH,
            )
        if roster.version != trusted.version + 1:
            raise FreshnessError(
                f"roster version {roster.version} skips versions after the trusted version "
                f"{trusted.version}; apply each version in turn",
                ErrorCode.ROSTER_MISMATCH,
            )
        _require_threshold(signed, trusted, f"version {trusted.version}'s", roster.version)
    _require_threshold(signed, roster, "its own", roster.version)
    return roster


def _check_expiry(roster: Roster, now_ms: int) -> None:
    if now_ms >= roster.expires_ms:
        raise FreshnessError(
            f"roster version {roster.version} expired at {roster.expires_ms} ms (now {now_ms} ms)",
            ErrorCode.EXPIRED,
        )


def verify_roster(
    signed: SignedRoster, trusted: Roster | None, now_ms: int, *, pin: bytes | None = None
) -> Roster:
    """Verify a roster against the trusted one (or as the first, pinned roster).

    Args:
        signed: the candidate roster.
        trusted: the currently trusted roster, or None to verify ``signed``
            as the first roster (trust on its own threshold and, if given,
            ``pin``).
        now_ms: the current time, milliseconds since the Unix epoch.
        pin: SHA-256 of the first roster's body (only used when ``trusted``
            is None).

    Returns:
        The verified roster, to be trusted from now on.

    Raises:
        ProtocolError: the body is not a valid roster.
        SignatureError: ``BAD_SIGNATURE`` when a threshold (of the trusted
            version's root keys or of its own) is not met;
            ``ROSTER_MISMATCH`` for another alliance or a wrong pin.
        FreshnessError: ``ROSTER_MISMATCH`` for a rollback (version ≤
            trusted) or a skipped version; ``EXPIRED`` when expired.
    """
    roster = _verify_step(signed, trusted, pin)
    _check_expiry(roster, now_ms)
    return roster


def update_chain(
    trusted: Roster | None,
    chain: Iterable[SignedRoster],
    now_ms: int,
    *,
    pin: bytes | None = None,
) -> Roster:
    """Walk roster versions one at a time from ``trusted`` to the newest.

    As TUF's root update: each step needs both thresholds and exactly the
    next version; intermediate versions may have expired since, only the
    final roster must be unexpired (freeze-attack check).

    Args:
        trusted: the trusted roster, or None when the chain starts with the
            pinned first roster.
        chain: consecutive versions, oldest first (at least one).
        now_ms: the current time, milliseconds since the Unix epoch.
        pin: SHA-256 of the first roster's body when ``trusted`` is None.

    Returns:
        The newest verified roster.

    Raises:
        ProtocolError: a body is invalid, or ``chain`` is empty (``INVALID_FIELD``).
        SignatureError: as :func:`verify_roster`.
        FreshnessError: as :func:`verify_roster`.
    """
    current = trusted
    for signed in chain:
        current = _verify_step(signed, current, pin if current is None else None)
    if current is None or current is trusted:
        raise ProtocolError("no roster to update to", ErrorCode.INVALID_FIELD)
    _check_expiry(current, now_ms)
    return current
