"""Evidence bundles: built from a real fan-out against real nodes, then tampered with.

One module-scoped fan-out asks four answering nodes, one node that refuses
by policy and one stopped node (unreachable) on 127.0.0.1; its bundle is
then altered in every way the issue names, and each alteration must be
caught by :func:`verify_bundle` and by ``hansa verify``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nodeutil import PURPOSE, Analyst, count_by_room_type, init_test_node
from nodeutil import running_node as _running_node

from hansa.crypto import SigningKey, seal
from hansa.crypto.keyfile import read_key_file, read_public_key
from hansa.crypto.merkle import MerkleTree
from hansa.crypto.note import Checkpoint, NoteSigner, sign_checkpoint
from hansa.federation.evidence import (
    SIGNED_STATUSES,
    UNSIGNED_STATUSES,
    CityEvidence,
    ClaimedRow,
    EvidenceBundle,
    Receipt,
    ScalarValue,
    build_bundle,
    claim_of,
    read_bundle,
    verify_bundle,
)
from hansa.federation.fanout import CityStatus, FanOutResult, Target, fan_out
from hansa.federation.roster import (
    Analyst as RosterAnalyst,
)
from hansa.federation.roster import (
    Member,
    Role,
    RootKey,
    Roster,
    SignedRoster,
    decode_roster,
    encode_signed_roster,
    roster_digest,
    sign_roster,
    unsigned,
)
from hansa.node import _cli_verify
from hansa.node.auditlog import AnswerSent, RequestReceived, encode_entry
from hansa.node.catalog import Catalog
from hansa.node.cli import EXIT_ERROR, EXIT_VERIFY_FAILED, build_parser, main
from hansa.node.config import NodeConfig
from hansa.protocol.codec import decode_as, encode
from hansa.protocol.envelope import decode_envelope, message_id
from hansa.protocol.errors import ErrorCode, HansaError, ProtocolError
from hansa.protocol.messages import (
    AuditOp,
    AuditResponse,
    Count,
    PolicyTags,
    Query,
    QueryAnswer,
    QueryRefusal,
    QueryRequest,
    ResultScope,
)

ANSWERING = ("amsterdam", "berlin", "copenhagen", "dublin")
REFUSING = "edinburgh"
GONE = "frankfurt"
CITIES = (*ANSWERING, REFUSING, GONE)
ANALYST = "ana@amsterdam"


@dataclass(frozen=True)
class Alliance:
    """The fan-out's evidence and the roster behind it."""

    bundle: bytes
    result: FanOutResult
    signed_roster: SignedRoster
    analyst: Analyst
    root_keys: tuple[SigningKey, ...]
    node_signers: dict[str, SigningKey]


def make_roster(
    node_keys: dict[str, bytes],
    analyst_key: bytes,
    root_keys: Sequence[SigningKey],
    *,
    expires_ms: int | None = None,
    log_keys: dict[str, bytes] | None = None,
) -> SignedRoster:
    roster = Roster(
        alliance="hanse",
        version=1,
        expires_ms=time.time_ns() // 1_000_000 + 86_400_000 if expires_ms is None else expires_ms,
        threshold=2,
        root_keys=tuple(
            RootKey(city, key.public_key.raw) for city, key in zip(CITIES, root_keys, strict=True)
        ),
        members=tuple(
            Member(
                city=city,
                name=city.title(),
                public_key=node_keys[city],
                endpoint=f"http://127.0.0.1:{8470 + i}",
                roles=(Role.MEMBER,),
                log_key=(log_keys or {}).get(city),
            )
            for i, city in enumerate(CITIES)
        ),
        analysts=(RosterAnalyst(ANALYST, analyst_key, "amsterdam", (PURPOSE,)),),
        purposes=(PURPOSE, "planning"),
    )
    signed = unsigned(roster)
    for key in root_keys[:2]:
        signed = sign_roster(signed, key)
    return signed


def policy() -> PolicyTags:
    return PolicyTags(
        purpose=PURPOSE, legal_basis="test suite", scope=ResultScope.ALLIANCE, analyst=ANALYST
    )


