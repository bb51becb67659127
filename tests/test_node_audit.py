"""The node's audit log over HTTP (spec §16): what is logged, and the auditor API.

Real nodes on 127.0.0.1 (``tests/nodeutil.py``) pinned to an alliance roster in
which ``austin`` holds the auditor role. Every check goes through the signed
``POST /v1/audit`` API and the note keys of ``GET /v1/log/keys``, verifying
checkpoint signatures and Merkle proofs with ``hansa.crypto``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nodeutil import (
    DATASET,
    PURPOSE,
    Analyst,
    RunningNode,
    count_by_room_type,
    init_test_node,
    now_ms,
    running_node,
)

from hansa.crypto import SigningKey, open_envelope, seal
from hansa.crypto.envelope import seal_bytes
from hansa.crypto.keyfile import read_public_key
from hansa.crypto.merkle import leaf_hash, verify_consistency, verify_inclusion
from hansa.crypto.note import Checkpoint, NoteVerifier, verify_checkpoint
from hansa.federation.audit import AuditorStore, verify_log
from hansa.federation.roster import Analyst as RosterAnalyst
from hansa.federation.roster import (
    Member,
    Role,
    RootKey,
    Roster,
    decode_signed_roster,
    encode_signed_roster,
    roster_digest,
    sign_roster,
    unsigned,
)
from hansa.node._cli_audit import import_data_dir
from hansa.node.app import AUDIT_ROUTE, ERROR_MEDIA_TYPE, LOG_KEYS_ROUTE
from hansa.node.auditlog import (
    AnswerSent,
    AuditLogError,
    Decision,
    Outcome,
    RequestReceived,
    RosterInstalled,
    SettingsChanged,
    SettingsScope,
    decode_entry,
)
from hansa.node.config import NodeConfig, configure_alliance
from hansa.protocol.codec import decode_as
from hansa.protocol.envelope import PayloadType, decode_envelope, message_id
from hansa.protocol.errors import ErrorCode
from hansa.protocol.messages import (
    MAX_AUDIT_PAGE,
    AuditOp,
    AuditRequest,
    AuditResponse,
    ErrorMessage,
    QueryAnswer,
    QueryRefusal,
    QueryRequest,
)

CITY = "melbourne"
AUDITOR_CITY = "austin"
DAY_MS = 86_400_000

ANA = Analyst.create("ana@melbourne", seed=b"a" * 32)
BOB = Analyst.create("bob@melbourne", seed=b"b" * 32)
EVE = Analyst.create("eve@elsewhere", seed=b"e" * 32)
AUDITOR_KEY = SigningKey(b"o" * 32)
ROOTS = {CITY: SigningKey(b"r" * 32), AUDITOR_CITY: SigningKey(b"s" * 32)}


def _roster(
    node_key: bytes,
    *,
    witness_url: str | None = None,
    log_key: bytes | None = None,
    witness_key: bytes | None = None,
) -> bytes:
    """Roster v1: melbourne answers; austin audits (and witnesses, at ``witness_url``).

    ``log_key`` is melbourne's log key and ``witness_key`` austin's cosigning key, when
    the roster names them (spec §16.1).
    """
    austin_roles: tuple[Role, ...] = (Role.MEMBER, Role.AUDITOR)
    if witness_url is not None:
        austin_roles += (Role.WITNESS,)
    roster = Roster(
        alliance="Hanse",
        version=1,
        expires_ms=now_ms() + DAY_MS,
        threshold=2,
        root_keys=tuple(RootKey(c, k.public_key.raw) for c, k in ROOTS.items()),
        members=(
            Member(
                CITY,
                "Melbourne",
                node_key,
                "http://127.0.0.1:8470",
                (Role.MEMBER,),
                log_key=log_key,
            ),
            Member(
                AUDITOR_CITY,
                "Austin",
                AUDITOR_KEY.public_key.raw,
                witness_url or "http://127.0.0.1:8471",
                austin_roles,
                witness_key=witness_key,
            ),
        ),
        analysts=tuple(
            RosterAnalyst(a.principal, a.key.public_key.raw, CITY, (PURPOSE,)) for a in (ANA, BOB)
        ),
        purposes=(PURPOSE, "planning"),
        witness_quorum=None,  # one witness: its own log could never reach a quorum
    )
    doc = unsigned(roster)
    for key in ROOTS.values():
        doc = sign_roster(doc, key)
    return encode_signed_roster(doc)


@pytest.fixture
def config(tmp_path: Path) -> NodeConfig:
    base = init_test_node(tmp_path, CITY, rows=200)
    data = _roster(read_public_key(base.key_file).raw)
    return configure_alliance(
        base.data_dir, data, roster_digest(decode_signed_roster(data)), now_ms()
    )


def _audit_request(principal: str, op: AuditOp, **fields: Any) -> AuditRequest:
    issued = now_ms()
    return AuditRequest(
        requester=principal,
        audience=CITY,
        issued_at=issued,
        expires_at=issued + 60_000,
        nonce=os.urandom(16),
        roster_version=1,
        op=op,
        **fields,
    )


async def _audit(
    node: RunningNode, op: AuditOp, *, key: SigningKey = AUDITOR_KEY, **fields: Any
) -> AuditResponse | QueryRefusal:
    principal = AUDITOR_CITY if key is AUDITOR_KEY else _principal_of(key)
    status, body = await node.post(
        seal(_audit_request(principal, op, **fields), key), path=AUDIT_ROUTE
    )
    assert status == 200, body[:200]
    keys = {node.node_key.key_id: node.node_key}
    try:
        return open_envelope(body, keys, AuditResponse).message
    except Exception:
        return open_envelope(body, keys, QueryRefusal).message


def _principal_of(key: SigningKey) -> str:
    for analyst in (ANA, BOB, EVE):
        if analyst.key.public_key == key.public_key:
            return analyst.principal
    raise AssertionError("unknown test key")


async def _ok(node: RunningNode, op: AuditOp, **fields: Any) -> AuditResponse:
    response = await _audit(node, op, **fields)
    assert isinstance(response, AuditResponse), response
    assert response.op is op
    return response


async def _log_verifier(node: RunningNode) -> NoteVerifier:
    status, body, content_type = await node.get(LOG_KEYS_ROUTE)
    assert status == 200 and content_type == "application/json"
    keys = json.loads(body)
    assert keys["origin"] == f"hansa/Hanse/{CITY}"
    assert keys["witness_vkey"] is None  # not initialised with --witness
    verifier = NoteVerifier.from_vkey(keys["log_vkey"])
    assert verifier.name == keys["origin"]
    return verifier


async def _checkpoint(node: RunningNode, verifier: NoteVerifier) -> Checkpoint:
    response = await _ok(node, AuditOp.CHECKPOINT)
    assert response.checkpoint is not None
    checkpoint = verify_checkpoint(response.checkpoint, verifier)
    assert checkpoint.size == response.tree_size
    return checkpoint


async def _entries(node: RunningNode, start: int, end: int) -> list[bytes]:
    response = await _ok(node, AuditOp.ENTRIES, start=start, end=end)
    assert response.first_index == start
    return list(response.entries)


async def _all_entries(node: RunningNode) -> list[bytes]:
    leaves: list[bytes] = []
    while True:
        page = await _entries(node, len(leaves), len(leaves) + MAX_AUDIT_PAGE)
        if not page:
            return leaves
        leaves += page


async def _query(
    node: RunningNode, analyst: Analyst, purpose: str = PURPOSE
) -> tuple[bytes, bytes]:
    request = analyst.request(CITY, count_by_room_type(), purpose=purpose)
    envelope = analyst.seal(msgspec.structs.replace(request, roster_version=1))
    status, body = await node.post(envelope)
    assert status == 200
    return envelope, body


# --- what is logged ---------------------------------------------------------------------


async def test_request_decision_and_answer_are_logged_before_the_reply(
    config: NodeConfig,
) -> None:
    async with running_node(config) as node:
        audit = node.state.audit
        assert audit is not None
        request, reply = await _query(node, ANA)
        # Nothing awaited since the reply arrived: the entries were durable before it left.
        request_at = audit.index_of(message_id(request))
        answer_at = audit.index_of(message_id(reply))
        assert request_at is not None and answer_at == request_at + 2

        leaves = await _all_entries(node)
        assert len(leaves) == audit.size
        received, decided, sent = (
            decode_entry(leaf) for leaf in leaves[request_at : answer_at + 1]
        )
        assert isinstance(received, RequestReceived)
        assert received.message_id == message_id(request)
        assert received.requester_key_id == ANA.key.public_key.key_id
        assert isinstance(decided, Decision) and decided.message_id == message_id(request)
        answer = open_envelope(reply, {node.node_key.key_id: node.node_key}, QueryAnswer).message
        assert decided.outcome in (Outcome.ANSWERED, Outcome.ANSWERED_SUPPRESSED)
        assert (decided.data_version, decided.disclosure_version) == (
            answer.dataset_version,
            answer.disclosure_version,
        )
        assert isinstance(sent, AnswerSent)
        assert (sent.request_id, sent.answer_id) == (message_id(request), message_id(reply))

        # The envelopes are kept beside the tree, byte for byte.
        stored = await _ok(
            node, AuditOp.ENVELOPES, hashes=(message_id(request), message_id(reply), bytes(32))
        )
        assert dict(stored.envelopes) == {
            message_id(request): request,
            message_id(reply): reply,
        }

        # The start-up entries: the roster installed and the settings in force.
        first = [decode_entry(leaf) for leaf in leaves[:request_at]]
        assert any(isinstance(e, RosterInstalled) and e.roster_version == 1 for e in first)
        scopes = {e.scope for e in first if isinstance(e, SettingsChanged)}
        assert scopes == {SettingsScope.CONFIG, SettingsScope.DISCLOSURE}


async def test_a_request_waits_for_one_commit_and_a_lost_batch_fails_closed(
    config: NodeConfig,
) -> None:
    async with running_node(config) as node:
        audit = node.state.audit
        assert audit is not None
        before = audit.commits
        for _ in range(3):  # one at a time: no other request shares a commit
            await _query(node, ANA)
        # request_received is not committed on its own: it rides the reply's commit.
        assert audit.commits - before == 3

        def broken(*_args: object, **_kwargs: object) -> list[int]:
            raise AuditLogError("disk gone")

        audit.append_many = broken  # type: ignore[method-assign]
        status, body = await node.post(_sealed(ANA))
        assert status == 503
        assert decode_as(body, ErrorMessage).code is ErrorCode.UNAVAILABLE
        # The lost batch may have held request entries of replies queued after it, so
        # the node stays closed even once the store works again (spec §16.2).
        del audit.append_many
        size = audit.size
        request = _sealed(ANA)
        status, body = await node.post(request)
        assert status == 503
        assert decode_as(body, ErrorMessage).code is ErrorCode.UNAVAILABLE
        assert audit.size == size and audit.index_of(message_id(request)) is None


def _sealed(analyst: Analyst) -> bytes:
    request = analyst.request(CITY, count_by_room_type(), purpose=PURPOSE)
    return analyst.seal(msgspec.structs.replace(request, roster_version=1))


async def test_refusals_are_logged_and_unverifiable_junk_is_not(config: NodeConfig) -> None:
    async with running_node(config) as node:
        audit = node.state.audit
        assert audit is not None
        request, reply = await _query(node, BOB, purpose="planning")  # not BOB's purpose
        refusal = open_envelope(reply, {node.node_key.key_id: node.node_key}, QueryRefusal)
        assert refusal.message.code is ErrorCode.PURPOSE_NOT_ALLOWED
        at = audit.index_of(message_id(request))
        assert at is not None
        decided = audit.entry(at + 1)
        assert isinstance(decided, Decision)
        assert decided.outcome is Outcome.REFUSED
        assert decided.reason == ErrorCode.PURPOSE_NOT_ALLOWED
        assert audit.index_of(message_id(reply)) == at + 2

        size = audit.size
        for body in (b"", b"\x93junk", EVE.seal(EVE.request(CITY, count_by_room_type()))):
            status, _ = await node.post(body)
            assert status in (400, 401)
        assert audit.size == size


async def test_a_restart_logs_no_settings_that_did_not_change(config: NodeConfig) -> None:
    async with running_node(config) as node:
        assert node.state.audit is not None
        size = node.state.audit.size
    async with running_node(config) as node:
        assert node.state.audit is not None
        assert node.state.audit.size == size


# --- proofs -----------------------------------------------------------------------------


async def test_inclusion_and_consistency_proofs_verify_against_signed_checkpoints(
    config: NodeConfig,
) -> None:
    async with running_node(config) as node:
        verifier = await _log_verifier(node)
        request, _ = await _query(node, ANA)
        old = await _checkpoint(node, verifier)
        leaves = await _all_entries(node)
        assert old.size == len(leaves)

        by_id = await _ok(node, AuditOp.INCLUSION, message_id=message_id(request))
        assert decode_entry(leaves[by_id.index]) == decode_entry(leaves[by_id.index])
        assert isinstance(decode_entry(leaves[by_id.index]), RequestReceived)
        assert by_id.checkpoint is not None
        signed = verify_checkpoint(by_id.checkpoint, verifier)
        assert by_id.tree_size == signed.size
        assert verify_inclusion(
            leaf_hash(leaves[by_id.index]), by_id.index, signed.size, by_id.proof, signed.root_hash
        )
        # A proof for another leaf fails: the check can fail.
        assert not verify_inclusion(
            leaf_hash(leaves[0]), by_id.index, signed.size, by_id.proof, signed.root_hash
        )
        for index in range(len(leaves)):
            proof = await _ok(node, AuditOp.INCLUSION, index=index)
            assert verify_inclusion(
                leaf_hash(leaves[index]), index, proof.tree_size, proof.proof, old.root_hash
            )

        for _ in range(3):
            await _query(node, ANA)
        new = await _checkpoint(node, verifier)
        assert new.size == old.size + 9
        consistency = await _ok(node, AuditOp.CONSISTENCY, old_size=old.size)
        assert consistency.tree_size == new.size
        assert verify_consistency(
            old.size, new.size, old.root_hash, new.root_hash, consistency.proof
        )
        assert not verify_consistency(
            old.size, new.size, bytes(32), new.root_hash, consistency.proof
        )
        # Out of range: a signed refusal, not a crash.
        beyond = await _audit(node, AuditOp.CONSISTENCY, old_size=new.size + 1)
        assert isinstance(beyond, QueryRefusal) and beyond.code is ErrorCode.INVALID_FIELD
        missing = await _audit(node, AuditOp.INCLUSION, message_id=bytes(32))
        assert isinstance(missing, QueryRefusal) and missing.code is ErrorCode.INVALID_FIELD


async def test_checkpoints_are_signed_after_n_entries(tmp_path: Path, config: NodeConfig) -> None:
    text = (config.data_dir / "node.toml").read_text()
    text = text.replace("checkpoint_entries = 1000", "checkpoint_entries = 3")
    (config.data_dir / "node.toml").write_text(text)
    from hansa.node.config import load_config

    fast = load_config(config.data_dir)
    assert fast.audit.checkpoint_entries == 3
    async with running_node(fast) as node:
        audit = node.state.audit
        assert audit is not None
        for _ in range(4):
            await _query(node, ANA)
        # The background task runs within a fraction of a second (bounded wait).
        for _ in range(200):
            latest = audit.latest_checkpoint()
            if latest is not None and audit.size - latest.size < 3:
                break
            await _sleep(0.02)
        latest = audit.latest_checkpoint()
        assert latest is not None and audit.size - latest.size < 3


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


# --- who may ask --------------------------------------------------------------------------


async def test_analysts_and_outsiders_are_refused_for_log_reads(config: NodeConfig) -> None:
    async with running_node(config) as node:
        await _query(node, ANA)
        for op, fields in (
            (AuditOp.CHECKPOINT, {}),
            (AuditOp.ENTRIES, {"start": 0, "end": 10}),
            (AuditOp.INCLUSION, {"index": 0}),
            (AuditOp.CONSISTENCY, {"old_size": 1}),
            (AuditOp.ENVELOPES, {"hashes": (bytes(32),)}),
        ):
            refusal = await _audit(node, op, key=ANA.key, **fields)
            assert isinstance(refusal, QueryRefusal), op
            assert refusal.code is ErrorCode.REQUESTER_NOT_ALLOWED
            assert refusal.requester == ANA.principal

            outsider = seal(_audit_request(EVE.principal, op, **fields), EVE.key)
            status, body = await node.post(outsider, path=AUDIT_ROUTE)
            assert status == 401
            assert decode_as(body, ErrorMessage).code is ErrorCode.UNKNOWN_KEY

        # The auditor's key speaking for someone else is refused too.
        forged = seal(_audit_request(ANA.principal, AuditOp.CHECKPOINT), AUDITOR_KEY)
        status, body = await node.post(forged, path=AUDIT_ROUTE)
        forged_refusal = open_envelope(body, {node.node_key.key_id: node.node_key}, QueryRefusal)
        assert forged_refusal.message.code is ErrorCode.REQUESTER_NOT_ALLOWED
        # A replayed audit request is refused.
        request = seal(_audit_request(AUDITOR_CITY, AuditOp.CHECKPOINT), AUDITOR_KEY)
        assert (await node.post(request, path=AUDIT_ROUTE))[0] == 200
        status, body = await node.post(request, path=AUDIT_ROUTE)
        replay = open_envelope(body, {node.node_key.key_id: node.node_key}, QueryRefusal)
        assert replay.message.code is ErrorCode.REPLAYED
        status, body = await node.post(b"junk", path=AUDIT_ROUTE, content_type=ERROR_MEDIA_TYPE)
        assert status == 415


async def test_an_analyst_fetches_a_receipt_for_its_own_request_only(config: NodeConfig) -> None:
    async with running_node(config) as node:
        verifier = await _log_verifier(node)
        request, _ = await _query(node, ANA)
        receipt = await _audit(node, AuditOp.RECEIPT, key=ANA.key, message_id=message_id(request))
        assert isinstance(receipt, AuditResponse), receipt
        assert receipt.checkpoint is not None
        # The checkpoint was signed on demand to cover the request.
        signed = verify_checkpoint(receipt.checkpoint, verifier)
        assert receipt.index < signed.size == receipt.tree_size
        leaf = (await _entries(node, receipt.index, receipt.index + 1))[0]
        entry = decode_entry(leaf)
        assert isinstance(entry, RequestReceived) and entry.message_id == message_id(request)
        assert verify_inclusion(
            leaf_hash(leaf), receipt.index, signed.size, receipt.proof, signed.root_hash
        )

        other = await _audit(node, AuditOp.RECEIPT, key=BOB.key, message_id=message_id(request))
        assert isinstance(other, QueryRefusal) and other.code is ErrorCode.INVALID_FIELD
        unknown = await _audit(node, AuditOp.RECEIPT, key=ANA.key, message_id=bytes(32))
        assert isinstance(unknown, QueryRefusal) and unknown.code is ErrorCode.INVALID_FIELD
        # An auditor may fetch any request's receipt.
        assert isinstance(
            await _audit(node, AuditOp.RECEIPT, message_id=message_id(request)), AuditResponse
        )


# --- paging -------------------------------------------------------------------------------


def _raw_entries_request(start: int, end: int) -> bytes:
    """An entries request built without the struct's own check, signed by the auditor."""
    issued = now_ms()
    fields: Sequence[object] = (
        "audit-request",
        AUDITOR_CITY,
        CITY,
        issued,
        issued + 60_000,
        os.urandom(16),
        1,
        "entries",
        start,
        end,
        0,
        None,
        0,
        0,
        [],
    )
    body = msgspec.msgpack.encode(list(fields))
    return seal_bytes(PayloadType.AUDIT_REQUEST.value, body, AUDITOR_KEY)


