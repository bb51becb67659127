"""Audit log benchmarks: durable vs non-durable append; auditor verify vs raw libsodium.

Every figure is printed with its ratio to a baseline measured in the same run, because
the machines are shared and noisy (ratios hold, absolute rates do not):

* durable append (SQLite WAL, ``synchronous=FULL``: one fsync per group commit) from
  several threads vs the same code with ``synchronous=OFF`` (no fsync). The two modes run
  in alternating slices and the median rate of each is reported. The durable
  single-thread rate is shown too: the gap between it and the threaded rate is what
  group commit buys.

* ``hansa audit verify`` (:func:`hansa.federation.audit.verify_log`, default workers) over a
  log of ``--entries`` (100,000) ``request_received`` entries with real signed request
  envelopes (signed by a few analyst keys), vs the raw baseline: libsodium
  ``crypto_sign_open`` over the same signatures and PAE bytes on all usable cores (a
  ProcessPoolExecutor with one process per core over tasks of 1,024 signatures), nothing
  else. The two run alternately ``--repeats`` times; each run's ratio is printed, then
  the median rates and two ratios: the median of the runs' ratios (goal: >= 0.8x), and
  the ratio of CPU time (this process plus its reaped workers), which the neighbours'
  load barely moves and which is the ratio the two reach on idle cores (a run's
  wall-clock ratio swings when a neighbour's load lands on one side only). Store loading
  (SQLite reads) is timed separately. Measured on 2 shared cores, three runs of
  ``--repeats 5``: raw ~48,000 sig/s when the cores are idle (2.07 s), verify_log
  ~41,200 entries/s (2.42 s); median ratios 0.86x, 0.86x, 0.87x; CPU ratio 0.87x in all.

Run: ``.venv/bin/python bench/audit.py [--threads N] [--seconds S] [--repeats R]
[--entries N] [--only append|verify]``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from hansa.crypto.envelope import seal
from hansa.crypto.keys import SigningKey, verify_signed
from hansa.crypto.note import NoteSigner
from hansa.federation import audit
from hansa.federation.audit import AuditorStore, usable_cpus, verify_log
from hansa.federation.roster import Analyst, Member, Role, RootKey, Roster
from hansa.node.auditlog import AuditLog, RequestReceived
from hansa.protocol.envelope import decode_envelope, message_id, pae
from hansa.protocol.messages import Count, PolicyTags, Query, QueryRequest, ResultScope

ORIGIN = "bench.example/audit"


def append_rate(db: Path, *, durable: bool, threads: int, seconds: float) -> tuple[float, float]:
    """Append from ``threads`` threads for ``seconds`` and return entries per second.

    Each append stores a ~300-byte envelope beside its request leaf, as the node will.

    Args:
        db: a fresh database path.
        durable: fsync every commit (True) or not.
        threads: concurrent appending threads.
        seconds: how long to run.

    Returns:
        Acknowledged appends per second, and the mean entries per commit.
    """
    counts = [0] * threads
    stop = threading.Event()
    key = hashlib.sha256(b"requester").digest()
    with AuditLog.open(db, ORIGIN, durable=durable) as log:
        start = threading.Barrier(threads + 1)

        def worker(t: int) -> None:
            start.wait()
            i = 0
            while not stop.is_set():
                envelope = b"%d-%d-" % (t, i) + bytes(300)
                log.append(RequestReceived(i, message_id(envelope), key), [envelope])
                i += 1
            counts[t] = i

        pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
        for th in pool:
            th.start()
        start.wait()
        began = time.perf_counter()
        time.sleep(seconds)
        stop.set()
        for th in pool:
            th.join()
        elapsed = time.perf_counter() - began
        assert log.size == sum(counts)
        batch = log.size / max(log.commits, 1)
    return sum(counts) / elapsed, batch


VERIFY_CITY = "amsterdam"
VERIFY_ORIGIN = "hansa/bench/amsterdam"
NOW_MS = 1_800_000_000_000


def verify_fixture(tmp: Path, entries: int, analysts: int = 4) -> tuple[Roster, Path]:
    """Build a node log of ``entries`` signed requests and import it into an auditor store.

    Args:
        tmp: a scratch directory.
        entries: how many ``request_received`` entries.
        analysts: how many analyst keys sign them.

    Returns:
        The roster naming the analysts, and the auditor store directory.
    """
    keys = [SigningKey(bytes([0x50 + i]) * 32) for i in range(analysts)]
    node = SigningKey(b"\x42" * 32)
    roster = Roster(
        alliance="bench",
        version=1,
        expires_ms=NOW_MS + 86_400_000,
        threshold=1,
        root_keys=(RootKey(VERIFY_CITY, node.public_key.raw),),
        members=(
            Member(VERIFY_CITY, "A", node.public_key.raw, "http://127.0.0.1:1", (Role.MEMBER,)),
        ),
        analysts=tuple(
            Analyst(f"a{i}@{VERIFY_CITY}", k.public_key.raw, VERIFY_CITY, ("bench",))
            for i, k in enumerate(keys)
        ),
        purposes=("bench",),
    )
    query = Query(dataset="listings", aggregates=(Count(),))
    signer = NoteSigner(VERIFY_ORIGIN, SigningKey(b"\x43" * 32))
    with AuditLog.open(tmp / "node.sqlite", VERIFY_ORIGIN, durable=False) as log:
        for start in range(0, entries, 1000):
            batch, envelopes = [], []
            for i in range(start, min(entries, start + 1000)):
                key = keys[i % analysts]
                principal = f"a{i % analysts}@{VERIFY_CITY}"
                request = QueryRequest(
                    requester=principal,
                    issued_at=NOW_MS + i,
                    expires_at=NOW_MS + i + 60_000,
                    nonce=i.to_bytes(16, "big"),
                    roster_version=1,
                    policy=PolicyTags("bench", "bench", ResultScope.ALLIANCE, principal),
                    query=query,
                    targets=(VERIFY_CITY,),
                    quorum=1,
                )
                envelope = seal(request, key)
                envelopes.append(envelope)
                batch.append(
                    RequestReceived(NOW_MS + i + 5, message_id(envelope), key.public_key.key_id)
                )
            log.append_many(batch, envelopes)
        note = log.checkpoint(signer)
        store_dir = tmp / "store"
        with AuditorStore.open(store_dir, VERIFY_CITY, VERIFY_ORIGIN) as store:
            store.pin(VERIFY_ORIGIN, signer.vkey, "log")
            store.add_leaves(0, log.leaves(0, entries))
            store.add_envelopes(envelopes_of(log, entries))
            store.add_checkpoint(note)
    return roster, store_dir


def envelopes_of(log: AuditLog, entries: int) -> list[bytes]:
    """Every request envelope the log stores, via its leaves."""
    out = []
    for leaf in log.leaves(0, entries):
        envelope = log.envelope(audit.parse_leaf(leaf).first)
        assert envelope is not None
        out.append(envelope)
    return out


def _raw_chunk(chunk: list[tuple[bytes, bytes]]) -> int:
    return sum(verify_signed(pk, signed) for pk, signed in chunk)


RAW_CHUNK = 1024
"""Signatures per task of the raw baseline: ~45 ms of work, so the pool's hand-over cost is
negligible and its workers finish within one small task of each other."""


def _cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (the pools' workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def raw_verify(tasks: list[tuple[bytes, bytes]], workers: int) -> tuple[float, float]:
    """Verify ``(public key, signature || PAE)`` pairs on ``workers`` processes.

    Returns:
        Wall seconds and CPU seconds (this process and the workers).
    """
    cpu, began = _cpu_seconds(), time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        chunks = [tasks[i : i + RAW_CHUNK] for i in range(0, len(tasks), RAW_CHUNK)]
        ok = sum(pool.map(_raw_chunk, chunks))
    elapsed = time.perf_counter() - began
    assert ok == len(tasks), "raw baseline: a signature failed"
    return elapsed, _cpu_seconds() - cpu


def ours_verify(contents: audit.LogContents, roster: Roster, entries: int) -> tuple[float, float]:
    """Run :func:`verify_log` with its defaults; wall seconds and CPU seconds, as above."""
    cpu, began = _cpu_seconds(), time.perf_counter()
    report = verify_log(contents, [roster])
    elapsed = time.perf_counter() - began
    assert report, [str(f) for f in report.failures[:5]]
    assert report.signatures == entries
    return elapsed, _cpu_seconds() - cpu


def bench_verify(tmp: Path, entries: int, repeats: int) -> None:
    """Time verify_log against the raw baseline, alternating, and print medians and ratio."""
    began = time.perf_counter()
    roster, store_dir = verify_fixture(tmp, entries)
    print(f"built a {entries:,}-entry log in {time.perf_counter() - began:.1f} s")
    began = time.perf_counter()
    with AuditorStore.open(store_dir, VERIFY_CITY) as store:
        contents = store.contents()
    load = time.perf_counter() - began
    keys = {kid: h.public_key.raw for kid, h in roster.holders.items()}
    raw_tasks = []
    for envelope in contents.envelopes.values():
        env = decode_envelope(envelope)
        raw_tasks.append((keys[env.key_id], env.signature + pae(env.payload_type, env.payload)))
    cpus = usable_cpus()
    runs: dict[str, list[tuple[float, float]]] = {"raw": [], "ours": []}
    print(f"audit verify, {entries:,} signed requests, {cpus} cpus; per run (raw, then ours):")
    for n in range(repeats):
        runs["raw"].append(raw_verify(raw_tasks, cpus))
        runs["ours"].append(ours_verify(contents, roster, entries))
        (t_raw, c_raw), (t_ours, c_ours) = runs["raw"][-1], runs["ours"][-1]
        print(
            f"  run {n + 1}: raw {t_raw:.2f} s, verify_log {t_ours:.2f} s:"
            f" ratio {t_raw / t_ours:.2f}x   (cpu {c_raw:.2f} s vs {c_ours:.2f} s:"
            f" {c_raw / c_ours:.2f}x)"
        )
    t_raw = statistics.median(t for t, _c in runs["raw"])
    t_ours = statistics.median(t for t, _c in runs["ours"])
    c_raw = statistics.median(c for _t, c in runs["raw"])
    c_ours = statistics.median(c for _t, c in runs["ours"])
    ratio = statistics.median(r[0] / o[0] for r, o in zip(runs["raw"], runs["ours"], strict=True))
    print(f"median of {repeats}:")
    print(
        f"  raw libsodium crypto_sign_open       {entries / t_raw:>10,.0f} sig/s      {t_raw:.2f} s"
        f"   ({cpus} worker processes)"
    )
    print(
        f"  hansa audit verify (verify_log)      {entries / t_ours:>10,.0f} entries/s  "
        f"{t_ours:.2f} s   (this process and {cpus - 1} worker{'s' * (cpus != 2)})"
    )
    print(
        f"  ratio verify_log / raw: median of the runs' ratios {ratio:.2f}x (goal >= 0.8x),"
        f" cpu time {c_raw / c_ours:.2f}x ({c_raw:.2f} s vs {c_ours:.2f} s)"
    )
    print(f"  store load (SQLite, not in either)   {load:.2f} s")


def main() -> None:
    """Run the benchmark and print rates with same-run ratios."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="directory for the databases")
    parser.add_argument("--entries", type=int, default=100_000, help="log size for verify")
    parser.add_argument("--only", choices=("append", "verify"), default=None)
    args = parser.parse_args()
    print(f"hansa bench/audit.py — pid {os.getpid()}, {usable_cpus()} usable cpus\n")
    if args.only != "append":
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            bench_verify(Path(tmp), args.entries, max(1, args.repeats))
        print()
    if args.only == "verify":
        return
    rates: dict[str, list[float]] = {"durable": [], "non-durable": [], "durable-1": []}
    batches: dict[str, list[float]] = {k: [] for k in rates}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        n = 0
        for _ in range(args.repeats):
            for name, durable, threads in (
                ("durable", True, args.threads),
                ("non-durable", False, args.threads),
                ("durable-1", True, 1),
            ):
                n += 1
                db = Path(tmp) / f"{n}.db"
                rate, batch = append_rate(
                    db, durable=durable, threads=threads, seconds=args.seconds
                )
                rates[name].append(rate)
                batches[name].append(batch)
    med = {k: statistics.median(v) for k, v in rates.items()}
    bat = {k: statistics.median(v) for k, v in batches.items()}
    print(f"append, {args.threads} threads, median of {args.repeats} x {args.seconds:.1f} s:")
    print(
        f"  non-durable (synchronous=OFF)        {med['non-durable']:>10,.0f} entries/s"
        f"   {bat['non-durable']:.1f} per commit"
    )
    print(
        f"  durable (WAL, synchronous=FULL)      {med['durable']:>10,.0f} entries/s"
        f"   ratio {med['durable'] / med['non-durable']:.2f}x of non-durable,"
        f" {bat['durable']:.1f} per commit"
    )
    print(
        f"  durable, 1 thread (no batching)      {med['durable-1']:>10,.0f} entries/s"
        f"   group commit gain {med['durable'] / med['durable-1']:.1f}x"
    )


if __name__ == "__main__":
    main()
