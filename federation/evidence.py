"""Evidence bundles: one file anyone can check a federated answer against.

Theory of operation
-------------------
After a fan-out (:func:`hansa.federation.fanout.fan_out`) the analyst keeps
an :class:`EvidenceBundle` (issue 4, part 3): the query and policy asked,
the signed roster used, the exact signed request envelope (one request,
signed once, addressed to every target: spec §7.1), every city's exact
signed reply envelope (answer or refusal), the status the analyst
claims for cities without a signed reply (timeout, unreachable, protocol
error, bad signature), the quorum, and the combined result as claimed.

:func:`verify_bundle` trusts none of the analyst's claims. It re-checks:

1. **The roster.** Its own threshold of root signatures; if the verifier
   gives a trusted roster, that the bundle's roster *is* it (same body
   digest) or its direct successor signed by both thresholds; if the
   verifier gives a pin, that the body's SHA-256 matches. Expiry is judged
   at the time the requests were issued (the signed ``issued_at``), not
   now: a bundle stays checkable after the roster it used has expired.
2. **The request.** Signed by a key the roster names for the requester in
   the analyst role, allowed the purpose, and carrying the bundle's query,
   policy, targets, quorum and validity window.
3. **Every reply.** Signed by that city's node key from the roster, citing
   that request's message id, the city as responder and the requester; an
   answer must fit the query. The claimed status must agree with what is
   signed: "answered" needs a signed answer, "refused" a signed refusal
   (with the same code); the unsigned statuses carry no reply and are
   reported as the analyst's *unsigned claim*.
4. **Coverage.** Exactly one entry per target city of the signed request:
   a dropped city or a dropped refusal is a failure.
5. **The combination.** ``combine_answers`` is re-run over exactly the
   verified answers and compared with the claimed rows (keys, contributors,
   suppressions exactly; integers exactly; floats within
   :data:`FLOAT_REL_TOLERANCE`).

6. **Receipts** (issue 5, part 4), when the bundle holds them: a city's
   receipt is its signed ``AuditResponse`` (op ``receipt``) with the
   ``request_received`` leaf of the request, that leaf's inclusion proof and
   the signed checkpoint it is proven under. The response must be signed by
   the city's node key; the checkpoint must verify under the city's log key:
   the one the roster names for the city (spec §16.1; a receipt recording
   another key is a failure), or, for a city whose roster entry names none,
   the one recorded from its unsigned ``GET /v1/log/keys`` (so trusted on
   first use, and said so in the verdict); the leaf must decode, name this request's
   message id and signing key id, and be included under the checkpoint's
   root. Receipts are fetched best effort: a missing or failed one is a note,
   a receipt that does not verify is a failure.

What cannot be checked: a city claimed as timed out or unreachable may in
truth have refused or answered, since only signed replies are evidence.
Such lines say "unsigned claim".

Everything here is pure (no I/O, no asyncio): the CLI reads the files.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Final

import msgspec
from msgspec import Meta

from hansa.crypto.envelope import open_envelope
from hansa.crypto.keys import PublicKey
from hansa.crypto.merkle import leaf_hash, verify_inclusion
from hansa.crypto.note import NoteVerifier, open_checkpoint
from hansa.federation.combine import (
    CombinedResult,
    CombinedRow,
    FinalValue,
    HistogramCounts,
    combine_answers,
)
from hansa.federation.roster import (
    Role,
    Roster,
    SignedRoster,
    decode_roster,
    roster_digest,
    signed_by,
    verify_roster,
)
from hansa.protocol.auditleaf import EntryType, unpack_leaf
from hansa.protocol.codec import decode_as, encode
from hansa.protocol.envelope import (
    MAX_ENVELOPE_SIZE,
    PayloadType,
    decode_envelope,
    message_id,
)
from hansa.protocol.errors import ErrorCode, HansaError, ProtocolError
from hansa.protocol.messages import (
    MAX_AGGREGATES,
    MAX_BIN_EDGES,
    MAX_GROUPS,
    MAX_QUANTILES,
    MAX_TARGETS,
    AuditOp,
    AuditResponse,
    CellKey,
    CityId,
    Digest,
    Millis,
    PolicyTags,
    PrincipalId,
    Query,
    QueryAnswer,
    QueryRefusal,
    QueryRequest,
    SuppressionReason,
    typed_key,
)

if TYPE_CHECKING:  # fanout imports aiohttp; this module stays pure (layering)
    from hansa.federation.fanout import FanOutResult

__all__ = [
    "BUNDLE_FORMAT_VERSION",
    "FLOAT_REL_TOLERANCE",
    "MAX_BUNDLE_SIZE",
    "RECEIPT_STATUSES",
    "SIGNED_STATUSES",
    "UNSIGNED_STATUSES",
    "CityCheck",
    "CityEvidence",
    "CityVerdict",
    "ClaimedCombined",
    "ClaimedRow",
    "EvidenceBundle",
    "HistogramValue",
    "QuantilesValue",
    "Receipt",
    "ScalarValue",
    "Verdict",
    "build_bundle",
    "read_bundle",
    "verify_bundle",
]

BUNDLE_FORMAT_VERSION: Final = 2
"""The only bundle format version this code writes and reads (1 held one request per
city, from before requests were addressed to all their targets)."""

MAX_BUNDLE_SIZE: Final = 512 * 1024 * 1024
"""Largest bundle accepted: a reply and a receipt per city would allow more for
:data:`MAX_TARGETS` cities of maximal answers, but a real bundle is orders of
magnitude smaller; this bound only stops a hostile file from exhausting memory."""

MAX_DETAIL: Final = 1024
"""Longest unsigned status detail kept per city."""

FLOAT_REL_TOLERANCE: Final = 1e-9
"""Relative tolerance when comparing recomputed and claimed float values.