async def test_entries_are_paged_and_bounded(config: NodeConfig) -> None:
    async with running_node(config) as node:
        for _ in range(3):
            await _query(node, ANA)
        audit = node.state.audit
        assert audit is not None
        size = audit.size
        assert await _entries(node, 0, MAX_AUDIT_PAGE) == audit.leaves(0, size)
        assert await _entries(node, 2, 4) == audit.leaves(2, 4)
        assert await _entries(node, size, size + 5) == []
        assert await _entries(node, size + 100, size + 200) == []

        keys = {node.node_key.key_id: node.node_key}
        for start, end in ((0, MAX_AUDIT_PAGE + 1), (5, 5), (7, 3)):
            status, body = await node.post(_raw_entries_request(start, end), path=AUDIT_ROUTE)
            assert status == 200
            refusal = open_envelope(body, keys, QueryRefusal).message
            assert refusal.code is ErrorCode.INVALID_FIELD, (start, end)
        status, body = await node.post(_raw_entries_request(0, MAX_AUDIT_PAGE), path=AUDIT_ROUTE)
        assert len(open_envelope(body, keys, AuditResponse).message.entries) == size


def test_unused_fields_must_keep_their_defaults() -> None:
    with pytest.raises(ValueError, match="does not take"):
        _audit_request(AUDITOR_CITY, AuditOp.CHECKPOINT, start=1)
    with pytest.raises(ValueError, match="entries needs"):
        _audit_request(AUDITOR_CITY, AuditOp.ENTRIES, start=0, end=MAX_AUDIT_PAGE + 1)
    with pytest.raises(ValueError, match="receipt needs"):
        _audit_request(AUDITOR_CITY, AuditOp.RECEIPT)
    assert DATASET  # the node publishes the listings dataset the queries use


