"""The auditor (issue 5, part 6): every kind of tampering the issue lists is detected.

Logs are built with the node's own :class:`~hansa.node.auditlog.AuditLog` from real
sealed requests, answers and refusals, imported into an auditor store the way
``hansa audit import`` does (read-only, nothing trusted), then edited with plain SQLite
to play the dishonest node.
"""

from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hansa.crypto.envelope import seal
from hansa.crypto.keyfile import read_key_file
from hansa.crypto.keys import SigningKey
from hansa.crypto.note import CosignatureSigner, NoteSigner, cosign_checkpoint
from hansa.federation import audit
from hansa.federation.audit import (
    AuditorStore,
    AuditReport,
    AuditStoreError,
    compare_stores,
    parse_leaf,
    reconcile,
    verify_log,
)
from hansa.federation.evidence import CityEvidence, EvidenceBundle
from hansa.federation.roster import (
    Analyst,
    Member,
    Role,
    RootKey,
    Roster,
    SignedRoster,
    roster_digest,
    sign_roster,
    unsigned,
)
from hansa.node._cli_audit import import_data_dir
from hansa.node._cli_node import init_node
from hansa.node.auditlog import (
    AnswerSent,
    AuditLog,
    Decision,
    Outcome,
    RequestReceived,
    SettingsChanged,
    SettingsScope,
    decode_entry,
    encode_entry,
)
from hansa.node.cli import EXIT_ERROR, EXIT_VERIFY_FAILED, main
from hansa.node.config import AUDIT_FILE
from hansa.protocol.envelope import Envelope, decode_envelope, encode_envelope, message_id
from hansa.protocol.errors import ErrorCode, SignatureError
from hansa.protocol.messages import (
    Count,
    PolicyTags,
    Query,
    QueryAnswer,
    QueryRefusal,
    QueryRequest,
    ResultScope,
)
from hansa.protocol.messages import Decision as AnswerDecision

CITY = "amsterdam"
ORIGIN = f"hansa/hanse/{CITY}"
ANALYST = "ana@amsterdam"
PURPOSE = "housing"
NOW = 1_800_000_000_000
ANALYST_KEY = SigningKey(b"\x11" * 32)
ROOT_KEY = SigningKey(b"\x12" * 32)
WITNESSES = {
    c: CosignatureSigner(f"witness/{c}", SigningKey(bytes([0x20 + i]) * 32))
    for i, c in enumerate(("berlin", "copenhagen", "dortmund"))
}


@dataclass
class World:
    """A city's node data directory, its keys and the roster naming them."""

    data_dir: Path
    node_key: SigningKey
    log_signer: NoteSigner
    signed_roster: SignedRoster
    roster: Roster
    answers: list[bytes]
    requests: list[bytes]

    @property
    def db(self) -> Path:
        return self.data_dir / AUDIT_FILE


def make_roster(
    node_key: SigningKey,
    quorum: int | None = 2,
    *,
    log_key: bytes | None = None,
    witness_keys: dict[str, bytes] | None = None,
) -> SignedRoster:
    """The roster; ``log_key`` and ``witness_keys`` (by city) are the keys it pins."""
    members = [
        Member(
            CITY,
            "Amsterdam",
            node_key.public_key.raw,
            "http://127.0.0.1:1",
            (Role.MEMBER, Role.AUDITOR),
            log_key=log_key,
        )
    ]
    for i, city in enumerate(WITNESSES):
        members.append(
            Member(
                city,
                city.title(),
                SigningKey(bytes([0x30 + i]) * 32).public_key.raw,
                f"http://127.0.0.1:{2 + i}",
                (Role.MEMBER, Role.WITNESS),
                witness_key=(witness_keys or {}).get(city),
            )
        )
    roster = Roster(
        alliance="hanse",
        version=1,
        expires_ms=NOW + 10 * 86_400_000,
        threshold=1,
        root_keys=(RootKey(CITY, ROOT_KEY.public_key.raw),),
        members=tuple(members),
        analysts=(Analyst(ANALYST, ANALYST_KEY.public_key.raw, CITY, (PURPOSE,)),),
        purposes=(PURPOSE,),
        witness_quorum=quorum,
    )
    return sign_roster(unsigned(roster), ROOT_KEY)


