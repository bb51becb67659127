"""The alliance roster: codec, thresholds, TUF-style rotation, expiry and lookups."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nodeutil import Analyst as NodeAnalyst
from nodeutil import count_by_room_type

from hansa.crypto.envelope import open_envelope
from hansa.crypto.keys import SigningKey
from hansa.crypto.note import SignatureType
from hansa.federation.roster import (
    ROSTER_PAYLOAD_TYPE,
    Analyst,
    Member,
    Role,
    RootKey,
    Roster,
    RosterSignature,
    SignedRoster,
    decode_roster,
    decode_signed_roster,
    default_log_origin,
    encode_signed_roster,
    roster_digest,
    sign_roster,
    signed_by,
    unsigned,
    update_chain,
    verify_roster,
)
from hansa.protocol.codec import encode
from hansa.protocol.envelope import pae
from hansa.protocol.errors import (
    ErrorCode,
    FreshnessError,
    HansaError,
    ProtocolError,
    SignatureError,
)
from hansa.protocol.messages import QueryRequest

NOW = 1_800_000_000_000
LATER = NOW + 86_400_000

# Fixed seeds: reproducible keys, and no key generation inside hypothesis loops.
KEYS = [SigningKey(bytes([i + 1]) * 32) for i in range(8)]
LOG_KEYS = [SigningKey(bytes([0x40 + i]) * 32) for i in range(8)]
WITNESS_KEYS = [SigningKey(bytes([0x60 + i]) * 32) for i in range(8)]
CITIES = ["amsterdam", "berlin", "cape-town", "dakar", "essen", "fes", "graz", "hull"]


def _member(i: int, roles: Sequence[Role] = (Role.MEMBER,)) -> Member:
    return Member(
        city=CITIES[i],
        name=CITIES[i].title(),
        public_key=KEYS[i].public_key.raw,
        endpoint=f"https://{CITIES[i]}.example:8443/hansa",
        roles=tuple(roles),
    )


def make_roster(
    version: int = 1,
    members: Sequence[int] = (0, 1, 2),
    roots: Sequence[int] | None = None,
    root_keys: Sequence[SigningKey] | None = None,
    threshold: int = 2,
    expires_ms: int = LATER,
    analysts: Sequence[Analyst] = (),
    alliance: str = "hanse",
) -> Roster:
    """A roster whose root key of city i is KEYS[i] unless ``root_keys`` overrides."""
    root_idx = list(members if roots is None else roots)
    keys = list(root_keys) if root_keys is not None else [KEYS[i] for i in root_idx]
    return Roster(
        alliance=alliance,
        version=version,
        expires_ms=expires_ms,
        threshold=threshold,
        root_keys=tuple(
            RootKey(CITIES[i], k.public_key.raw) for i, k in zip(root_idx, keys, strict=True)
        ),
        members=tuple(_member(i) for i in members),
        analysts=tuple(analysts),
        purposes=("research", "planning"),
    )


def signed(roster: Roster, *keys: SigningKey) -> SignedRoster:
    result = unsigned(roster)
    for key in keys:
        result = sign_roster(result, key)
    return result


def _code(exc: pytest.ExceptionInfo[HansaError]) -> ErrorCode:
    return exc.value.code


# --- codec -------------------------------------------------------------------------

ROLE_SETS = st.lists(st.sampled_from(list(Role)), min_size=1, max_size=4, unique=True)


ALLIANCE_NAMES = st.text(
    st.characters(max_codepoint=0x2FF, categories=["L", "N", "P", "S", "Zs"]),
    min_size=1,
    max_size=40,
).filter(str.strip)


@st.composite
def rosters(draw: st.DrawFn) -> Roster:
    n = draw(st.integers(1, len(CITIES) - 1))  # KEYS[-1] is the analyst key
    roles = [draw(ROLE_SETS) for _ in range(n)]
    members = tuple(
        msgspec.structs.replace(
            _member(i, roles[i]),
            log_key=LOG_KEYS[i].public_key.raw if draw(st.booleans()) else None,
            witness_key=(
                WITNESS_KEYS[i].public_key.raw
                if Role.WITNESS in roles[i] and draw(st.booleans())
                else None
            ),
        )
        for i in range(n)
    )
    root_idx = draw(st.lists(st.integers(0, n - 1), min_size=1, unique=True))
    witnesses = sum(Role.WITNESS in r for r in roles)
    # A witness city's own log counts only the other witnesses (spec §15.1).
    quorum = draw(st.none() | st.integers(1, witnesses - 1)) if witnesses > 1 else None
    purposes = tuple(
        draw(st.lists(st.sampled_from(["research", "planning", "audit"]), unique=True))
    )
    analysts: tuple[Analyst, ...] = ()
    with_analyst = draw(st.booleans())
    if purposes and with_analyst:
        analysts = (Analyst("ana@" + CITIES[0], KEYS[7].public_key.raw, CITIES[0], purposes[:1]),)
    return Roster(
        alliance=draw(ALLIANCE_NAMES),
        version=draw(st.integers(1, 2**53)),
        expires_ms=draw(st.integers(0, 2**53)),
        threshold=draw(st.integers(1, len(root_idx))),
        root_keys=tuple(RootKey(CITIES[i], KEYS[i].public_key.raw) for i in root_idx),
        members=members,
        analysts=analysts,
        purposes=purposes,
        witness_quorum=quorum,
    )  # fmt: skip


@given(rosters())
def test_codec_round_trip(roster: Roster) -> None:
    body = encode(roster)
    assert decode_roster(body) == roster
    wrapped = SignedRoster(body, (RosterSignature(b"k" * 32, b"s" * 64),))
    data = encode_signed_roster(wrapped)
    assert decode_signed_roster(data) == wrapped
    # A tagged MessagePack array, like every wire message.
    assert msgspec.msgpack.decode(body)[0] == "roster"


def test_roster_signature_is_over_pae_of_the_body() -> None:
    s = signed(make_roster(), KEYS[0])
    (sig,) = s.signatures
    assert sig.key_id == KEYS[0].key_id
    assert KEYS[0].public_key.verify(pae(ROSTER_PAYLOAD_TYPE, s.body), sig.signature)
    # Not an envelope signature: another payload type does not verify.
    other = pae("application/vnd.hansa.query-request.v1+msgpack", s.body)
    assert not KEYS[0].public_key.verify(other, sig.signature)


@given(st.binary(max_size=200))
def test_garbage_bytes_are_a_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_signed_roster(data)


@pytest.mark.parametrize(
    "endpoint",
    [
        "ftp://amsterdam.example/",
        "https://",
        "http://user:pw@amsterdam.example/",
        "amsterdam.example:8080",
        "https://amsterdam.example/#frag",
        "https://amsterdam.example:99999/",
        "https://amsterdam.example/\n",
    ],
)
def test_bad_endpoints_are_refused(endpoint: str) -> None:
    with pytest.raises(ValueError, match="endpoint"):
        Member("amsterdam", "A", KEYS[0].public_key.raw, endpoint, (Role.MEMBER,))


def test_good_endpoints_are_accepted() -> None:
    for url in ("http://127.0.0.1:8080", "https://[::1]:443/x", "https://city.example/api/"):
        assert Member("amsterdam", "A", KEYS[0].public_key.raw, url, (Role.MEMBER,)).endpoint


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"threshold": 4}, "threshold"),
        ({"members": (_member(0), _member(0))}, "listed twice"),
        ({"root_keys": (RootKey("hull", KEYS[7].public_key.raw),), "threshold": 1}, "not a member"),
        ({"purposes": ("research", "research")}, "purpose"),
        ({"purposes": ("Bad Token",)}, "purpose"),
        ({"witness_quorum": 1}, "witness"),
        ({"alliance": "\x00"}, "alliance"),
        (
            {"analysts": (Analyst("ana@x", KEYS[7].public_key.raw, "hull", ()),)},
            "not a member",
        ),
        (
            {"analysts": (Analyst("ana@x", KEYS[7].public_key.raw, "berlin", ("spying",)),)},
            "vocabulary",
        ),
        (
            {"analysts": (Analyst("ana@x", KEYS[0].public_key.raw, "berlin", ()),)},
            "key is listed twice",
        ),
        ({"analysts": (Analyst("berlin", KEYS[7].public_key.raw, "berlin", ()),)}, "member city"),
    ],
)
def test_inconsistent_rosters_are_refused(change: dict[str, object], match: str) -> None:
    base = make_roster()
    fields = {f: getattr(base, f) for f in base.__struct_fields__}
    fields.update(change)
    with pytest.raises(ValueError, match=match):
        Roster(**fields)


def test_invalid_public_key_is_refused_when_decoding() -> None:
    body = bytearray(encode(make_roster()))
    raw = KEYS[0].public_key.raw
    at = body.index(raw)
    body[at : at + 32] = b"\x00" * 32  # the identity point: small order
    with pytest.raises(ProtocolError) as exc:
        decode_roster(bytes(body))
    assert exc.value.code is ErrorCode.INVALID_FIELD


# --- thresholds ----------------------------------------------------------------------


def test_threshold_met_and_not_met() -> None:
    roster = make_roster(threshold=2)
    assert verify_roster(signed(roster, KEYS[0], KEYS[2]), None, NOW) == roster
    with pytest.raises(SignatureError) as exc:
        verify_roster(signed(roster, KEYS[1]), None, NOW)
    assert exc.value.code is ErrorCode.BAD_SIGNATURE
    with pytest.raises(SignatureError):
        verify_roster(unsigned(roster), None, NOW)


def test_duplicate_signatures_by_one_key_count_once() -> None:
    roster = make_roster(threshold=2)
    one = signed(roster, KEYS[0])
    doubled = SignedRoster(one.body, one.signatures * 3)
    assert signed_by(doubled, roster.root_key_ids) == {KEYS[0].key_id}
    with pytest.raises(SignatureError):
        verify_roster(doubled, None, NOW)
    # Signing again with the same key replaces its signature, it does not add one.
    assert len(sign_roster(one, KEYS[0]).signatures) == 1


def test_signatures_by_unknown_keys_and_invalid_signatures_do_not_count() -> None:
    roster = make_roster(threshold=2)
    s = signed(roster, KEYS[0], KEYS[6])  # KEYS[6] is no root key
    assert signed_by(s, roster.root_key_ids) == {KEYS[0].key_id}
    bad = RosterSignature(KEYS[1].key_id, bytes(64))
    forged = SignedRoster(s.body, (*s.signatures, bad))
    with pytest.raises(SignatureError):
        verify_roster(forged, None, NOW)


def test_tampered_body_fails() -> None:
    good = signed(make_roster(), KEYS[0], KEYS[1])
    other = encode(make_roster(members=(0, 1, 2), threshold=1))
    with pytest.raises(SignatureError):
        verify_roster(SignedRoster(other, good.signatures), None, NOW)


@settings(max_examples=50)
@given(st.data())
def test_any_flipped_body_byte_is_refused(data: st.DataObject) -> None:
    good = signed(make_roster(), KEYS[0], KEYS[1])
    i = data.draw(st.integers(0, len(good.body) - 1))
    bit = data.draw(st.integers(0, 7))
    body = bytearray(good.body)
    body[i] ^= 1 << bit
    with pytest.raises(HansaError):
        verify_roster(SignedRoster(bytes(body), good.signatures), None, NOW)


def test_pin() -> None:
    s = signed(make_roster(), KEYS[0], KEYS[1])
    assert verify_roster(s, None, NOW, pin=roster_digest(s)).version == 1
    with pytest.raises(SignatureError) as exc:
        verify_roster(s, None, NOW, pin=bytes(32))
    assert exc.value.code is ErrorCode.ROSTER_MISMATCH


# --- rotation, rollback, expiry --------------------------------------------------------

NEW_ROOTS = [KEYS[3], KEYS[4], KEYS[5]]


def test_rotation_to_new_root_keys_needs_both_thresholds() -> None:
    v1 = make_roster()
    # Version 2 keeps the cities but rotates every root key.
    v2 = make_roster(version=2, root_keys=NEW_ROOTS)
    assert v2.root_key_ids.keys().isdisjoint(v1.root_key_ids.keys())

    only_old = signed(v2, KEYS[0], KEYS[1])
    with pytest.raises(SignatureError, match="its own"):
        verify_roster(only_old, v1, NOW)
    only_new = signed(v2, NEW_ROOTS[0], NEW_ROOTS[1])
    with pytest.raises(SignatureError, match="version 1's"):
        verify_roster(only_new, v1, NOW)
    half = signed(v2, KEYS[0], NEW_ROOTS[0], NEW_ROOTS[1])
    with pytest.raises(SignatureError):
        verify_roster(half, v1, NOW)
    both = signed(v2, KEYS[0], KEYS[2], NEW_ROOTS[1], NEW_ROOTS[2])
    assert verify_roster(both, v1, NOW) == v2
    # The rotated-out keys no longer sign version 3.
    v3 = make_roster(version=3, root_keys=NEW_ROOTS)
    with pytest.raises(SignatureError):
        verify_roster(signed(v3, KEYS[0], KEYS[1], KEYS[2]), v2, NOW)
    assert verify_roster(signed(v3, *NEW_ROOTS[:2]), v2, NOW) == v3


def test_rollback_and_same_version_are_refused() -> None:
    v1 = make_roster()
    v2 = make_roster(version=2)
    for candidate in (v1, v2):
        with pytest.raises(FreshnessError, match="rollback") as exc:
            verify_roster(signed(candidate, *KEYS[:3]), v2, NOW)
        assert exc.value.code is ErrorCode.ROSTER_MISMATCH


def test_skipping_a_version_is_refused_but_a_chain_is_walked() -> None:
    v1 = make_roster()
    s2 = signed(make_roster(version=2), *KEYS[:2])
    s3 = signed(make_roster(version=3), *KEYS[:2])
    with pytest.raises(FreshnessError, match="skips") as exc:
        verify_roster(s3, v1, NOW)
    assert exc.value.code is ErrorCode.ROSTER_MISMATCH
    assert update_chain(v1, [s2, s3], NOW).version == 3
    with pytest.raises(FreshnessError):
        update_chain(v1, [s3, s2], NOW)
    first = signed(v1, *KEYS[:2])
    assert update_chain(None, [first, s2, s3], NOW, pin=roster_digest(first)).version == 3
    with pytest.raises(ProtocolError):
        update_chain(v1, [], NOW)


def test_other_alliance_is_refused() -> None:
    v1 = make_roster()
    other = signed(make_roster(version=2, alliance="other"), *KEYS[:3])
    with pytest.raises(SignatureError) as exc:
        verify_roster(other, v1, NOW)
    assert exc.value.code is ErrorCode.ROSTER_MISMATCH


def test_expired_is_refused() -> None:
    s = signed(make_roster(expires_ms=NOW), *KEYS[:2])
    with pytest.raises(FreshnessError) as exc:
        verify_roster(s, None, NOW)
    assert exc.value.code is ErrorCode.EXPIRED
    assert verify_roster(s, None, NOW - 1).version == 1
    # In a chain only the final version must be unexpired (TUF root update).
    s2 = signed(make_roster(version=2), *KEYS[:2])
    assert update_chain(None, [s, s2], NOW).version == 2
    s2_expired = signed(make_roster(version=2, expires_ms=NOW - 5), *KEYS[:2])
    with pytest.raises(FreshnessError):
        update_chain(None, [s, s2_expired], NOW)


# --- lookups ----------------------------------------------------------------------------


def _with_analyst() -> Roster:
    ana = Analyst("ana@amsterdam", KEYS[7].public_key.raw, "amsterdam", ("research",))
    return make_roster(analysts=(ana,))


def test_lookups() -> None:
    roster = _with_analyst()
    assert roster.member("berlin") == _member(1)
    assert roster.member("hull") is None
    analyst = roster.analyst("ana@amsterdam")
    assert analyst is not None and analyst.home_city == "amsterdam"
    members = roster.keys_for_role(Role.MEMBER)
    assert set(members) == {KEYS[i].key_id for i in range(3)}
    assert set(roster.keys_for_role(Role.ANALYST)) == {KEYS[7].key_id}
    assert roster.keys_for_role(Role.WITNESS) == {}
    assert roster.is_allowed("ana@amsterdam", KEYS[7].key_id, Role.ANALYST)
    assert not roster.is_allowed("ana@amsterdam", KEYS[7].key_id, Role.MEMBER)
    assert not roster.is_allowed("ana@amsterdam", KEYS[0].key_id, Role.ANALYST)  # wrong key
    assert not roster.is_allowed("berlin", KEYS[0].key_id, Role.MEMBER)  # amsterdam's key
    assert roster.is_allowed("berlin", KEYS[1].key_id, Role.MEMBER)
    holder = roster.holder(KEYS[1].key_id)
    assert holder is not None and holder.principal == "berlin"
    assert holder.roles == {Role.MEMBER}
    assert roster.lookup(KEYS[6].key_id) is None
    assert roster.allows_purpose("ana@amsterdam", "research")
    assert not roster.allows_purpose("ana@amsterdam", "planning")
    # Root keys are for signing rosters, not messages.
    assert roster.root_key_ids.keys() == {KEYS[i].key_id for i in range(3)}


def test_lookup_works_with_open_envelope() -> None:
    roster = _with_analyst()
    ana = NodeAnalyst("ana@amsterdam", KEYS[7])
    envelope = ana.seal(ana.request("berlin", count_by_room_type()))
    opened = open_envelope(envelope, roster.keys_for_role(Role.ANALYST), QueryRequest)
    assert roster.is_allowed(opened.message.requester, opened.signer.key_id, Role.ANALYST)
    assert open_envelope(envelope, roster.lookup, QueryRequest).signer == KEYS[7].public_key
    # A key the roster does not name for the role is refused.
    with pytest.raises(SignatureError) as exc:
        open_envelope(envelope, roster.keys_for_role(Role.MEMBER), QueryRequest)
    assert exc.value.code is ErrorCode.UNKNOWN_KEY


def test_revoked_member_leaves_every_lookup() -> None:
    v1 = _with_analyst()
    fields = {f: getattr(v1, f) for f in v1.__struct_fields__}
    # Version 2 removes amsterdam: its node key, its root key and its analyst.
    fields.update(
        version=2,
        members=v1.members[1:],
        root_keys=v1.root_keys[1:],
        analysts=(),
    )
    v2 = verify_roster(signed(Roster(**fields), *KEYS[:3]), v1, NOW)
    assert v1.member("amsterdam") is not None
    assert v2.member("amsterdam") is None
    assert v2.analyst("ana@amsterdam") is None
    assert KEYS[0].key_id not in v2.keys_for_role(Role.MEMBER)
    assert v2.lookup(KEYS[0].key_id) is None
    assert v2.lookup(KEYS[7].key_id) is None
    assert not v2.is_allowed("amsterdam", KEYS[0].key_id, Role.MEMBER)
    # Its root key no longer counts toward version 3.
    v3 = Roster(**{**fields, "version": 3})
    with pytest.raises(SignatureError):
        verify_roster(signed(v3, KEYS[0], KEYS[1]), v2, NOW)


# --- log and witness keys (spec §15.1, §16.1) -------------------------------------------


def _keyed(i: int, *, witness: bool = False, log: bool = True) -> Member:
    """Member i with its log key, and its witness key and role when ``witness``."""
    roles = (Role.MEMBER, Role.WITNESS) if witness else (Role.MEMBER,)
    return msgspec.structs.replace(
        _member(i, roles),
        log_key=LOG_KEYS[i].public_key.raw if log else None,
        witness_key=WITNESS_KEYS[i].public_key.raw if witness else None,
    )


def _old_body(roster: Roster) -> bytes:
    """The body as written before members carried log and witness keys: 6-element members."""
    wire = msgspec.msgpack.decode(encode(roster))
    wire[6] = [member[:6] for member in wire[6]]
    return msgspec.msgpack.encode(wire)


def test_an_old_roster_without_log_or_witness_keys_decodes_and_verifies() -> None:
    roster = make_roster()
    old = _old_body(roster)
    assert old != encode(roster)  # the new encoding carries two trailing nils per member
    assert all(len(m) == 6 for m in msgspec.msgpack.decode(old)[6])
    decoded = decode_roster(old)
    assert decoded == roster
    assert all(m.log_key is None and m.witness_key is None for m in decoded.members)
    assert decoded.log_verifier("berlin") is None and decoded.witness_verifier("berlin") is None
    # Signed as the old bytes, it verifies as a first, pinned roster and as a step.
    s = sign_roster(sign_roster(SignedRoster(old, ()), KEYS[0]), KEYS[1])
    assert verify_roster(s, None, NOW, pin=roster_digest(s)) == roster
    v2 = make_roster(version=2)
    fields = {f: getattr(v2, f) for f in v2.__struct_fields__}
    fields["members"] = (_keyed(0), _keyed(1), _member(2))
    assert verify_roster(signed(Roster(**fields), *KEYS[:2]), roster, NOW).version == 2


def test_log_and_witness_keys_round_trip_and_give_note_verifiers() -> None:
    base = make_roster(alliance="Hanse League+1")
    fields = {f: getattr(base, f) for f in base.__struct_fields__}
    fields["members"] = (_keyed(0, witness=True), _keyed(1, witness=True), _member(2))
    fields["witness_quorum"] = 1
    roster = decode_roster(encode(Roster(**fields)))
    log = roster.log_verifier("amsterdam")
    assert log is not None
    assert log.name == "hansa/Hanse-League-1/amsterdam"  # the default origin (spec §16.1)
    assert log.public_key == LOG_KEYS[0].public_key
    assert log.sig_type is SignatureType.ED25519
    assert roster.log_verifier("amsterdam", "custom/origin") is not None
    witness = roster.witness_verifier("berlin")
    assert witness is not None and witness.name == "witness/berlin"
    assert witness.public_key == WITNESS_KEYS[1].public_key
    assert witness.sig_type is SignatureType.COSIGNATURE_V1
    assert roster.log_verifier("cape-town") is None  # named no log key: TOFU
    assert roster.witness_verifier("cape-town") is None
    assert roster.log_verifier("hull") is None  # no member
    assert default_log_origin(None, "graz") == "hansa/local/graz"


def test_a_witness_key_needs_the_witness_role() -> None:
    with pytest.raises(ValueError, match="witness role"):
        msgspec.structs.replace(_member(0), witness_key=WITNESS_KEYS[0].public_key.raw)
    # The same rule holds when decoding: a forged member with a witness key is refused.
    wire = msgspec.msgpack.decode(encode(make_roster()))
    wire[6][0][7] = WITNESS_KEYS[0].public_key.raw
    with pytest.raises(ProtocolError) as exc:
        decode_roster(msgspec.msgpack.encode(wire))
    assert exc.value.code is ErrorCode.INVALID_FIELD
    assert "witness role" in exc.value.message


@pytest.mark.parametrize("field", ["log_key", "witness_key"])
def test_invalid_log_and_witness_keys_are_refused(field: str) -> None:
    member = _member(0, (Role.MEMBER, Role.WITNESS))
    with pytest.raises(ValueError, match=field.replace("_", " ")):
        msgspec.structs.replace(member, **{field: b"\x00" * 32})  # small order
    wire = msgspec.msgpack.decode(encode(make_roster(members=(0,), threshold=1)))
    wire[6][0][5] = ["member", "witness"]
    wire[6][0][6 if field == "log_key" else 7] = b"\x00" * 32
    with pytest.raises(ProtocolError) as exc:
        decode_roster(msgspec.msgpack.encode(wire))
    assert exc.value.code is ErrorCode.INVALID_FIELD


@pytest.mark.parametrize(
    "members",
    [
        # A log key that is also the city's node key.
        lambda: (msgspec.structs.replace(_member(0), log_key=KEYS[0].public_key.raw),),
        # One city's log key is another city's node key.
        lambda: (_member(0), msgspec.structs.replace(_member(1), log_key=KEYS[0].public_key.raw)),
        # A witness key that is another city's log key.
        lambda: (
            _keyed(0),
            msgspec.structs.replace(
                _member(1, (Role.WITNESS,)), witness_key=LOG_KEYS[0].public_key.raw
            ),
        ),
    ],
)
def test_a_key_serves_one_role(members: object) -> None:
    base = make_roster(members=(0,), threshold=1)
    fields = {f: getattr(base, f) for f in base.__struct_fields__}
    fields["members"] = members()  # type: ignore[operator]
    with pytest.raises(ValueError, match="listed twice"):
        Roster(**fields)


@pytest.mark.parametrize(
    ("witnesses", "others", "quorum", "ok"),
    [
        (2, 1, 1, True),
        (2, 1, 2, False),  # a witness city's own log has only one other witness
        (2, 0, 2, False),
        (3, 0, 2, True),
        (3, 2, 3, False),
        (1, 2, 1, False),  # the lone witness's own log could never be cosigned
        (0, 3, 1, False),
    ],
)
def test_witness_quorum_never_needs_a_city_to_witness_its_own_log(
    witnesses: int, others: int, quorum: int, ok: bool
) -> None:
    members = [_member(i, (Role.MEMBER, Role.WITNESS)) for i in range(witnesses)]
    members += [_member(witnesses + i) for i in range(others)]
    base = make_roster(members=(0,), threshold=1)
    fields = {f: getattr(base, f) for f in base.__struct_fields__}
    fields.update(members=tuple(members), witness_quorum=quorum)
    if ok:
        assert Roster(**fields).witness_quorum == quorum
    else:
        with pytest.raises(ValueError, match="witness quorum"):
            Roster(**fields)