# --- witness routes -------------------------------------------------------------------------


async def test_witness_routes_cosign_and_serve_cosignatures(config: NodeConfig) -> None:
    from hansa.crypto.keyfile import write_key_file
    from hansa.crypto.merkle import root_hash
    from hansa.crypto.note import NoteSigner, open_checkpoint, sign_checkpoint
    from hansa.node.app import WITNESS_ADD_ROUTE, WITNESS_COSIGNATURES_ROUTE, WITNESSED_LOGS_FILE
    from hansa.node.config import load_config
    from hansa.protocol.codec import encode
    from hansa.protocol.messages import AddCheckpoint

    write_key_file(config.data_dir / "witness.key", SigningKey(b"w" * 32))
    toml = config.data_dir / "node.toml"
    toml.write_text(toml.read_text().replace('witness_key = ""', 'witness_key = "witness.key"'))
    austin = NoteSigner("hansa/Hanse/austin", SigningKey(b"l" * 32))
    (config.data_dir / WITNESSED_LOGS_FILE).write_text(f"# austin\n{austin.verifier.vkey}\n")
    witness_config = load_config(config.data_dir)
    leaves = [b"one", b"two", b"three"]

    def checkpoint(size: int) -> bytes:
        return sign_checkpoint(Checkpoint(austin.name, size, root_hash(leaves[:size])), austin)

    async with running_node(witness_config) as node:
        status, body, _ = await node.get(LOG_KEYS_ROUTE)
        witness_vkey = json.loads(body)["witness_vkey"]
        assert witness_vkey is not None
        witness = NoteVerifier.from_vkey(witness_vkey)
        assert witness.name == f"witness/{CITY}"

        note = checkpoint(2)
        request = encode(AddCheckpoint(old_size=0, proof=(), checkpoint=note))
        status, line = await node.post(request, path=WITNESS_ADD_ROUTE)
        assert status == 200, line
        opened = open_checkpoint(note + line, austin.verifier, witnesses=[witness])
        assert opened.checkpoint.size == 2 and len(opened.cosignatures) == 1

        # The witness last cosigned size 2: old_size 0 is a conflict naming it.
        stale = encode(AddCheckpoint(old_size=0, proof=(), checkpoint=checkpoint(3)))
        status, size = await node.post(stale, path=WITNESS_ADD_ROUTE)
        assert (status, size) == (409, b"2\n")
        # A log the witness does not follow; a malformed body.
        other = NoteSigner("hansa/Hanse/paris", SigningKey(b"p" * 32))
        unknown = sign_checkpoint(Checkpoint(other.name, 1, root_hash(leaves[:1])), other)
        status, _ = await node.post(
            encode(AddCheckpoint(old_size=0, proof=(), checkpoint=unknown)),
            path=WITNESS_ADD_ROUTE,
        )
        assert status == 404
        status, _ = await node.post(b"\x93junk", path=WITNESS_ADD_ROUTE)
        assert status == 400

        status, body, content_type = await node.get(
            f"{WITNESS_COSIGNATURES_ROUTE}?origin={austin.name}"
        )
        assert status == 200 and content_type == "application/json"
        notes = json.loads(body)["notes"]
        assert len(notes) == 1
        served = open_checkpoint(notes[0].encode(), austin.verifier, witnesses=[witness])
        assert served.checkpoint.size == 2