async def _fan_out(configs: dict[str, NodeConfig], analyst: Analyst, version: int) -> FanOutResult:
    async with contextlib.AsyncExitStack() as stack:
        gone = configs[GONE]
        async with _running_node(gone) as stopped:
            gone_target = Target(GONE, stopped.url, read_public_key(gone.key_file))
        running = await asyncio.gather(
            *(stack.enter_async_context(_running_node(configs[c])) for c in CITIES[:-1])
        )
        targets = [
            Target(n.config.city, n.url, read_public_key(n.config.key_file)) for n in running
        ]
        return await fan_out(
            count_by_room_type(),
            policy(),
            [*targets, gone_target],
            signer=analyst.key,
            requester=analyst.principal,
            quorum=3,
            deadline_s=5.0,
            roster_version=version,
        )


@pytest.fixture(scope="module")
def alliance(tmp_path_factory: pytest.TempPathFactory) -> Alliance:
    root = tmp_path_factory.mktemp("evidence")
    analyst = Analyst.create(ANALYST, seed=b"\x31" * 32)
    configs = {
        city: init_test_node(root, city, analysts=[analyst], rows=120, seed=i + 1)
        for i, city in enumerate(CITIES)
    }
    with Catalog(configs[REFUSING].data_dir) as catalog:
        catalog.configure("listings", purposes=["planning"])
    node_keys = {c: read_public_key(cfg.key_file).raw for c, cfg in configs.items()}
    root_keys = tuple(SigningKey(bytes([0x40 + i]) * 32) for i in range(len(CITIES)))
    signed_roster = make_roster(node_keys, analyst.key.public_key.raw, root_keys)
    result = asyncio.run(_fan_out(configs, analyst, version=1))
    bundle = build_bundle(result, signed_roster)
    signers = {c: read_key_file(cfg.key_file) for c, cfg in configs.items()}
    return Alliance(bundle, result, signed_roster, analyst, root_keys, signers)


# --- helpers ----------------------------------------------------------------------------


def decoded(alliance: Alliance) -> EvidenceBundle:
    return read_bundle(alliance.bundle)


def with_cities(bundle: EvidenceBundle, cities: Sequence[CityEvidence]) -> bytes:
    return encode(msgspec.structs.replace(bundle, cities=tuple(cities)))


def entry(bundle: EvidenceBundle, city: str) -> CityEvidence:
    return next(e for e in bundle.cities if e.city == city)


def replaced(bundle: EvidenceBundle, city: str, **changes: object) -> bytes:
    cities = [msgspec.structs.replace(e, **changes) if e.city == city else e for e in bundle.cities]
    return with_cities(bundle, cities)


def failures_mention(data: bytes, word: str, **kwargs: object) -> bool:
    verdict = verify_bundle(data, **kwargs)  # type: ignore[arg-type]
    assert not verdict.ok
    return any(word in f for f in verdict.failures)


