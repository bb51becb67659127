"""Crash test: a ``hansa node serve`` process SIGKILLed under load keeps its audit log.

Issue 5 / spec §16.2: an answer leaves the node only after its request, decision and
reply entries are durable. A real node process answers a steady stream of queries
from several client threads and is killed with SIGKILL at random moments, at least
20 times, then restarted on the same data directory. After each kill every request
whose answer a client received, and that answer, must be in the log, and the tree
must verify against every checkpoint the node stored (signatures included).
"""

from __future__ import annotations

import random
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from nodeutil import (
    Analyst,
    NodeProcess,
    count_by_room_type,
    init_test_node,
    node_process,
)

from hansa.crypto.keyfile import read_key_file
from hansa.crypto.merkle import verify_consistency
from hansa.crypto.note import NoteVerifier, verify_checkpoint
from hansa.node.app import ENVELOPE_MEDIA_TYPE
from hansa.node.auditlog import AnswerSent, AuditLog, Outcome
from hansa.node.auditlog import Decision as LoggedDecision
from hansa.node.config import AUDIT_FILE, NodeConfig
from hansa.protocol.envelope import message_id

CITY = "melbourne"
KILLS = 20
CLIENTS = 4
BUDGET_S = 55.0
"""The whole test stays under a minute even on a slow machine (it stops early)."""

ANA = Analyst.create("ana@melbourne", seed=b"c" * 32)


def _load(url: str, stop: threading.Event, acknowledged: list[tuple[bytes, bytes]]) -> None:
    """Send queries until the node dies or ``stop`` is set; keep every answered pair."""
    while not stop.is_set():
        envelope = ANA.seal(ANA.request(CITY, count_by_room_type()))
        request = urllib.request.Request(
            url + "/v1/query",
            data=envelope,
            headers={"Content-Type": ENVELOPE_MEDIA_TYPE},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                body = resp.read()
                status = resp.status
        except (urllib.error.URLError, OSError):
            return  # the node is gone
        if status == 200:
            acknowledged.append((message_id(envelope), message_id(body)))


def _check_log(
    config: NodeConfig, verifier: NoteVerifier, answered: list[tuple[bytes, bytes]]
) -> int:
    """Open the killed node's log and check it; return its size."""
    with AuditLog.open(config.data_dir / AUDIT_FILE, verifier.name, verifier=verifier) as audit:
        assert audit.repaired == 0 or audit.size > 0
        for request_id, answer_id in answered:
            at = audit.index_of(request_id)
            assert at is not None, "an answered request is missing from the log"
            sent_at = audit.index_of(answer_id)
            assert sent_at is not None and sent_at > at, "its answer is missing"
            sent = audit.entry(sent_at)
            assert isinstance(sent, AnswerSent) and sent.request_id == request_id
            # The decision and the reply are one append: adjacent, decision first.
            decision = audit.entry(sent_at - 1)
            assert isinstance(decision, LoggedDecision) and decision.message_id == request_id
            assert decision.outcome is not Outcome.REFUSED
        checkpoints = audit.checkpoints()
        previous = None
        for cp in checkpoints:
            signed = verify_checkpoint(cp.note, verifier)
            assert (signed.size, signed.root_hash) == (cp.size, cp.root_hash)
            assert audit.root(cp.size) == cp.root_hash
            if previous is not None and previous.size > 0:
                proof = audit.consistency_proof(previous.size, cp.size)
                assert verify_consistency(
                    previous.size, cp.size, previous.root_hash, cp.root_hash, proof
                )
            previous = cp
        return audit.size


def test_sigkill_under_load_loses_no_acknowledged_entry(tmp_path: Path) -> None:
    config = init_test_node(tmp_path, CITY, analysts=[ANA], rows=200)
    text = (config.data_dir / "node.toml").read_text()
    # Frequent checkpoints, so kills land around checkpoint writes too.
    text = text.replace("checkpoint_entries = 1000", "checkpoint_entries = 7")
    text = text.replace("checkpoint_seconds = 10.0", "checkpoint_seconds = 0.2")
    (config.data_dir / "node.toml").write_text(text)
    log_key = read_key_file(config.data_dir / "log.key")
    verifier = NoteVerifier(f"hansa/local/{CITY}", log_key.public_key)
    rng = random.Random(5)
    deadline = time.monotonic() + BUDGET_S
    answered: list[tuple[bytes, bytes]] = []
    kills = 0
    sizes: list[int] = []
    while kills < KILLS and time.monotonic() < deadline:
        with node_process(config.data_dir) as node:
            stop = threading.Event()
            acknowledged: list[tuple[bytes, bytes]] = []
            threads = [
                threading.Thread(target=_load, args=(node.url, stop, acknowledged), daemon=True)
                for _ in range(CLIENTS)
            ]
            for thread in threads:
                thread.start()
            time.sleep(rng.uniform(0.05, 0.4))
            _kill(node)
            stop.set()
            for thread in threads:
                thread.join(timeout=10)
        kills += 1
        answered += acknowledged
        # Every answer any client ever received, across all restarts so far.
        sizes.append(_check_log(config, verifier, answered))
    assert kills >= KILLS, f"only {kills} kills fitted in {BUDGET_S} s"
    assert len(answered) > KILLS, "the load did not get answers between kills"
    assert sizes == sorted(sizes)


def _kill(node: NodeProcess) -> None:
    node.proc.send_signal(signal.SIGKILL)
    node.proc.wait(timeout=10)