``combine_answers`` is deterministic (answers are merged in city order), so
the same code gives the same bits; the tolerance allows another platform's
``math`` library or a future summation order to differ in the last digits."""

FLOAT_ABS_TOLERANCE: Final = 1e-12
"""Absolute tolerance for float values close to zero."""

SIGNED_STATUSES: Final = frozenset({"answered", "refused"})
"""Statuses backed by a signed reply (values of ``fanout.CityStatus``)."""

UNSIGNED_STATUSES: Final = frozenset({"timeout", "unreachable", "bad_signature", "protocol_error"})
"""Statuses that are only the analyst's claim (no verifiable reply)."""

_STATUSES: Final = SIGNED_STATUSES | UNSIGNED_STATUSES

RECEIPT_STATUSES: Final = frozenset({"fetched", "refused", "failed"})
"""Receipt outcomes: a signed receipt, a signed refusal to give one, or nothing."""

# A ``request_received`` leaf (node/auditlog.py, "Leaf layout" hansa-audit/v1): magic,
# type 0x01, u64 log_time_ms, message_id[32], requester_key_id[32], u16 data_len = 0.
# Parsed here because federation/ may not import node/.

Envelope = Annotated[bytes, Meta(min_length=1, max_length=MAX_ENVELOPE_SIZE)]
Detail = Annotated[str, Meta(max_length=MAX_DETAIL)]


class _EvidenceWire(
    msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True, tag_field="kind"
):
    """Base of the bundle structs: immutable, positional, tagged (as wire messages)."""


class ScalarValue(_EvidenceWire, frozen=True, tag="scalar"):
    """A count, sum, mean, variance, stddev, min or max (``None``: no value)."""

    value: int | float | None


class HistogramValue(_EvidenceWire, frozen=True, tag="histogram"):
    """A histogram's final counts (see :class:`hansa.federation.combine.HistogramCounts`)."""

    # Bounded as the query's histogram is (the bundle is hostile input): unbounded, a
    # 512 MiB bundle of one-byte counts decoded to ~4 GiB of tuple slots.
    edges: Annotated[tuple[float, ...], Meta(max_length=MAX_BIN_EDGES)]
    counts: Annotated[tuple[int, ...], Meta(max_length=MAX_BIN_EDGES - 1)]
    below: int
    above: int


class QuantilesValue(_EvidenceWire, frozen=True, tag="quantiles"):
    """One estimate per requested rank (``None``: no values)."""

    values: Annotated[tuple[float | None, ...], Meta(max_length=MAX_QUANTILES)]


ClaimedValue = ScalarValue | HistogramValue | QuantilesValue


class ClaimedRow(_EvidenceWire, frozen=True, tag="claimed-row"):
    """One finalized row of the combined result as the analyst claims it."""

    key: CellKey
    values: Annotated[tuple[ClaimedValue, ...], Meta(max_length=MAX_AGGREGATES)]
    contributors: Annotated[tuple[CityId, ...], Meta(max_length=MAX_TARGETS)]
    suppressed: Annotated[
        tuple[tuple[CityId, SuppressionReason], ...], Meta(max_length=MAX_TARGETS)
    ] = ()


class ClaimedCombined(_EvidenceWire, frozen=True, tag="claimed-combined"):
    """The combined result as claimed: the cities combined and the rows."""

    cities: Annotated[tuple[CityId, ...], Meta(max_length=MAX_TARGETS)]
    rows: Annotated[tuple[ClaimedRow, ...], Meta(max_length=MAX_GROUPS)]