async def test_checkpoints_are_pushed_to_the_roster_witness_and_served_cosigned(
    tmp_path: Path,
) -> None:
    import asyncio

    from hansa.crypto.keyfile import read_key_file, write_key_file
    from hansa.crypto.note import open_checkpoint
    from hansa.node.app import WITNESSED_LOGS_FILE
    from hansa.node.config import load_config

    # austin: a roster-less node that witnesses melbourne's log (its vkey pinned).
    austin = init_test_node(tmp_path / "w", AUDITOR_CITY, dataset=None)
    write_key_file(austin.data_dir / "witness.key", SigningKey(b"w" * 32))
    toml = austin.data_dir / "node.toml"
    toml.write_text(toml.read_text().replace('witness_key = ""', 'witness_key = "witness.key"'))
    melbourne = init_test_node(tmp_path / "a", CITY, rows=200)
    log_key = read_key_file(melbourne.data_dir / "log.key")
    log_verifier = NoteVerifier(f"hansa/Hanse/{CITY}", log_key.public_key)
    (austin.data_dir / WITNESSED_LOGS_FILE).write_text(log_verifier.vkey + "\n")

    async with running_node(load_config(austin.data_dir)) as witness_node:
        _, body, _ = await witness_node.get(LOG_KEYS_ROUTE)
        witness = NoteVerifier.from_vkey(json.loads(body)["witness_vkey"])
        data = _roster(read_public_key(melbourne.key_file).raw, witness_url=witness_node.url)
        configure_alliance(
            melbourne.data_dir, data, roster_digest(decode_signed_roster(data)), now_ms()
        )
        toml = melbourne.data_dir / "node.toml"
        toml.write_text(
            toml.read_text().replace("checkpoint_seconds = 10.0", "checkpoint_seconds = 0.1")
        )
        async with running_node(load_config(melbourne.data_dir)) as node:
            cosigned = None
            size = -1
            for round_ in range(100):  # bounded: at most ~5 s
                if round_ % 10 == 0:
                    await _query(node, ANA)  # the log grows, new checkpoints follow
                response = await _ok(node, AuditOp.CHECKPOINT)
                assert response.checkpoint is not None
                opened = open_checkpoint(response.checkpoint, log_verifier, witnesses=[witness])
                if opened.cosignatures:
                    cosigned, size = opened, response.tree_size
                    break
                await asyncio.sleep(0.05)
            assert cosigned is not None, "no checkpoint came back cosigned"
            assert cosigned.checkpoint.size == size
            # The witness serves what it cosigned, for melbourne's origin.
            status, body, _ = await witness_node.get(
                f"/v1/witness/cosignatures?origin={log_verifier.name}"
            )
            assert status == 200 and json.loads(body)["notes"]