def run_cli(argv: list[str]) -> int:
    """Run ``hansa verify`` as ``hansa.node.cli.main`` would (registered or not yet)."""
    parser = argparse.ArgumentParser(prog="hansa")
    sub = parser.add_subparsers(dest="command")
    _cli_verify.register(sub)
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
    except HansaError as exc:
        print(f"hansa: error: {exc.message} [{exc.code.name}]", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        print(f"hansa: error: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR
    return code


# --- the honest bundle ------------------------------------------------------------------


def test_the_fan_out_has_every_kind_of_outcome(alliance: Alliance) -> None:
    statuses = {c.city: c.status for c in alliance.result.cities}
    assert statuses == {
        **dict.fromkeys(ANSWERING, CityStatus.ANSWERED),
        REFUSING: CityStatus.REFUSED,
        GONE: CityStatus.UNREACHABLE,
    }
    assert alliance.result.combined is not None


def test_status_vocabulary_matches_the_fan_out() -> None:
    assert SIGNED_STATUSES | UNSIGNED_STATUSES == {s.value for s in CityStatus}


def test_bundle_round_trips_and_holds_the_exact_envelopes(alliance: Alliance) -> None:
    bundle = decoded(alliance)
    assert msgspec.msgpack.decode(alliance.bundle)[0] == "evidence-bundle"
    assert bundle.roster == alliance.signed_roster
    assert bundle.roster_digest == roster_digest(alliance.signed_roster)
    assert [e.city for e in bundle.cities] == list(CITIES)
    assert {city.request for city in alliance.result.cities} == {bundle.request}
    for city, evidence in zip(alliance.result.cities, bundle.cities, strict=True):
        assert evidence.reply == city.reply
        assert evidence.status == city.status.value
    assert alliance.result.combined is not None
    assert bundle.combined == claim_of(alliance.result.combined)
    assert encode(bundle) == alliance.bundle


def test_valid_bundle_verifies(alliance: Alliance) -> None:
    verdict = verify_bundle(alliance.bundle)
    assert verdict.ok, verdict.failures
    assert verdict.answered == len(ANSWERING)
    # The one request is checked once, at bundle level.
    assert [c.name for c in verdict.request] == [
        "request signature",
        "purpose",
        "request body",
        "roster version",
        "roster valid at issue",
    ]
    assert all(c.ok for c in verdict.request)
    assert verdict.roster_version == 1 and verdict.alliance == "hanse"
    lines = {line.city: line for line in verdict.cities}
    assert lines[REFUSING].signed and lines[REFUSING].status == "refused"
    assert not lines[GONE].signed and lines[GONE].ok
    assert any("unsigned" in note for note in verdict.notes)
    assert any("substituted roster" in note for note in verdict.notes)


def test_valid_bundle_verifies_against_trusted_roster_and_pin(alliance: Alliance) -> None:
    verdict = verify_bundle(
        alliance.bundle,
        trusted_roster=alliance.signed_roster,
        pin=roster_digest(alliance.signed_roster),
    )
    assert verdict.ok, verdict.failures
    assert not any("substituted roster" in note for note in verdict.notes)


def test_roster_expiry_is_judged_at_the_time_of_the_requests(alliance: Alliance) -> None:
    far_future = 2**52
    verdict = verify_bundle(alliance.bundle, now_ms=far_future)
    assert verdict.ok, verdict.failures
    assert any("expired since" in note for note in verdict.notes)


def test_roster_expired_when_the_requests_were_issued_is_rejected(alliance: Alliance) -> None:
    bundle = decoded(alliance)
    node_keys = {m.city: m.public_key for m in decode_roster(bundle.roster.body).members}
    stale = make_roster(
        node_keys,
        alliance.analyst.key.public_key.raw,
        alliance.root_keys,
        expires_ms=bundle.issued_at - 1,
    )
    data = encode(msgspec.structs.replace(bundle, roster=stale, roster_digest=roster_digest(stale)))
    assert failures_mention(data, "judged at the requests' issued_at")
    # The same roster, unexpired, with the same keys: the bundle verifies.
    fresh = make_roster(
        node_keys,
        alliance.analyst.key.public_key.raw,
        alliance.root_keys,
        expires_ms=bundle.issued_at + 1,
    )
    data = encode(msgspec.structs.replace(bundle, roster=fresh, roster_digest=roster_digest(fresh)))
    assert verify_bundle(data).ok


# --- tampering --------------------------------------------------------------------------


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_flipped_byte_in_an_answer_is_rejected(alliance: Alliance, data: st.DataObject) -> None:
    bundle = decoded(alliance)
    city = data.draw(st.sampled_from(ANSWERING))
    reply = entry(bundle, city).reply
    assert reply is not None
    position = data.draw(st.integers(0, len(reply) - 1))
    bit = data.draw(st.integers(0, 7))
    flipped = bytearray(reply)
    flipped[position] ^= 1 << bit
    verdict = verify_bundle(replaced(bundle, city, reply=bytes(flipped)))
    assert not verdict.ok
    assert any(f.startswith(f"{city}: ") for f in verdict.failures)


def test_dropped_refusal_entry_is_rejected(alliance: Alliance) -> None:
    bundle = decoded(alliance)
    data = with_cities(bundle, [e for e in bundle.cities if e.city != REFUSING])
    assert failures_mention(data, f"target city {REFUSING!r} has no entry")


def test_refusal_with_its_signed_reply_removed_is_rejected(alliance: Alliance) -> None:
    bundle = decoded(alliance)
    data = replaced(bundle, REFUSING, reply=None)
    assert failures_mention(data, "without the signed reply")


def test_refusal_claimed_as_an_answer_or_a_timeout_is_rejected(alliance: Alliance) -> None:
    bundle = decoded(alliance)
    assert failures_mention(replaced(bundle, REFUSING, status="answered"), "signed a refusal")
    assert failures_mention(replaced(bundle, REFUSING, status="timeout"), "signed a refusal")
    assert failures_mention(
        replaced(bundle, REFUSING, code=int(ErrorCode.RATE_LIMITED)), "refusal code"
    )


def test_answer_hidden_as_a_timeout_is_rejected(alliance: Alliance) -> None:
    bundle = decoded(alliance)
    assert failures_mention(replaced(bundle, "berlin", status="timeout"), "signed an answer")


def test_dropped_city_is_rejected_even_with_a_consistent_combination(alliance: Alliance) -> None:
    bundle = decoded(alliance)
    kept = [e for e in bundle.cities if e.city != "dublin"]
    answers = [
        a for a in alliance.result.answers if a.responder != "dublin"
    ]  # the analyst recombines without dublin, so only coverage can tell
    from hansa.federation.combine import combine_answers

    recombined = claim_of(combine_answers(bundle.query, answers))
    data = encode(msgspec.structs.replace(bundle, cities=tuple(kept), combined=recombined))
    assert failures_mention(data, "target city 'dublin' has no entry")
    # Also dropping it from the bundle's target list contradicts every signed request.
    targets = tuple(c for c in bundle.targets if c != "dublin")
    data = encode(
        msgspec.structs.replace(bundle, cities=tuple(kept), combined=recombined, targets=targets)
    )
    assert failures_mention(data, "request body")


def test_swapped_roster_is_rejected(alliance: Alliance) -> None:
    bundle = decoded(alliance)
    # Same cities and analyst, other node keys, validly signed by other root keys.
    stray = {c: SigningKey(bytes([0x60 + i]) * 32).public_key.raw for i, c in enumerate(CITIES)}
    other_roots = tuple(SigningKey(bytes([0x70 + i]) * 32) for i in range(len(CITIES)))
    swapped = make_roster(stray, alliance.analyst.key.public_key.raw, other_roots)
    data = encode(
        msgspec.structs.replace(bundle, roster=swapped, roster_digest=roster_digest(swapped))
    )
    assert failures_mention(
        data, "neither the trusted roster", trusted_roster=alliance.signed_roster
    )
    assert failures_mention(
        data, "does not match the pin", pin=roster_digest(alliance.signed_roster)
    )
    # Even with no trust anchor, the replies are not signed by the swapped node keys.
    assert failures_mention(data, "reply signature")


def test_roster_digest_that_does_not_match_is_rejected(alliance: Alliance) -> None:
    bundle = decoded(alliance)
    data = encode(msgspec.structs.replace(bundle, roster_digest=b"\x00" * 32))
    assert failures_mention(data, "recorded digest")


def test_modified_combined_value_is_rejected(alliance: Alliance) -> None:
    bundle = decoded(alliance)
    assert bundle.combined is not None
    row = bundle.combined.rows[0]
    value = row.values[0]
    assert isinstance(value, ScalarValue) and isinstance(value.value, int)
    for forged in (value.value + 1, float(value.value)):
        new_row = msgspec.structs.replace(row, values=(ScalarValue(forged),))
        combined = msgspec.structs.replace(
            bundle.combined, rows=(new_row, *bundle.combined.rows[1:])
        )
        data = encode(msgspec.structs.replace(bundle, combined=combined))
        assert failures_mention(data, "aggregate #0")


def test_combination_recomputed_without_one_answer_is_rejected(alliance: Alliance) -> None:
    bundle = decoded(alliance)
    from hansa.federation.combine import combine_answers

    fewer = [a for a in alliance.result.answers if a.responder != "berlin"]
    data = encode(
        msgspec.structs.replace(bundle, combined=claim_of(combine_answers(bundle.query, fewer)))
    )
    assert failures_mention(data, "combined: ")


def test_claimed_extra_row_and_changed_contributors_are_rejected(alliance: Alliance) -> None:
    bundle = decoded(alliance)
    assert bundle.combined is not None
    extra = ClaimedRow(key=("Castle",), values=(ScalarValue(7),), contributors=("berlin",))
    combined = msgspec.structs.replace(bundle.combined, rows=(*bundle.combined.rows, extra))
    data = encode(msgspec.structs.replace(bundle, combined=combined))
    assert failures_mention(data, "not in the recomputation")
    row = bundle.combined.rows[0]
    fewer = msgspec.structs.replace(row, contributors=row.contributors[1:])
    combined = msgspec.structs.replace(bundle.combined, rows=(fewer, *bundle.combined.rows[1:]))
    data = encode(msgspec.structs.replace(bundle, combined=combined))
    assert failures_mention(data, "contributors differ")


def test_request_with_a_different_query_is_rejected(alliance: Alliance) -> None:
    bundle = decoded(alliance)
    original = decode_as(decode_envelope(bundle.request).payload, QueryRequest)
    other = msgspec.structs.replace(
        original, query=Query(dataset=original.query.dataset, aggregates=(Count(),))
    )
    forged = seal(other, alliance.analyst.key)  # the analyst's own valid signature
    verdict = verify_bundle(encode(msgspec.structs.replace(bundle, request=forged)))
    assert not verdict.ok
    assert any(f.startswith("request: request body") for f in verdict.failures)
    # No city answered the substituted request: every signed reply cites the real one.
    for city in ANSWERING:
        assert any(f.startswith(f"{city}: reply cites request") for f in verdict.failures)


def test_request_signed_by_a_key_the_roster_does_not_name_is_rejected(alliance: Alliance) -> None:
    bundle = decoded(alliance)
    original = decode_as(decode_envelope(bundle.request).payload, QueryRequest)
    forged = seal(original, SigningKey(b"\x55" * 32))
    data = encode(msgspec.structs.replace(bundle, request=forged))
    assert failures_mention(data, "request: request signature")


def test_answer_moved_to_another_city_is_rejected(alliance: Alliance) -> None:
    bundle = decoded(alliance)
    amsterdam = entry(bundle, "amsterdam").reply
    assert failures_mention(replaced(bundle, "berlin", reply=amsterdam), "berlin: reply")


def test_quorum_claim_is_checked(alliance: Alliance) -> None:
    bundle = decoded(alliance)
    data = encode(msgspec.structs.replace(bundle, quorum_met=False, combined=None))
    assert failures_mention(data, "quorum: claimed not met")


@given(st.binary(max_size=200))
def test_garbage_is_an_invalid_verdict_not_a_crash(data: bytes) -> None:
    verdict = verify_bundle(data)
    assert not verdict.ok and verdict.failures[0].startswith("bundle: unreadable")


def test_read_bundle_refuses_another_format_version(alliance: Alliance) -> None:
    bundle = decoded(alliance)
    for version in (1, 3):  # 1: one request per city, before spec §7.1's one request
        with pytest.raises(ProtocolError) as info:
            read_bundle(encode(msgspec.structs.replace(bundle, format_version=version)))
        assert info.value.code is ErrorCode.UNSUPPORTED_VERSION


def test_answers_are_real_query_answers(alliance: Alliance) -> None:
    # Guards the tamper tests: the answered replies really are signed answers.
    assert all(isinstance(a, QueryAnswer) for a in alliance.result.answers)
    assert len(alliance.result.answers) == len(ANSWERING)


# --- hansa verify -----------------------------------------------------------------------


@pytest.fixture
def files(alliance: Alliance, tmp_path: Path) -> dict[str, Path]:
    bundle = decoded(alliance)
    paths = {
        "valid": alliance.bundle,
        "dropped": with_cities(bundle, [e for e in bundle.cities if e.city != REFUSING]),
        "garbage": b"\x93not a bundle",
        "roster": encode_signed_roster(alliance.signed_roster),
    }
    out = {}
    for name, data in paths.items():
        out[name] = tmp_path / f"{name}.bin"
        out[name].write_bytes(data)
    return out


def test_cli_valid_bundle_exits_zero(
    files: dict[str, Path], alliance: Alliance, capsys: pytest.CaptureFixture[str]
) -> None:
    pin = hashlib.sha256(alliance.signed_roster.body).hexdigest()
    code = run_cli(["verify", str(files["valid"]), "--roster", str(files["roster"]), "--pin", pin])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "VALID" in out and "INVALID" not in out
    for city in CITIES:
        assert city in out
    assert "unsigned claim" in out


def test_cli_tampered_bundle_exits_verify_failed(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(["verify", str(files["dropped"])]) == EXIT_VERIFY_FAILED
    out = capsys.readouterr().out
    assert "INVALID" in out and REFUSING in out


def test_cli_unreadable_inputs_are_one_line_errors(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(["verify", str(files["garbage"])]) == EXIT_VERIFY_FAILED
    assert "unreadable" in capsys.readouterr().out
    assert run_cli(["verify", str(tmp_path / "missing.bin")]) == EXIT_ERROR
    assert run_cli(["verify", str(files["valid"]), "--pin", "zz"]) == EXIT_ERROR
    assert run_cli(["verify", str(files["valid"]), "--roster", str(files["garbage"])]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 3 and "Traceback" not in err


def test_cli_is_registered_in_hansa_main(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    choices = next(
        a.choices for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    )
    if "verify" not in choices:
        pytest.skip("hansa verify is not registered in node/cli.py yet")
    assert main(["verify", str(files["valid"])]) == 0
    assert main(["verify", str(files["dropped"])]) == EXIT_VERIFY_FAILED
    capsys.readouterr()


# --- receipts (issue 5, part 4) ----------------------------------------------------------


def log_signer(city: str) -> NoteSigner:
    return NoteSigner(f"hansa/hanse/{city}", SigningKey(hashlib.sha256(city.encode()).digest()))


def make_receipt(
    alliance: Alliance,
    city: str,
    *,
    logged_id: bytes | None = None,
    signer: NoteSigner | None = None,
    recorded: NoteSigner | None = None,
    node_key: SigningKey | None = None,
    index_shift: int = 0,
    status: str = "fetched",
) -> Receipt:
    """A receipt as a node following spec §16 signs it: the request's leaf in a real tree."""
    request = decoded(alliance).request
    kid = decode_envelope(request).key_id
    mid = message_id(request) if logged_id is None else logged_id
    filler = [encode_entry(AnswerSent(5, bytes([i]) * 32, bytes(32))) for i in range(5)]
    leaf = encode_entry(RequestReceived(1_790_000_000_000, mid, kid))
    tree = MerkleTree()
    for item in [*filler[:3], leaf, *filler[3:]]:
        tree.append(item)
    log = log_signer(city)
    note = sign_checkpoint(Checkpoint(log.name, tree.size, tree.root()), signer or log)
    response = AuditResponse(
        request_id=bytes(32),
        responder=city,
        issued_at=1_790_000_000_001,
        op=AuditOp.RECEIPT,
        checkpoint=note,
        entries=(leaf,),
        index=3 + index_shift,
        proof=tuple(tree.inclusion_proof(3)),
        tree_size=tree.size,
    )
    body = seal(response, node_key or alliance.node_signers[city])
    served = recorded or log  # the key the node served at GET /v1/log/keys
    return Receipt(status, 1, body, served.name, served.vkey)


def with_receipts(alliance: Alliance, **receipts: Receipt) -> bytes:
    bundle = decoded(alliance)
    cities = [
        msgspec.structs.replace(e, receipt=receipts[e.city]) if e.city in receipts else e
        for e in bundle.cities
    ]
    return with_cities(bundle, cities)


def signed_cities(alliance: Alliance) -> list[str]:
    return [c.city for c in alliance.result.cities if c.status.value in SIGNED_STATUSES]


def test_valid_receipts_verify_and_the_log_key_is_flagged_tofu(alliance: Alliance) -> None:
    cities = signed_cities(alliance)
    assert REFUSING in cities and len(cities) == 5
    data = with_receipts(alliance, **{c: make_receipt(alliance, c) for c in cities})
    verdict = verify_bundle(data)
    assert verdict.ok, verdict.failures
    assert verdict.receipts == 5
    assert any("TOFU" in n for n in verdict.notes)


def test_bundles_without_receipts_still_decode_and_verify(alliance: Alliance) -> None:
    # A writer that never asked for receipts may leave out the trailing element.
    raw = msgspec.msgpack.decode(alliance.bundle)
    cities_at = 12  # after the tag and 11 fields (request at 9)
    for city in raw[cities_at]:
        assert city[-1] is None
        del city[-1]
    old = msgspec.msgpack.encode(raw)
    assert all(e.receipt is None for e in read_bundle(old).cities)
    verdict = verify_bundle(old)
    assert verdict.ok and verdict.receipts == 0


def test_failed_and_refused_receipts_are_notes_not_failures(alliance: Alliance) -> None:
    node = alliance.node_signers["amsterdam"]
    refusal = seal(
        QueryRefusal(
            request_id=bytes(32),
            responder="amsterdam",
            requester=ANALYST,
            issued_at=1,
            code=ErrorCode.INVALID_FIELD,
            reason="no request of yours with this message id is logged",
        ),
        node,
    )
    data = with_receipts(
        alliance,
        amsterdam=Receipt("refused", 1, refusal, None, None, "INVALID_FIELD: no request"),
        berlin=Receipt("failed", 3, None, None, None, "no reply within 5 s"),
    )
    verdict = verify_bundle(data)
    assert verdict.ok, verdict.failures
    assert any("no verified receipt from" in n and "berlin" in n for n in verdict.notes)
    # The same refusal claimed as a fetched receipt is a failure.
    claimed = Receipt("fetched", 1, refusal, None, None)
    assert failures_mention(with_receipts(alliance, amsterdam=claimed), "receipt")


@pytest.mark.parametrize(
    ("change", "word"),
    [
        ("other message", "receipt leaf"),
        ("wrong log key", "receipt checkpoint"),
        ("wrong node key", "receipt signature"),
        ("shifted index", "receipt inclusion"),
        ("unknown status", "receipt"),
        ("no response", "receipt"),
    ],
)
def test_bad_receipts_are_rejected(alliance: Alliance, change: str, word: str) -> None:
    city = "berlin"
    receipt = {
        "other message": lambda: make_receipt(alliance, city, logged_id=bytes(32)),
        "wrong log key": lambda: make_receipt(alliance, city, signer=log_signer("amsterdam")),
        "wrong node key": lambda: make_receipt(
            alliance, city, node_key=alliance.node_signers["amsterdam"]
        ),
        "shifted index": lambda: make_receipt(alliance, city, index_shift=1),
        "unknown status": lambda: make_receipt(alliance, city, status="lost"),
        "no response": lambda: Receipt("fetched", 1, None, None, None),
    }[change]()
    assert failures_mention(with_receipts(alliance, berlin=receipt), word)


def test_receipt_of_another_citys_request_is_rejected(alliance: Alliance) -> None:
    # A genuine receipt for Amsterdam's request, pasted into Berlin's entry.
    foreign = make_receipt(alliance, "amsterdam")
    assert failures_mention(with_receipts(alliance, berlin=foreign), "receipt")


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_flipped_byte_in_a_receipt_is_rejected(alliance: Alliance, data: st.DataObject) -> None:
    receipt = make_receipt(alliance, "copenhagen")
    assert receipt.response is not None
    body = bytearray(receipt.response)
    position = data.draw(st.integers(0, len(body) - 1))
    body[position] ^= data.draw(st.integers(1, 255))
    tampered = msgspec.structs.replace(receipt, response=bytes(body))
    verdict = verify_bundle(with_receipts(alliance, copenhagen=tampered))
    assert not verdict.ok and verdict.receipts == 0


def test_cli_checks_receipts(
    alliance: Alliance, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = with_receipts(alliance, berlin=make_receipt(alliance, "berlin"))
    bad = with_receipts(alliance, berlin=make_receipt(alliance, "berlin", index_shift=1))
    (tmp_path / "good.bin").write_bytes(good)
    (tmp_path / "bad.bin").write_bytes(bad)
    assert run_cli(["verify", str(tmp_path / "good.bin")]) == 0
    assert "1 receipt(s) verified" in capsys.readouterr().out
    assert run_cli(["verify", str(tmp_path / "bad.bin")]) == EXIT_VERIFY_FAILED
    out = capsys.readouterr().out
    assert "INVALID" in out and "receipt inclusion" in out


# --- log keys the roster pins (spec §16.1) ------------------------------------------------


def impostor(city: str) -> NoteSigner:
    """A log key under the city's origin that is not the city's."""
    return NoteSigner(
        f"hansa/hanse/{city}", SigningKey(hashlib.sha256(b"x" + city.encode()).digest())
    )


def with_log_keys(alliance: Alliance, data: bytes, cities: Sequence[str]) -> bytes:
    """``data`` with its roster replaced by one naming the log keys of ``cities``."""
    bundle = read_bundle(data)
    roster = decode_roster(bundle.roster.body)
    node_keys = {m.city: m.public_key for m in roster.members}
    keys = {c: log_signer(c).verifier.public_key.raw for c in cities}
    signed = make_roster(
        node_keys,
        alliance.analyst.key.public_key.raw,
        alliance.root_keys,
        expires_ms=roster.expires_ms,
        log_keys=keys,
    )
    return encode(
        msgspec.structs.replace(bundle, roster=signed, roster_digest=roster_digest(signed))
    )


def test_receipts_verify_under_the_roster_log_keys_and_tofu_is_noted_only_without(
    alliance: Alliance,
) -> None:
    cities = signed_cities(alliance)
    receipts = with_receipts(alliance, **{c: make_receipt(alliance, c) for c in cities})
    verdict = verify_bundle(with_log_keys(alliance, receipts, cities))
    assert verdict.ok, verdict.failures
    assert verdict.receipts == 5
    assert not any("TOFU" in n for n in verdict.notes)
    assert any("5 under the log key the roster names" in n for n in verdict.notes)
    # Only berlin's key named: the TOFU note names the other four, not berlin.
    verdict = verify_bundle(with_log_keys(alliance, receipts, ["berlin"]))
    assert verdict.ok, verdict.failures
    (tofu,) = [n for n in verdict.notes if "TOFU" in n]
    assert "amsterdam" in tofu and "berlin" not in tofu


def test_a_receipt_under_another_log_key_than_the_roster_s_fails(alliance: Alliance) -> None:
    # The node served, and signed the checkpoint with, a key of its choosing.
    substituted = make_receipt(
        alliance, "berlin", signer=impostor("berlin"), recorded=impostor("berlin")
    )
    data = with_receipts(alliance, berlin=substituted)
    assert verify_bundle(data).ok  # trusted on first use, it passes: the gap closed here
    assert failures_mention(with_log_keys(alliance, data, ["berlin"]), "receipt log key")
    # The roster's key recorded, but the checkpoint signed by another one.
    forged = make_receipt(alliance, "berlin", signer=impostor("berlin"))
    data = with_log_keys(alliance, with_receipts(alliance, berlin=forged), ["berlin"])
    assert failures_mention(data, "receipt checkpoint")
    # A receipt the client gave up on because the served key was not the roster's.
    gave_up = Receipt("failed", 1, None, impostor("berlin").name, impostor("berlin").vkey, "x")
    data = with_log_keys(alliance, with_receipts(alliance, berlin=gave_up), ["berlin"])
    assert failures_mention(data, "receipt log key")
    # Without a recorded key, the roster's key alone decides.
    bare = msgspec.structs.replace(make_receipt(alliance, "berlin"), origin=None, log_vkey=None)
    assert verify_bundle(
        with_log_keys(alliance, with_receipts(alliance, berlin=bare), ["berlin"])
    ).ok


def test_cli_verify_fails_a_receipt_under_another_log_key(
    alliance: Alliance, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    substituted = make_receipt(
        alliance, "berlin", signer=impostor("berlin"), recorded=impostor("berlin")
    )
    path = tmp_path / "bundle.bin"
    path.write_bytes(
        with_log_keys(alliance, with_receipts(alliance, berlin=substituted), ["berlin"])
    )
    assert run_cli(["verify", str(path)]) == EXIT_VERIFY_FAILED
    out = capsys.readouterr().out
    assert "INVALID" in out and "receipt log key" in out