class Receipt(_EvidenceWire, frozen=True, tag="receipt"):
    """A city's receipt for the request it was sent (issue 5, part 4).

    Attributes:
        status: one of :data:`RECEIPT_STATUSES`.
        attempts: how many times the analyst asked.
        response: the exact signed reply of the city's node: an ``AuditResponse``
            (op ``receipt``) when fetched, a ``QueryRefusal`` when refused.
        origin: the city's log origin, from its unsigned ``GET /v1/log/keys``.
        log_vkey: the city's log verifier key as its node served it (``GET /v1/log/keys``;
            checked against the roster's log key when the roster names one).
        detail: the analyst's one-line explanation (unsigned).
    """

    status: Annotated[str, Meta(min_length=1, max_length=32)]
    attempts: Annotated[int, Meta(ge=0, le=100)] = 0
    response: Envelope | None = None
    origin: Annotated[str, Meta(max_length=256)] | None = None
    log_vkey: Annotated[str, Meta(max_length=1024)] | None = None
    detail: Detail = ""


class CityEvidence(_EvidenceWire, frozen=True, tag="city-evidence"):
    """One target city's entry.

    Attributes:
        city: the city id.
        status: the claimed status (a ``fanout.CityStatus`` value).
        code: the claimed error code (the refusal's for ``refused``), or None.
        reply: the exact signed reply envelope (answer or refusal), or None.
        detail: the analyst's one-line explanation (unsigned).
        receipt: the city's receipt for the request, when one was asked for
            (trailing and optional: bundles written before receipts decode).
    """

    city: CityId
    status: Annotated[str, Meta(min_length=1, max_length=32)]
    code: int | None
    reply: Envelope | None
    detail: Detail = ""
    receipt: Receipt | None = None


class EvidenceBundle(_EvidenceWire, frozen=True, tag="evidence-bundle"):
    """The bundle file (spec: evidence bundle).

    Attributes:
        format_version: :data:`BUNDLE_FORMAT_VERSION`.
        requester: the analyst principal the requests were sent for.
        query: the query asked.
        policy: the policy tags sent.
        targets: the target cities, in the signed order.
        quorum: the signed quorum.
        issued_at: the requests' ``issued_at`` (ms since the epoch).
        expires_at: the requests' ``expires_at``.
        request: the exact signed request envelope sent to every target.
        roster: the signed roster the targets and keys were taken from.
        roster_digest: SHA-256 of the roster body (what an operator pins).
        cities: one entry per target, in target order.
        quorum_met: claimed: at least ``quorum`` cities answered.
        combined: the claimed combined result (None when not combined).
        reason: claimed reason when ``combined`` is None.
    """

    format_version: int
    requester: PrincipalId
    query: Query
    policy: PolicyTags
    targets: Annotated[tuple[CityId, ...], Meta(min_length=1, max_length=MAX_TARGETS)]
    quorum: Annotated[int, Meta(ge=1, le=MAX_TARGETS)]
    issued_at: Millis
    expires_at: Millis
    request: Envelope
    roster: SignedRoster
    roster_digest: Digest
    cities: Annotated[tuple[CityEvidence, ...], Meta(max_length=MAX_TARGETS)]
    quorum_met: bool
    combined: ClaimedCombined | None
    reason: Detail | None = None


# --- building ---------------------------------------------------------------------------


def _claimed_value(value: FinalValue) -> ClaimedValue:
    if isinstance(value, HistogramCounts):
        return HistogramValue(
            edges=tuple(value.edges),
            counts=tuple(value.counts),
            below=value.below,
            above=value.above,
        )
    if isinstance(value, tuple):
        return QuantilesValue(values=tuple(value))
    return ScalarValue(value=value)


def claim_of(combined: CombinedResult) -> ClaimedCombined:
    """Return the serialisable form of a combined result (what a bundle claims).

    Args:
        combined: the combined result.

    Returns:
        Its cities and finalized rows (keys, values, contributors, suppressions).
    """
    return ClaimedCombined(
        cities=tuple(combined.cities),
        rows=tuple(
            ClaimedRow(
                key=tuple(row.key),
                values=tuple(_claimed_value(v) for v in row.values),
                contributors=tuple(row.contributors),
                suppressed=tuple(row.suppressed),
            )
            for row in combined.rows
        ),
    )


def _trim(text: str) -> str:
    return " ".join(text.split())[:MAX_DETAIL]