async def test_witness_and_log_use_the_keys_the_roster_names(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio
    import sqlite3

    from hansa.crypto.keyfile import read_key_file, write_key_file
    from hansa.crypto.note import CosignatureSigner, NoteSigner, open_checkpoint
    from hansa.node.app import COSIGNED_FILE, WITNESSED_LOGS_FILE
    from hansa.node.config import load_config

    austin = init_test_node(tmp_path / "w", AUDITOR_CITY, dataset=None)
    witness_key = SigningKey(b"w" * 32)
    write_key_file(austin.data_dir / "witness.key", witness_key)
    toml = austin.data_dir / "node.toml"
    toml.write_text(toml.read_text().replace('witness_key = ""', 'witness_key = "witness.key"'))
    melbourne = init_test_node(tmp_path / "a", CITY, rows=200)
    log_key = read_key_file(melbourne.data_dir / "log.key")
    origin = f"hansa/Hanse/{CITY}"
    # austin's operator pinned a wrong key for melbourne's log: the roster's key wins.
    wrong = NoteSigner(origin, SigningKey(b"z" * 32)).verifier.vkey
    (austin.data_dir / WITNESSED_LOGS_FILE).write_text(wrong + "\n")
    node_key = read_public_key(melbourne.key_file).raw
    keys = {"log_key": log_key.public_key.raw, "witness_key": witness_key.public_key.raw}
    # austin's own copy of the roster: only melbourne's log key matters to it (its own
    # endpoint is not known before it listens).
    data = _roster(node_key, witness_url="http://127.0.0.1:9", **keys)
    configure_alliance(austin.data_dir, data, roster_digest(decode_signed_roster(data)), now_ms())

    async with running_node(load_config(austin.data_dir)) as witness_node:
        assert "other than the one the roster names" in caplog.text
        data = _roster(node_key, witness_url=witness_node.url, **keys)
        configure_alliance(
            melbourne.data_dir, data, roster_digest(decode_signed_roster(data)), now_ms()
        )
        toml = melbourne.data_dir / "node.toml"
        toml.write_text(
            toml.read_text().replace("checkpoint_seconds = 10.0", "checkpoint_seconds = 0.1")
        )
        witness = CosignatureSigner(f"witness/{AUDITOR_CITY}", witness_key).verifier
        log_verifier = NoteVerifier(origin, log_key.public_key)
        async with running_node(load_config(melbourne.data_dir)) as node:
            cosigned = None
            for round_ in range(100):  # bounded: at most ~5 s
                if round_ % 10 == 0:
                    await _query(node, ANA)
                response = await _ok(node, AuditOp.CHECKPOINT)
                assert response.checkpoint is not None
                opened = open_checkpoint(response.checkpoint, log_verifier, witnesses=[witness])
                if opened.cosignatures:
                    cosigned = opened
                    break
                await asyncio.sleep(0.05)
            assert cosigned is not None, "no checkpoint came back cosigned"
    # melbourne checked the cosignature under the roster's witness key: nothing was
    # fetched from austin's GET /v1/log/keys and pinned on first use.
    conn = sqlite3.connect(melbourne.data_dir / COSIGNED_FILE)
    try:
        assert conn.execute("SELECT COUNT(*) FROM witness_keys").fetchone() == (0,)
    finally:
        conn.close()


async def test_a_node_warns_when_the_roster_names_another_log_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = init_test_node(tmp_path, CITY, rows=20)
    data = _roster(read_public_key(base.key_file).raw, log_key=SigningKey(b"q" * 32).public_key.raw)
    config = configure_alliance(
        base.data_dir, data, roster_digest(decode_signed_roster(data)), now_ms()
    )
    async with running_node(config):
        pass
    assert "names another log key" in caplog.text
    caplog.clear()
    other = init_test_node(tmp_path / "b", CITY, rows=20)
    data = _roster(read_public_key(other.key_file).raw)  # no log key named: no warning
    config = configure_alliance(
        other.data_dir, data, roster_digest(decode_signed_roster(data)), now_ms()
    )
    async with running_node(config):
        pass
    assert "names another log key" not in caplog.text


async def test_changed_disclosure_settings_are_logged_before_decisions_that_apply_them(
    config: NodeConfig,
) -> None:
    async with running_node(config) as node:
        audit = node.state.audit
        assert audit is not None
        request, reply = await _query(node, ANA)
        before = open_envelope(reply, {node.node_key.key_id: node.node_key}, QueryAnswer)
        # The operator edits the human-editable file and sends SIGHUP (reload).
        toml = config.data_dir / "datasets.toml"
        text = toml.read_text()
        assert "min_group_size = 5 " in text
        toml.write_text(text.replace("min_group_size = 5 ", "min_group_size = 7 ", 1))
        assert await node.state.reload()
        request, reply = await _query(node, ANA)
        after = open_envelope(reply, {node.node_key.key_id: node.node_key}, QueryAnswer)
        assert after.message.disclosure_version > before.message.disclosure_version
        at = audit.index_of(message_id(request))
        assert at is not None
        entries = [decode_entry(leaf) for leaf in audit.leaves(0, at)]
        changes = [
            e
            for e in entries
            if isinstance(e, SettingsChanged) and e.scope is SettingsScope.DISCLOSURE
        ]
        assert [c.settings_version for c in changes] == [
            before.message.disclosure_version,
            after.message.disclosure_version,
        ]
        # The capability document recorded for the change publishes k = 7.
        document = audit.envelope(changes[-1].digest)
        assert document is not None
        from hansa.protocol.envelope import decode_envelope
        from hansa.protocol.messages import Capabilities

        published = decode_as(decode_envelope(document).payload, Capabilities)
        assert [d.disclosure.min_group_size for d in published.datasets] == [7]


# --- repeats of an answered request (spec §8.3) ------------------------------------------


async def test_a_byte_identical_repeat_gets_the_released_answer_and_the_auditor_agrees(
    config: NodeConfig, tmp_path: Path
) -> None:
    async with running_node(config) as node:
        audit = node.state.audit
        assert audit is not None
        request, first = await _query(node, ANA)
        # The same envelope again (another target city forwarding it, a client retry).
        status, again = await node.post(request)
        assert status == 200
        assert again == first  # the very signed answer already released, not a new one
        # Different bytes with the same (requester, nonce) are still a replay.
        body = decode_as(decode_envelope(request).payload, QueryRequest)
        other = ANA.seal(msgspec.structs.replace(body, expires_at=body.expires_at - 1))
        status, refused = await node.post(other)
        assert status == 200
        node_keys = {node.node_key.key_id: node.node_key}
        assert open_envelope(refused, node_keys, QueryRefusal).message.code is ErrorCode.REPLAYED
        entries = [decode_entry(leaf) for leaf in audit.leaves(0, audit.size)]
        trusted = node.state.trust.roster
        assert trusted is not None
        roster = trusted.roster
    mid = message_id(request)
    sent = [e for e in entries if isinstance(e, AnswerSent) and e.request_id == mid]
    assert [s.answer_id for s in sent] == [message_id(first)] * 2
    received = [e for e in entries if isinstance(e, RequestReceived) and e.message_id == mid]
    assert len(received) == 2

    # The auditor accepts the repeat (the answer already released, logged again) and the
    # other replay (refused).
    store = tmp_path / "auditor"
    import_data_dir(store, config.data_dir)
    with AuditorStore.open(store, CITY) as s:
        contents = s.contents()
    report = verify_log(contents, [roster], workers=0)
    assert report.failures == [], report.failures