def request(
    i: int, *, key: SigningKey = ANALYST_KEY, issued_at: int = NOW, roster_version: int = 1
) -> QueryRequest:
    return QueryRequest(
        requester=ANALYST,
        issued_at=issued_at,
        expires_at=issued_at + 60_000,
        nonce=hashlib.sha256(b"nonce%d" % i).digest()[:16],
        roster_version=roster_version,
        policy=PolicyTags(
            purpose=PURPOSE, legal_basis="test", scope=ResultScope.ALLIANCE, analyst=ANALYST
        ),
        query=Query(dataset="listings", aggregates=(Count(),)),
        targets=(CITY,),
        quorum=1,
    )


def answer(req_id: bytes, node_key: SigningKey, version: int = 3) -> bytes:
    return seal(
        QueryAnswer(
            request_id=req_id,
            responder=CITY,
            requester=ANALYST,
            issued_at=NOW + 5,
            dataset="listings",
            dataset_version="v1-0123456789ab",
            disclosure_version=version,
            decision=AnswerDecision.ANSWERED,
            groups=(),
        ),
        node_key,
    )


def refusal(req_id: bytes, node_key: SigningKey) -> bytes:
    return seal(
        QueryRefusal(
            request_id=req_id,
            responder=CITY,
            requester=ANALYST,
            issued_at=NOW + 5,
            code=ErrorCode.PURPOSE_NOT_ALLOWED,
            reason="no",
        ),
        node_key,
    )


def capabilities(node_key: SigningKey, version: int) -> bytes:
    """A signed capability document publishing ``listings`` at disclosure ``version``."""
    from hansa.protocol.messages import (
        Capabilities,
        ColumnInfo,
        ColumnRole,
        ColumnType,
        DatasetInfo,
        DisclosureProfile,
    )

    profile = DisclosureProfile(
        version=version,
        min_group_size=5,
        dominance_p=80.0,
        max_groups=100,
        purposes=(PURPOSE,),
        aggregates=(),
    )
    dataset = DatasetInfo(
        "listings",
        "v1-0123456789ab",
        (ColumnInfo("room_type", ColumnType.TEXT, ColumnRole.DIMENSION),),
        profile,
    )
    return seal(Capabilities(CITY, node_key.public_key.raw, NOW - 2, (dataset,)), node_key)


def serve(
    log: AuditLog,
    world: World,
    i: int,
    *,
    envelope: bytes | None = None,
    refuse: bool = False,
    log_time: int | None = None,
) -> None:
    """Log one request the way the node does: received, decision, answer sent."""
    env = envelope if envelope is not None else seal(request(i), ANALYST_KEY)
    mid = message_id(env)
    t = NOW + 10 * i if log_time is None else log_time
    log.append(RequestReceived(t, mid, ANALYST_KEY.public_key.key_id), [env])
    if refuse:
        reply = refusal(mid, world.node_key)
        log.append(Decision(t + 1, mid, Outcome.REFUSED, int(ErrorCode.PURPOSE_NOT_ALLOWED)))
    else:
        reply = answer(mid, world.node_key)
        log.append(Decision(t + 1, mid, Outcome.ANSWERED, 0, 3, "v1-0123456789ab"))
    log.append(AnswerSent(t + 2, mid, message_id(reply)), [reply])
    world.requests.append(env)
    world.answers.append(reply)


def build(
    tmp: Path,
    name: str = "node",
    *,
    n: int = 6,
    quorum: int | None = 2,
    data_dir: Path | None = None,
) -> World:
    """A node data directory with a clean log of ``n`` served requests and checkpoints."""
    config = init_node(data_dir or tmp / name, city=CITY)
    node_key = read_key_file(config.key_file)
    log_key = read_key_file(config.path(config.audit.log_key_file))
    signed = make_roster(node_key, quorum)
    from hansa.federation.roster import decode_roster

    world = World(
        config.data_dir,
        node_key,
        NoteSigner(ORIGIN, log_key),
        signed,
        decode_roster(signed.body),
        [],
        [],
    )
    with AuditLog.open(world.db, ORIGIN, durable=False) as log:
        caps = capabilities(node_key, 3)
        log.append(
            SettingsChanged(NOW - 1, SettingsScope.DISCLOSURE, message_id(caps), 3, "listings"),
            [caps],
        )
        for i in range(n):
            serve(log, world, i, refuse=i == 2)
            if i % 2 == 1:
                log.checkpoint(world.log_signer)
    return world