def build_bundle(
    result: FanOutResult,
    signed_roster: SignedRoster,
    receipts: Mapping[str, Receipt] | None = None,
) -> bytes:
    """Encode the evidence of one fan-out as bundle bytes.

    The requester and policy are read from the sealed request itself, so the
    bundle states exactly what was signed.

    Args:
        result: the fan-out's result (every city's request and reply bytes).
        signed_roster: the roster the targets and keys came from.
        receipts: receipts by city id (cities without one get none).

    Returns:
        The bundle file bytes.

    Raises:
        ProtocolError: the result has no cities, its request cannot be
            decoded, or the bundle would exceed :data:`MAX_BUNDLE_SIZE`.
    """
    if not result.cities:
        raise ProtocolError("a fan-out without cities has no evidence", ErrorCode.INVALID_FIELD)
    sealed = result.cities[0].request
    first = decode_as(decode_envelope(sealed).payload, QueryRequest)
    bundle = EvidenceBundle(
        format_version=BUNDLE_FORMAT_VERSION,
        requester=first.requester,
        query=result.query,
        policy=first.policy,
        targets=tuple(result.targets),
        quorum=result.quorum,
        issued_at=result.issued_at,
        expires_at=result.expires_at,
        request=sealed,
        roster=signed_roster,
        roster_digest=roster_digest(signed_roster),
        cities=tuple(
            CityEvidence(
                city=c.city,
                status=str(c.status.value),
                code=None if c.code is None else int(c.code),
                reply=c.reply,
                detail=_trim(c.detail),
                receipt=None if receipts is None else receipts.get(c.city),
            )
            for c in result.cities
        ),
        quorum_met=result.quorum_met,
        combined=None if result.combined is None else claim_of(result.combined),
        reason=None if result.reason is None else _trim(result.reason),
    )
    data = encode(bundle)
    if len(data) > MAX_BUNDLE_SIZE:
        raise ProtocolError(
            f"the bundle of {len(data)} bytes exceeds the limit of {MAX_BUNDLE_SIZE}",
            ErrorCode.TOO_LARGE,
        )
    return data


def read_bundle(data: bytes) -> EvidenceBundle:
    """Strictly decode bundle bytes (nothing is verified here).

    Args:
        data: the bundle file's bytes.

    Returns:
        The bundle.

    Raises:
        TooLargeError: over :data:`MAX_BUNDLE_SIZE`.
        ProtocolError: not exactly one bundle (``MALFORMED``/``INVALID_FIELD``),
            or another format version (``UNSUPPORTED_VERSION``).
    """
    bundle = decode_as(data, EvidenceBundle, max_size=MAX_BUNDLE_SIZE)
    if bundle.format_version != BUNDLE_FORMAT_VERSION:
        raise ProtocolError(
            f"bundle format version {bundle.format_version} is not supported "
            f"(this verifier reads version {BUNDLE_FORMAT_VERSION})",
            ErrorCode.UNSUPPORTED_VERSION,
        )
    return bundle


# --- verdict -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CityCheck:
    """One check on one city's entry: its name, outcome and reason."""

    name: str
    ok: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class CityVerdict:
    """What the verifier found for one city.

    Attributes:
        city: the city id.
        status: the claimed status.
        signed: whether the status is backed by a verified signed reply.
        checks: every check made, in order.
    """

    city: str
    status: str
    signed: bool
    checks: tuple[CityCheck, ...]

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> tuple[str, ...]:
        """The reasons of the failed checks."""
        return tuple(f"{c.name}: {c.detail}" for c in self.checks if not c.ok)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of :func:`verify_bundle`.

    Attributes:
        ok: True only when nothing failed.
        cities: one line per city entry of the bundle, in bundle order.
        failures: every failure, overall and per city (``city: check: reason``).
        notes: what the verdict rests on and what it cannot show.
        alliance: the roster's alliance name, when readable.
        roster_version: the roster's version, when readable.
        answered: how many cities' answers verified and were recombined.
        receipts: how many cities' receipts verified.
        request: every check made on the one signed request, in order.
    """

    ok: bool
    cities: tuple[CityVerdict, ...] = ()
    failures: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    alliance: str | None = None
    roster_version: int | None = None
    answered: int = 0
    receipts: int = 0
    request: tuple[CityCheck, ...] = ()


@dataclass(slots=True)
class _Checks:
    items: list[CityCheck] = field(default_factory=list)

    def add(self, name: str, ok: bool, detail: str = "") -> bool:
        self.items.append(CityCheck(name, ok, detail))
        return ok


# --- verification ------------------------------------------------------------------------


def _iso(ms: int) -> str:
    try:
        moment = dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)
    except (OverflowError, OSError, ValueError):
        return f"{ms} ms"
    return moment.isoformat(timespec="seconds")


def _roster_checks(
    bundle: EvidenceBundle,
    trusted_roster: SignedRoster | None,
    pin: bytes | None,
    failures: list[str],
    notes: list[str],
) -> Roster | None:
    """Verify the bundle's roster; return it, or None when it cannot be used at all."""
    signed = bundle.roster
    digest = roster_digest(signed)
    if digest != bundle.roster_digest:
        failures.append("roster: the recorded digest is not the SHA-256 of the roster body")
    try:
        roster = decode_roster(signed.body)
    except HansaError as exc:
        failures.append(f"roster: unreadable: {exc.message}")
        return None
    # Expiry is judged at the time of the requests (the signed issued_at):
    # evidence must stay checkable after its roster expired.
    at = bundle.issued_at
    try:
        verify_roster(signed, None, at)
    except HansaError as exc:
        when = " (judged at the requests' issued_at)" if exc.code is ErrorCode.EXPIRED else ""
        failures.append(f"roster: {exc.message}{when}")
    notes.append(
        f"roster expiry checked at the requests' signed issued_at ({_iso(at)}), not now "
        f"(it expires {_iso(roster.expires_ms)})"
    )
    if pin is not None and digest != pin:
        failures.append(f"roster: its SHA-256 {digest.hex()} does not match the pin {pin.hex()}")
    if trusted_roster is not None:
        _against_trusted(signed, roster, trusted_roster, at, failures)
    if pin is None and trusted_roster is None:
        notes.append(
            "no trusted roster or pin given: the roster is trusted on its own signatures "
            "only, so a whole substituted roster cannot be detected"
        )
    return roster


def _against_trusted(
    signed: SignedRoster, roster: Roster, trusted_signed: SignedRoster, at: int, failures: list[str]
) -> None:
    try:
        trusted = decode_roster(trusted_signed.body)
    except HansaError as exc:
        failures.append(f"trusted roster: unreadable: {exc.message}")
        return
    if len(signed_by(trusted_signed, trusted.root_key_ids)) < trusted.threshold:
        failures.append("trusted roster: its own threshold of root signatures is not met")
        return
    if roster_digest(trusted_signed) == roster_digest(signed):
        return
    if roster.version == trusted.version + 1:
        try:
            verify_roster(signed, trusted, at)
        except HansaError as exc:
            failures.append(f"roster: not a valid successor of the trusted roster: {exc.message}")
        return
    failures.append(
        f"roster: version {roster.version} of {roster.alliance!r} is neither the trusted "
        f"roster (version {trusted.version} of {trusted.alliance!r}) nor its direct successor"
    )


def _open_request(roster: Roster, bundle: EvidenceBundle, checks: _Checks) -> QueryRequest | None:
    try:
        opened = open_envelope(bundle.request, roster.keys_for_role(Role.ANALYST), QueryRequest)
    except HansaError as exc:
        checks.add("request signature", False, f"{exc.message} [{exc.code.name}]")
        return None
    request = opened.message
    if not checks.add(
        "request signature",
        roster.is_allowed(request.requester, opened.signer.key_id, Role.ANALYST),
        f"the key is not {request.requester!r}'s analyst key in the roster",
    ):
        return None
    checks.add(
        "purpose",
        roster.allows_purpose(request.requester, request.policy.purpose),
        f"the roster does not allow {request.requester!r} the purpose {request.policy.purpose!r}",
    )
    same = (
        request.requester == bundle.requester
        and request.query == bundle.query
        and request.policy == bundle.policy
        and request.targets == bundle.targets
        and request.quorum == bundle.quorum
        and request.issued_at == bundle.issued_at
        and request.expires_at == bundle.expires_at
    )
    checks.add(
        "request body",
        same,
        "the signed request differs from the bundle's query, policy, targets, quorum or "
        "validity window",
    )
    checks.add(
        "roster version",
        request.roster_version in (0, roster.version),
        f"the request names roster version {request.roster_version}, "
        f"the bundle holds {roster.version}",
    )
    checks.add(
        "roster valid at issue",
        request.issued_at < roster.expires_ms,
        f"the roster had expired ({roster.expires_ms} ms) when the request was issued",
    )
    return request


def _open_reply(
    entry: CityEvidence,
    request: QueryRequest,
    request_id: bytes,
    roster: Roster,
    checks: _Checks,
) -> QueryAnswer | QueryRefusal | None:
    assert entry.reply is not None
    member = roster.member(entry.city)
    if not checks.add("member", member is not None, "the roster does not name this city"):
        return None
    assert member is not None
    node_key = PublicKey(member.public_key)  # valid: checked when the roster was decoded
    try:
        kind = decode_envelope(entry.reply).payload_type
        expected: type[QueryAnswer] | type[QueryRefusal]
        expected = QueryRefusal if kind == PayloadType.QUERY_REFUSAL else QueryAnswer
        reply = open_envelope(entry.reply, {node_key.key_id: node_key}, expected).message
    except HansaError as exc:
        checks.add("reply signature", False, f"{exc.message} [{exc.code.name}]")
        return None
    checks.add("reply signature", True, "signed by the city's node key")
    cites = (
        reply.request_id == request_id
        and reply.responder == entry.city
        and reply.requester == request.requester
    )
    if not checks.add(
        "reply cites request",
        cites,
        "the reply cites another request id, responder or requester",
    ):
        return None
    return reply