def import_(
    world: World,
    store: Path,
    *,
    cosign: tuple[str, ...] = tuple(WITNESSES),
    pin_witnesses: bool = True,
) -> None:
    """Import like ``hansa audit import`` and add witnessed copies of each checkpoint."""
    vkeys = [w.vkey for w in WITNESSES.values()] if pin_witnesses else []
    import_data_dir(store, world.data_dir, witness_vkeys=vkeys)
    with AuditorStore.open(store, CITY) as s:
        for seen in s.checkpoints():
            if b"witness/" in seen.note:
                continue  # already a witnessed copy
            note = seen.note
            for name in cosign:
                note = cosign_checkpoint(note, WITNESSES[name], 1_800_000_000)
            if cosign:
                s.add_checkpoint(note)


def verify(world: World, store: Path, **kw: object) -> AuditReport:
    with AuditorStore.open(store, CITY) as s:
        contents = s.contents()
    return verify_log(contents, [world.roster], workers=0, **kw)  # type: ignore[arg-type]


def edit(db: Path, *statements: tuple[str, tuple[object, ...]]) -> None:
    conn = sqlite3.connect(db)
    with conn:
        for sql, params in statements:
            conn.execute(sql, params)
    conn.close()


def leaf_at(db: Path, idx: int) -> bytes:
    conn = sqlite3.connect(db)
    (leaf,) = conn.execute("SELECT leaf FROM leaves WHERE idx = ?", (idx,)).fetchone()
    conn.close()
    return bytes(leaf)


def checks(report: AuditReport) -> set[str]:
    return {f.check for f in report.failures}


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> tuple[World, Path]:
    tmp = tmp_path_factory.mktemp("clean")
    world = build(tmp)
    import_(world, tmp / "store")
    return world, tmp / "store"


# --- a clean log ----------------------------------------------------------------------


def test_clean_log_verifies(clean: tuple[World, Path]) -> None:
    world, store = clean
    report = verify(world, store)
    assert report, [str(f) for f in report.failures]
    assert report.size == 1 + 6 * 3
    assert report.counts == {
        "settings_changed": 1,
        "request_received": 6,
        "decision": 6,
        "answer_sent": 6,
    }
    assert report.signatures == 12
    assert report.largest_checkpoint == 1 + 6 * 3
    assert report.checkpoints == 6  # three notes as signed, three with cosignatures


def test_clean_log_verifies_on_worker_processes(
    clean: tuple[World, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    world, store = clean
    monkeypatch.setattr(audit, "INLINE_LIMIT", 1)
    with AuditorStore.open(store, CITY) as s:
        report = verify_log(s.contents(), [world.roster], workers=2)
    assert report and report.signatures == 12


def test_cli_import_and_verify(clean: tuple[World, Path], tmp_path: Path) -> None:
    world, _ = clean
    roster_file = tmp_path / "roster.bin"
    from hansa.federation.roster import encode_signed_roster

    roster_file.write_bytes(encode_signed_roster(world.signed_roster))
    store = tmp_path / "store"
    assert main(["audit", "import", str(world.data_dir), "--store", str(store)]) == 0
    # Without cosigned checkpoints the roster's witness quorum is not met.
    code = main(
        ["audit", "verify", "--store", str(store), "--roster", str(roster_file), "--workers", "0"]
    )
    assert code == EXIT_VERIFY_FAILED
    import_(world, store)
    assert main(["audit", "verify", "--store", str(store), "--roster", str(roster_file)]) == 0


# --- what the issue requires detected -------------------------------------------------


def test_deleted_entry_is_detected(tmp_path: Path) -> None:
    world = build(tmp_path)
    # Delete entry 4 and renumber the rest, so the log looks contiguous.
    rows = [(i, leaf_at(world.db, i)) for i in range(5, 19)]
    edit(
        world.db,
        ("DELETE FROM leaves WHERE idx >= 4", ()),
        *[("INSERT INTO leaves VALUES (?, ?)", (i - 1, leaf)) for i, leaf in rows],
    )
    import_(world, tmp_path / "store")
    report = verify(world, tmp_path / "store")
    assert not report and "checkpoint" in checks(report)


def test_deleted_entry_leaving_a_gap_is_detected(tmp_path: Path) -> None:
    world = build(tmp_path)
    edit(world.db, ("DELETE FROM leaves WHERE idx = 7", ()))
    import_(world, tmp_path / "store")
    report = verify(world, tmp_path / "store")
    assert "tree" in checks(report)
    assert any(f.index == 7 for f in report.failures)


def test_modified_entry_is_detected(tmp_path: Path) -> None:
    world = build(tmp_path)
    # Turn the refusal's decision (entry 8) into an answer: a well-formed leaf.
    entry = decode_entry(leaf_at(world.db, 8))
    assert isinstance(entry, Decision) and entry.outcome is Outcome.REFUSED
    forged = encode_entry(Decision(entry.log_time_ms, entry.message_id, Outcome.ANSWERED))
    edit(world.db, ("UPDATE leaves SET leaf = ? WHERE idx = 8", (forged,)))
    import_(world, tmp_path / "store")
    report = verify(world, tmp_path / "store")
    assert "checkpoint" in checks(report)
    # ...and the forged decision contradicts the signed refusal.
    assert any(f.index == 8 and f.check == "decision" for f in report.failures)


def test_reordered_entries_are_detected(tmp_path: Path) -> None:
    world = build(tmp_path)
    a, b = leaf_at(world.db, 10), leaf_at(world.db, 13)
    edit(
        world.db,
        ("UPDATE leaves SET leaf = ? WHERE idx = 10", (b,)),
        ("UPDATE leaves SET leaf = ? WHERE idx = 13", (a,)),
    )
    import_(world, tmp_path / "store")
    report = verify(world, tmp_path / "store")
    assert "checkpoint" in checks(report)


def test_rewrite_between_two_fetches_is_detected(tmp_path: Path) -> None:
    world = build(tmp_path)
    import_(world, tmp_path / "store")
    forged = leaf_at(world.db, 5)[:-2] + b"\x00\x00"  # edit without breaking the layout
    assert forged != leaf_at(world.db, 5)
    edit(world.db, ("UPDATE leaves SET leaf = ? WHERE idx = 5", (forged,)))
    import_(world, tmp_path / "store")  # the store keeps the first bytes and the conflict
    report = verify(world, tmp_path / "store")
    assert any(f.index == 5 and f.check == "tree" for f in report.failures)


def test_forked_history_shown_to_two_auditors_is_detected(tmp_path: Path) -> None:
    world = build(tmp_path, n=2)
    fork_dir = tmp_path / "fork"
    # The same node (same keys) keeps a second log: same prefix, then other entries.
    import shutil

    shutil.copytree(world.data_dir, fork_dir)
    fork = World(
        fork_dir, world.node_key, world.log_signer, world.signed_roster, world.roster, [], []
    )
    for w, first in ((world, 10), (fork, 20)):
        with AuditLog.open(w.db, ORIGIN, durable=False) as log:
            for i in range(first, first + 2):
                serve(log, w, i)
            log.checkpoint(world.log_signer)
    import_(world, tmp_path / "a")
    import_(fork, tmp_path / "b")
    # Each auditor alone sees a consistent, verifying log...
    assert verify(world, tmp_path / "a")
    assert verify(fork, tmp_path / "b")
    # ...but their signed checkpoints cannot both be true.
    with AuditorStore.open(tmp_path / "a", CITY) as a, AuditorStore.open(tmp_path / "b", CITY) as b:
        result = compare_stores(a.contents(), b.contents())
    assert not result
    assert any("fork" in f for f in result.failures)
    assert result.first_difference == 7


def test_same_history_compares_clean(clean: tuple[World, Path], tmp_path: Path) -> None:
    world, store = clean
    import_(world, tmp_path / "other", cosign=())
    with AuditorStore.open(store, CITY) as a, AuditorStore.open(tmp_path / "other", CITY) as b:
        result = compare_stores(a.contents(), b.contents())
    assert result and result.checked_pairs > 0 and result.first_difference is None


def test_checkpoint_signed_by_the_wrong_key_is_detected(tmp_path: Path) -> None:
    world = build(tmp_path, n=2)
    impostor = NoteSigner(ORIGIN, SigningKey(b"\x66" * 32))
    with AuditLog.open(world.db, ORIGIN, durable=False) as log:
        serve(log, world, 9)
        log.checkpoint(impostor)
    import_(world, tmp_path / "store")
    report = verify(world, tmp_path / "store")
    assert any(f.check == "checkpoint" and "not signed" in f.reason for f in report.failures)


def test_missing_cosignature_quorum_is_detected(tmp_path: Path) -> None:
    world = build(tmp_path, n=2)
    import_(world, tmp_path / "store", cosign=("berlin",))  # one of the two needed
    report = verify(world, tmp_path / "store")
    assert checks(report) == {"quorum"}


def test_quorum_counts_only_roster_witnesses(tmp_path: Path) -> None:
    world = build(tmp_path, n=2, quorum=1)
    import_(world, tmp_path / "store", cosign=("copenhagen",))
    assert verify(world, tmp_path / "store")


# --- keys the roster pins (spec §16.1) ----------------------------------------------------


def _rostered(world: World, **kw: object) -> Roster:
    from hansa.federation.roster import decode_roster

    return decode_roster(make_roster(world.node_key, **kw).body)  # type: ignore[arg-type]


def _verify_with(store: Path, roster: Roster) -> AuditReport:
    with AuditorStore.open(store, CITY) as s:
        return verify_log(s.contents(), [roster], workers=0)


def test_the_roster_log_key_is_used_and_tofu_is_reported(clean: tuple[World, Path]) -> None:
    world, store = clean
    # Without log or witness keys in the roster, every key is the store's pin: said so.
    report = verify(world, store)
    assert report and set(report.tofu) == {ORIGIN, *(f"witness/{c}" for c in WITNESSES)}
    assert any("trusted on first use" in w for w in report.warnings)
    # The roster names the log key the node really signs with: no TOFU for the log.
    named = _rostered(world, log_key=world.log_signer.verifier.public_key.raw)
    report = _verify_with(store, named)
    assert report, [str(f) for f in report.failures]
    assert ORIGIN not in report.tofu and report.largest_checkpoint == report.size
    # The roster names another log key: the pinned key no longer vouches for anything.
    other = _rostered(world, log_key=SigningKey(b"\x67" * 32).public_key.raw)
    report = _verify_with(store, other)
    bad = [f for f in report.failures if f.check == "checkpoint"]
    assert len(bad) == report.checkpoints and all("not signed" in f.reason for f in bad)
    assert report.largest_checkpoint == 0 and ORIGIN not in report.tofu
    assert any("no supplied roster names" in w for w in report.warnings)


def test_checkpoints_under_any_supplied_roster_version_s_log_key_verify(
    clean: tuple[World, Path],
) -> None:
    world, store = clean
    v1 = _rostered(world, log_key=world.log_signer.verifier.public_key.raw)
    fields = {f: getattr(v1, f) for f in v1.__struct_fields__}
    import msgspec

    rotated = msgspec.structs.replace(
        v1.members[0], log_key=SigningKey(b"\x68" * 32).public_key.raw
    )
    fields.update(version=2, members=(rotated, *v1.members[1:]))
    v2 = Roster(**fields)
    with AuditorStore.open(store, CITY) as s:
        contents = s.contents()
    # Only the rotated key: the old checkpoints fail; with the version that named the
    # key of their time, they verify.
    assert not verify_log(contents, [v2], workers=0)
    assert verify_log(contents, [v1, v2], workers=0)


def test_roster_witness_keys_count_and_override_pins(tmp_path: Path) -> None:
    world = build(tmp_path, n=2)
    keys = {c: w.verifier.public_key.raw for c, w in WITNESSES.items()}
    import_(world, tmp_path / "store", cosign=("berlin", "copenhagen"), pin_witnesses=False)
    # Nothing pinned for the witnesses: only the roster's keys can make the quorum.
    assert checks(verify(world, tmp_path / "store")) == {"quorum"}
    report = _verify_with(tmp_path / "store", _rostered(world, witness_keys=keys))
    assert report, [str(f) for f in report.failures]
    assert report.tofu == [ORIGIN]
    # The roster names another key for berlin: its cosignature no longer counts, even
    # where the store pinned the key that made it.
    import_(world, tmp_path / "pinned", cosign=("berlin", "copenhagen"))
    assert verify(world, tmp_path / "pinned")
    swapped = {**keys, "berlin": SigningKey(b"\x69" * 32).public_key.raw}
    report = _verify_with(tmp_path / "pinned", _rostered(world, witness_keys=swapped))
    assert checks(report) == {"quorum"}
    assert "witness/berlin" not in report.tofu


def test_logged_request_with_a_bad_signature_is_detected(tmp_path: Path) -> None:
    world = build(tmp_path, n=2)
    good = decode_envelope(seal(request(7), ANALYST_KEY))
    bad_sig = bytes([good.signature[0] ^ 1]) + good.signature[1:]
    bad = encode_envelope(
        Envelope(good.version, good.payload_type, good.payload, good.key_id, bad_sig)
    )
    with AuditLog.open(world.db, ORIGIN, durable=False) as log:
        serve(log, world, 7, envelope=bad)
        log.checkpoint(world.log_signer)
    import_(world, tmp_path / "store")
    report = verify(world, tmp_path / "store")
    assert [f.check for f in report.failures] == ["request"]
    assert "signature" in report.failures[0].reason


def test_request_by_a_key_the_roster_does_not_name_is_detected(tmp_path: Path) -> None:
    world = build(tmp_path, n=0)
    with AuditLog.open(world.db, ORIGIN, durable=False) as log:
        serve(log, world, 1, envelope=seal(request(1), SigningKey(b"\x77" * 32)))
        log.checkpoint(world.log_signer)
    import_(world, tmp_path / "store")
    assert "request" in checks(verify(world, tmp_path / "store"))


def test_answered_stale_and_replayed_requests_are_detected(tmp_path: Path) -> None:
    world = build(tmp_path, n=0)
    env = seal(request(1), ANALYST_KEY)
    with AuditLog.open(world.db, ORIGIN, durable=False) as log:
        serve(log, world, 1, envelope=env, log_time=NOW + 3_600_000)  # an hour too late
        serve(log, world, 2, envelope=seal(request(1, issued_at=NOW + 1), ANALYST_KEY))
        serve(log, world, 3, envelope=env, refuse=True)  # a replay, correctly refused
        log.checkpoint(world.log_signer)
    import_(world, tmp_path / "store")
    report = verify(world, tmp_path / "store")
    reasons = [f.reason for f in report.failures if f.check == "freshness"]
    assert len(reasons) == 2, reasons
    assert any("validity window" in r for r in reasons)
    assert any("nonce" in r for r in reasons)


def test_decision_against_the_logged_disclosure_settings_is_detected(tmp_path: Path) -> None:
    world = build(tmp_path, n=1)
    with AuditLog.open(world.db, ORIGIN, durable=False) as log:
        caps = capabilities(world.node_key, 4)
        log.append(
            SettingsChanged(NOW + 50, SettingsScope.DISCLOSURE, message_id(caps), 4, "listings"),
            [caps],
        )
        serve(log, world, 8)  # still answers under version 3
        log.checkpoint(world.log_signer)
    import_(world, tmp_path / "store")
    report = verify(world, tmp_path / "store")
    assert checks(report) == {"settings"}


# --- reconcile -------------------------------------------------------------------------


def bundle(world: World, sealed: bytes, reply: bytes) -> EvidenceBundle:
    """A one-city bundle holding one request and its reply."""
    req = request(0)
    return EvidenceBundle(
        format_version=2,
        requester=ANALYST,
        query=req.query,
        policy=req.policy,
        targets=(CITY,),
        quorum=1,
        issued_at=NOW,
        expires_at=NOW + 60_000,
        request=sealed,
        roster=world.signed_roster,
        roster_digest=roster_digest(world.signed_roster),
        cities=(CityEvidence(CITY, "answered", None, reply),),
        quorum_met=True,
        combined=None,
    )


def test_reconcile_accounts_for_every_answer(clean: tuple[World, Path]) -> None:
    world, store = clean
    with AuditorStore.open(store, CITY) as s:
        logs = {CITY: s.contents()}
    pairs = list(zip(world.requests, world.answers, strict=True))
    full = reconcile(logs, [bundle(world, r, a) for r, a in pairs])
    assert full, full.failures
    assert full.bundle_answers == full.logged_answers == 6


def test_answer_held_by_analyst_but_not_logged_is_detected(clean: tuple[World, Path]) -> None:
    world, store = clean
    with AuditorStore.open(store, CITY) as s:
        logs = {CITY: s.contents()}
    pairs = list(zip(world.requests, world.answers, strict=True))
    extra_req = seal(request(99), ANALYST_KEY)
    extra = (extra_req, answer(message_id(extra_req), world.node_key))
    result = reconcile(logs, [bundle(world, r, a) for r, a in [*pairs, extra]])
    assert [("does not record" in f) for f in result.failures] == [True]
    # and a logged answer no bundle holds
    result = reconcile(logs, [bundle(world, r, a) for r, a in pairs[1:]])
    assert len(result.failures) == 1 and "no bundle holds" in result.failures[0]


# --- the store and the leaf parser -----------------------------------------------------


def test_store_pins_keys_on_first_use(tmp_path: Path) -> None:
    with AuditorStore.open(tmp_path, CITY, ORIGIN) as store:
        first = NoteSigner(ORIGIN, SigningKey(b"\x01" * 32)).vkey
        store.pin(ORIGIN, first, "log")
        store.pin(ORIGIN, first, "log")
        with pytest.raises(AuditStoreError):
            store.pin(ORIGIN, NoteSigner(ORIGIN, SigningKey(b"\x02" * 32)).vkey, "log")
    with pytest.raises(AuditStoreError):
        AuditorStore.open(tmp_path, CITY, "hansa/other/amsterdam")


def test_parse_leaf_is_the_shared_codec_with_value_errors() -> None:
    # The codec itself is tested in test_auditlog.py; here only the auditor's contract.
    leaf = encode_entry(Decision(5, bytes(32), Outcome.REFUSED, int(ErrorCode.EXPIRED)))
    parsed = parse_leaf(leaf)
    assert (parsed.kind, parsed.outcome, parsed.reason) == (
        audit.DECISION,
        audit.OUTCOME_REFUSED,
        int(ErrorCode.EXPIRED),
    )
    with pytest.raises(ValueError, match="refusal needs a non-zero reason"):
        parse_leaf(leaf[: 24 + 33] + b"\x00\x00" + leaf[24 + 35 :])


@settings(max_examples=200)
@given(st.binary(max_size=120))
def test_parse_leaf_rejects_garbage_with_value_error_only(data: bytes) -> None:
    leaf = b"hansa-audit/v1\n" + data
    try:
        parsed = parse_leaf(leaf)
    except ValueError:
        return
    assert encode_entry(decode_entry(leaf)) == leaf  # whatever parses, the node accepts
    assert parsed.kind in audit.ENTRY_NAMES


# --- against a live node -----------------------------------------------------------------


def test_fetch_from_a_live_node_incrementally_and_verify(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio
    import time

    from nodeutil import init_test_node, running_node

    from hansa.crypto.keyfile import write_key_file
    from hansa.federation.fanout import build_request
    from hansa.federation.roster import (
        decode_roster,
        decode_signed_roster,
        encode_signed_roster,
    )
    from hansa.node._cli_audit import fetch_city
    from hansa.node.config import configure_alliance

    now = time.time_ns() // 1_000_000
    config = init_test_node(tmp_path, CITY, rows=60)
    node_key = read_key_file(config.key_file)
    log_key = read_key_file(config.path(config.audit.log_key_file))
    auditor = SigningKey(b"\x44" * 32)

    def roster_naming(key: SigningKey) -> SignedRoster:
        """Roster v1, naming ``key`` as the city's log key (spec §16.1)."""
        roster = Roster(
            alliance="hanse",
            version=1,
            expires_ms=now + 86_400_000,
            threshold=1,
            root_keys=(RootKey(CITY, ROOT_KEY.public_key.raw),),
            members=(
                Member(
                    CITY,
                    "A",
                    node_key.public_key.raw,
                    "http://127.0.0.1:9",
                    (Role.MEMBER,),
                    log_key=key.public_key.raw,
                ),
                Member(
                    "berlin", "B", auditor.public_key.raw, "http://127.0.0.1:9", (Role.AUDITOR,)
                ),
            ),
            analysts=(Analyst(ANALYST, ANALYST_KEY.public_key.raw, CITY, ("research",)),),
            purposes=("research",),
        )
        return sign_roster(unsigned(roster), ROOT_KEY)

    signed = roster_naming(log_key)
    # Another roster v1 naming a log key the node does not have (a substituted key).
    wrong = tmp_path / "wrong-roster.bin"
    wrong.write_bytes(encode_signed_roster(roster_naming(SigningKey(b"\x45" * 32))))
    auditor_file = tmp_path / "auditor.key"
    write_key_file(auditor_file, auditor)
    config = configure_alliance(
        config.data_dir, encode_signed_roster(signed), roster_digest(signed), now
    )
    store = tmp_path / "store"

    def ask(node_url: str, i: int) -> None:
        import urllib.request

        req = build_request(
            Query(dataset="listings", aggregates=(Count(),)),
            PolicyTags(
                purpose="research", legal_basis="t", scope=ResultScope.ALLIANCE, analyst=ANALYST
            ),
            requester=ANALYST,
            targets=(CITY,),
            issued_at=time.time_ns() // 1_000_000,
            expires_at=time.time_ns() // 1_000_000 + 60_000,
            roster_version=1,
        )
        http = urllib.request.Request(
            node_url + "/v1/query",
            data=seal(req, ANALYST_KEY),
            headers={"Content-Type": "application/vnd.hansa.envelope+msgpack"},
        )
        with urllib.request.urlopen(http, timeout=30) as reply:
            assert reply.status == 200

    async def run() -> tuple[tuple[int, int], tuple[int, int]]:
        async with running_node(config) as node:
            for i in range(3):
                await asyncio.to_thread(ask, node.url, i)
            first = await asyncio.to_thread(
                fetch_city, store, CITY, decode_roster(signed.body), auditor, endpoint=node.url
            )
            for i in range(3, 5):
                await asyncio.to_thread(ask, node.url, i)
            second = await asyncio.to_thread(
                fetch_city, store, CITY, decode_roster(signed.body), auditor, endpoint=node.url
            )
            # The node serves its own log key, not the one this roster names: refused,
            # never pinned on first use, by the API and the command line alike.
            other = decode_roster(decode_signed_roster(wrong.read_bytes()).body)
            with pytest.raises(SignatureError, match="names") as exc:
                await asyncio.to_thread(
                    fetch_city, tmp_path / "store2", CITY, other, auditor, endpoint=node.url
                )
            assert exc.value.code is ErrorCode.ROSTER_MISMATCH
            argv = ["audit", "fetch", CITY, "--roster", str(wrong), "--key", str(auditor_file)]
            argv += ["--store", str(tmp_path / "store3"), "--endpoint", node.url]
            assert await asyncio.to_thread(main, argv) == EXIT_ERROR
            return first, second

    first, second = asyncio.run(run())
    assert second[0] > first[0] and first[1] == second[1] == 0
    assert not AuditorStore.cities(tmp_path / "store2")  # nothing was stored
    assert "at /v1/log/keys, but roster v1 names" in capsys.readouterr().err
    with AuditorStore.open(store, CITY) as s:
        report = verify_log(s.contents(), [decode_roster(signed.body)], workers=0)
    assert report, [str(f) for f in report.failures]
    assert report.tofu == []  # the roster named the log key; no witnesses
    assert report.counts["request_received"] == 5
    assert report.counts["answer_sent"] == 5
    assert report.signatures == 10
    assert report.largest_checkpoint == report.size


def test_cli_compare_and_reconcile(clean: tuple[World, Path], tmp_path: Path) -> None:
    from hansa.protocol.codec import encode

    world, store = clean
    import_(world, tmp_path / "other", cosign=())
    assert (
        main(["audit", "compare", "--store", str(store), "--other", str(tmp_path / "other")]) == 0
    )
    pairs = list(zip(world.requests, world.answers, strict=True))
    files = []
    for i, (sealed, reply) in enumerate(pairs):
        files.append(tmp_path / f"{i}.bundle")
        files[-1].write_bytes(encode(bundle(world, sealed, reply)))
    every = [str(f) for f in files]
    assert main(["audit", "reconcile", "--store", str(store), *every]) == 0
    assert main(["audit", "reconcile", "--store", str(store), *every[:-1]]) == EXIT_VERIFY_FAILED


def test_installed_rosters_are_checked(tmp_path: Path) -> None:
    from hansa.node.auditlog import RosterInstalled

    world = build(tmp_path, n=0)
    digest = roster_digest(world.signed_roster)
    with AuditLog.open(world.db, ORIGIN, durable=False) as log:
        log.append(RosterInstalled(NOW, digest, 1))
        serve(log, world, 1)
        log.append(RosterInstalled(NOW + 20, bytes(32), 1))  # a forged roster v1
        serve(log, world, 3, envelope=seal(request(3, roster_version=2), ANALYST_KEY))
        log.checkpoint(world.log_signer)
    import_(world, tmp_path / "store")
    with AuditorStore.open(tmp_path / "store", CITY) as s:
        report = verify_log(s.contents(), [world.roster], workers=0, roster_digests={1: digest})
    assert [f.index for f in report.failures if f.check == "roster"] == [5]
    stale = [f for f in report.failures if f.check == "freshness"]
    assert len(stale) == 1 and "while v1 was installed" in stale[0].reason
    assert stale[0].index == 6


def test_settings_must_be_backed_by_the_signed_capability_document(tmp_path: Path) -> None:
    world = build(tmp_path, n=0)
    caps = capabilities(world.node_key, 5)
    forged = capabilities(SigningKey(b"\x55" * 32), 6)
    with AuditLog.open(world.db, ORIGIN, durable=False) as log:
        scope = SettingsScope.DISCLOSURE
        log.append(SettingsChanged(NOW, scope, message_id(caps), 6, "listings"), [caps])
        log.append(SettingsChanged(NOW, scope, bytes(32), 6, "listings"))
        log.append(SettingsChanged(NOW, scope, message_id(forged), 6, "listings"), [forged])
        log.checkpoint(world.log_signer)
    import_(world, tmp_path / "store")
    report = verify(world, tmp_path / "store")
    found = {f.index: f.reason for f in report.failures if f.check == "settings"}
    assert set(found) == {1, 2, 3}, found
    assert "publishes 5" in found[1] and "not held" in found[2]