def _check_entry(
    entry: CityEvidence,
    roster: Roster,
    bundle: EvidenceBundle,
    request: QueryRequest | None,
    request_id: bytes,
) -> tuple[CityVerdict, QueryAnswer | None]:
    checks = _Checks()
    status = entry.status
    checks.add("status", status in _STATUSES, f"unknown status {status[:32]!r}")
    answer: QueryAnswer | None = None
    signed = False
    if request is None:
        checks.add("request", False, "the signed request did not verify (see above)")
    elif entry.reply is not None:
        reply = _open_reply(entry, request, request_id, roster, checks)
        if isinstance(reply, QueryAnswer):
            try:
                combine_answers(request.query, (reply,))
                fits = True
                why = ""
            except HansaError as exc:
                fits, why = False, exc.message
            # An answer carries no error code (the fan-out records None): a claimed
            # code beside a signed answer is a claim the signature contradicts.
            if checks.add("answer fits query", fits, why) and checks.add(
                "status matches",
                status == "answered" and entry.code is None,
                f"claimed {status!r} (code {entry.code}) but the city signed an answer",
            ):
                answer, signed = reply, True
        elif isinstance(reply, QueryRefusal):
            if checks.add(
                "status matches",
                status == "refused",
                f"claimed {status!r} but the city signed a refusal",
            ):
                signed = True
                checks.add(
                    "refusal code",
                    entry.code == int(reply.code),
                    f"claimed code {entry.code}, the refusal says {reply.code.name}",
                )
    elif entry.reply is None:
        checks.add(
            "status matches",
            status not in SIGNED_STATUSES,
            f"claimed {status!r} without the signed reply that status needs",
        )
    if entry.receipt is not None and request is not None:
        _check_receipt(entry, entry.receipt, roster, bundle.request, checks)
    return CityVerdict(entry.city, status, signed, tuple(checks.items)), answer


def _request_leaf(leaf: bytes) -> tuple[int, bytes, bytes] | None:
    """``(log_time_ms, message_id, requester_key_id)`` of a request_received leaf, or None."""
    try:
        fields = unpack_leaf(leaf)
    except HansaError:
        return None
    if fields.kind != EntryType.REQUEST_RECEIVED:
        return None
    return fields.log_time_ms, fields.first, fields.second


def _check_receipt(
    entry: CityEvidence, receipt: Receipt, roster: Roster, sealed: bytes, checks: _Checks
) -> None:
    """Check a city's receipt (module docstring, step 6); failures go to ``checks``."""
    if receipt.status not in RECEIPT_STATUSES:
        checks.add("receipt", False, f"unknown receipt status {receipt.status[:32]!r}")
        return
    try:
        named = roster.log_verifier(entry.city, receipt.origin)
    except HansaError as exc:  # the recorded origin is no valid key name
        checks.add("receipt checkpoint", False, f"{exc.message} [{exc.code.name}]")
        return
    if named is not None and receipt.log_vkey is not None:
        # The roster pins the city's log key: a receipt recording another one (the node
        # served it at GET /v1/log/keys) is a failure, whatever became of the receipt.
        recorded = _vkey_key(receipt.log_vkey)
        if not checks.add(
            "receipt log key",
            recorded == named.public_key.raw,
            f"the node served log key {receipt.log_vkey[:80]!r}, but roster "
            f"v{roster.version} names {named.vkey!r}",
        ):
            return
    if receipt.status == "failed":
        return  # best effort: reported as a note by the caller
    member = roster.member(entry.city)
    if receipt.response is None or member is None:
        checks.add("receipt", False, f"status {receipt.status!r} without the city's signed reply")
        return
    node_key = PublicKey(member.public_key)
    try:
        kind = decode_envelope(receipt.response).payload_type
        expected: type[AuditResponse] | type[QueryRefusal]
        expected = QueryRefusal if kind == PayloadType.QUERY_REFUSAL else AuditResponse
        reply = open_envelope(receipt.response, {node_key.key_id: node_key}, expected).message
    except HansaError as exc:
        checks.add("receipt signature", False, f"{exc.message} [{exc.code.name}]")
        return
    if isinstance(reply, QueryRefusal):
        checks.add(
            "receipt",
            receipt.status == "refused" and reply.responder == entry.city,
            f"claimed {receipt.status!r}, the city signed a refusal",
        )
        return
    if not checks.add(
        "receipt",
        receipt.status == "fetched"
        and reply.op is AuditOp.RECEIPT
        and reply.responder == entry.city,
        f"claimed {receipt.status!r}; the signed reply is op {reply.op.value!r} from "
        f"{reply.responder!r}",
    ):
        return
    try:
        verifier = named or NoteVerifier.from_vkey(receipt.log_vkey or "")
        if reply.checkpoint is None:
            raise ProtocolError("the receipt has no checkpoint")
        checkpoint = open_checkpoint(
            reply.checkpoint, verifier, origin=receipt.origin or verifier.name
        ).checkpoint
    except HansaError as exc:
        checks.add("receipt checkpoint", False, f"{exc.message} [{exc.code.name}]")
        return
    parsed = _request_leaf(reply.entries[0]) if len(reply.entries) == 1 else None
    if not checks.add(
        "receipt leaf",
        parsed is not None,
        "the receipt does not carry exactly one request_received leaf",
    ):
        return
    assert parsed is not None
    _, logged_id, logged_key = parsed
    envelope = decode_envelope(sealed)
    if not checks.add(
        "receipt leaf",
        logged_id == message_id(sealed) and logged_key == envelope.key_id,
        "the logged leaf names another request or signing key",
    ):
        return
    checks.add(
        "receipt inclusion",
        reply.tree_size == checkpoint.size
        and verify_inclusion(
            leaf_hash(reply.entries[0]),
            reply.index,
            reply.tree_size,
            reply.proof,
            checkpoint.root_hash,
        ),
        f"leaf {reply.index} is not proven under the checkpoint of size {checkpoint.size}",
    )


def _vkey_key(vkey: str) -> bytes | None:
    """The raw public key of a note verifier key, or None if it does not parse."""
    try:
        return NoteVerifier.from_vkey(vkey).public_key.raw
    except HansaError:
        return None


def _close(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=FLOAT_REL_TOLERANCE, abs_tol=FLOAT_ABS_TOLERANCE)


def _same_number(mine: int | float | None, theirs: int | float | None) -> bool:
    if mine is None or theirs is None:
        return mine is None and theirs is None
    if isinstance(mine, bool) or isinstance(theirs, bool):
        return False
    if isinstance(mine, int) and isinstance(theirs, int):
        return mine == theirs  # integers exactly
    if isinstance(mine, float) and isinstance(theirs, float):
        return _close(mine, theirs)
    return False  # an int claimed as a float, or the reverse, is a different value


def _same_value(mine: ClaimedValue, theirs: ClaimedValue) -> bool:
    if isinstance(mine, ScalarValue) and isinstance(theirs, ScalarValue):
        return _same_number(mine.value, theirs.value)
    if isinstance(mine, HistogramValue) and isinstance(theirs, HistogramValue):
        return (
            len(mine.edges) == len(theirs.edges)
            and all(_close(a, b) for a, b in zip(mine.edges, theirs.edges, strict=True))
            and (mine.counts, mine.below, mine.above) == (theirs.counts, theirs.below, theirs.above)
        )
    if isinstance(mine, QuantilesValue) and isinstance(theirs, QuantilesValue):
        return len(mine.values) == len(theirs.values) and all(
            _same_number(a, b) for a, b in zip(mine.values, theirs.values, strict=True)
        )
    return False


def _row_label(row: ClaimedRow | CombinedRow) -> str:
    return repr(tuple(row.key))[:80]


def _compare_combined(
    recomputed: ClaimedCombined, claimed: ClaimedCombined, failures: list[str]
) -> None:
    if tuple(recomputed.cities) != tuple(claimed.cities):
        failures.append(
            f"combined: claims cities {list(claimed.cities)}, the verified answers are from "
            f"{list(recomputed.cities)}"
        )
    mine = {typed_key(tuple(r.key)): r for r in recomputed.rows}
    theirs = {typed_key(tuple(r.key)): r for r in claimed.rows}
    if len(theirs) != len(claimed.rows):
        failures.append("combined: a row key is claimed twice")
    for key in mine.keys() - theirs.keys():
        failures.append(f"combined: row {_row_label(mine[key])} is missing from the claim")
    for key in theirs.keys() - mine.keys():
        failures.append(f"combined: row {_row_label(theirs[key])} is not in the recomputation")
    for key in mine.keys() & theirs.keys():
        a, b = mine[key], theirs[key]
        label = _row_label(a)
        if tuple(a.contributors) != tuple(b.contributors):
            failures.append(f"combined: row {label}: contributors differ")
        if tuple(a.suppressed) != tuple(b.suppressed):
            failures.append(f"combined: row {label}: suppressed-by differs")
        if len(a.values) != len(b.values):
            failures.append(f"combined: row {label}: {len(b.values)} values claimed")
            continue
        for position, (va, vb) in enumerate(zip(a.values, b.values, strict=True)):
            if not _same_value(va, vb):
                failures.append(
                    f"combined: row {label}: aggregate #{position}: claimed {_show(vb)}, "
                    f"recomputed {_show(va)}"
                )


def _show(value: ClaimedValue) -> str:
    if isinstance(value, ScalarValue):
        return repr(value.value)
    if isinstance(value, QuantilesValue):
        return repr(value.values)
    return f"histogram{value.counts!r}"


def verify_bundle(
    bundle_bytes: bytes,
    *,
    trusted_roster: SignedRoster | None = None,
    pin: bytes | None = None,
    now_ms: int | None = None,
) -> Verdict:
    """Check an evidence bundle offline (pure; never raises on bad input).

    Args:
        bundle_bytes: the bundle file's bytes.
        trusted_roster: a roster the verifier trusts; the bundle's roster
            must be it or its direct successor (both thresholds).
        pin: SHA-256 of the roster body the verifier expects.
        now_ms: the current time in ms, only to note whether the roster has
            expired since (never a failure: expiry is judged at issue time).

    Returns:
        The :class:`Verdict`; ``ok`` is True only if every check passed.
    """
    try:
        bundle = read_bundle(bundle_bytes)
    except HansaError as exc:
        return Verdict(ok=False, failures=(f"bundle: unreadable: {exc.message} [{exc.code.name}]",))
    failures: list[str] = []
    notes: list[str] = []
    roster = _roster_checks(bundle, trusted_roster, pin, failures, notes)
    if roster is None:
        return Verdict(ok=False, failures=tuple(failures), notes=tuple(notes))
    if now_ms is not None and now_ms >= roster.expires_ms:
        notes.append("the roster has expired since the requests were issued (not a failure)")

    request_checks = _Checks()
    request = _open_request(roster, bundle, request_checks)
    failures.extend(f"request: {c.name}: {c.detail}" for c in request_checks.items if not c.ok)
    request_id = message_id(bundle.request)

    # Coverage: exactly one entry per target city of the signed request.
    entry_cities = [e.city for e in bundle.cities]
    if len(set(entry_cities)) != len(entry_cities):
        failures.append("coverage: a city has more than one entry")
    for city in bundle.targets:
        if city not in entry_cities:
            failures.append(f"coverage: target city {city!r} has no entry (dropped)")
    for city in entry_cities:
        if city not in bundle.targets:
            failures.append(f"coverage: {city!r} is not a target of the signed request")
    if not 1 <= bundle.quorum <= len(bundle.targets):
        failures.append("quorum: outside 1..number of targets")

    lines: list[CityVerdict] = []
    answers: list[QueryAnswer] = []
    for entry in bundle.cities:
        line, answer = _check_entry(entry, roster, bundle, request, request_id)
        lines.append(line)
        failures.extend(f"{entry.city}: {reason}" for reason in line.failures)
        if answer is not None:
            answers.append(answer)

    _check_combination(bundle, answers, failures)
    receipts = _receipt_notes(bundle, roster, lines, notes)
    if any(not line.signed for line in lines):
        notes.append(
            "statuses without a signed reply (timeout, unreachable, protocol error, bad "
            "signature) are the analyst's unsigned claims"
        )
    return Verdict(
        ok=not failures,
        cities=tuple(lines),
        failures=tuple(failures),
        notes=tuple(notes),
        alliance=roster.alliance,
        roster_version=roster.version,
        answered=len(answers),
        receipts=receipts,
        request=tuple(request_checks.items),
    )


def _receipt_notes(
    bundle: EvidenceBundle, roster: Roster, lines: Sequence[CityVerdict], notes: list[str]
) -> int:
    """Note what the receipts rest on and which are missing; return how many verified."""
    verified = 0
    tofu: list[str] = []
    missing: list[str] = []
    for entry, line in zip(bundle.cities, lines, strict=True):
        receipt = entry.receipt
        if receipt is None:
            if entry.status in SIGNED_STATUSES:
                missing.append(entry.city)
            continue
        receipt_checks = [c for c in line.checks if c.name.startswith("receipt")]
        if any(c.name == "receipt inclusion" for c in receipt_checks) and all(
            c.ok for c in receipt_checks
        ):
            verified += 1
            member = roster.member(entry.city)
            if member is None or member.log_key is None:
                tofu.append(entry.city)
        elif receipt.status != "fetched":
            missing.append(f"{entry.city} ({receipt.status}: {receipt.detail or 'no detail'})")
    if verified:
        pinned = verified - len(tofu)
        notes.append(
            f"{verified} receipt(s) verified"
            + (f"; {pinned} under the log key the roster names" if pinned else "")
        )
    if tofu:
        notes.append(
            "the roster names no log key for "
            + ", ".join(tofu)
            + ": the key was fetched unsigned from GET /v1/log/keys and is trusted on first "
            "use (TOFU); name it in the roster (hansa alliance set-key --log-key) to rule "
            "out a substituted key"
        )
    if missing and any(e.receipt is not None for e in bundle.cities):
        notes.append("no verified receipt from: " + ", ".join(missing))
    return verified


def _check_combination(
    bundle: EvidenceBundle, answers: Sequence[QueryAnswer], failures: list[str]
) -> None:
    quorum_met = len(answers) >= bundle.quorum
    if bundle.quorum_met != quorum_met:
        failures.append(
            f"quorum: claimed {'met' if bundle.quorum_met else 'not met'}, but "
            f"{len(answers)} verified answer(s) against a quorum of {bundle.quorum}"
        )
    recomputed: ClaimedCombined | None = None
    if quorum_met:
        try:
            recomputed = claim_of(combine_answers(bundle.query, answers))
        except HansaError as exc:
            if bundle.combined is not None:
                failures.append(f"combined: the verified answers do not combine: {exc.message}")
            return
    if recomputed is None:
        if bundle.combined is not None:
            failures.append("combined: a result is claimed although the quorum was not met")
        return
    if bundle.combined is None:
        failures.append("combined: the quorum was met but no combined result is given")
        return
    _compare_combined(recomputed, bundle.combined, failures)
