"""Audit log benchmarks: durable append throughput vs non-durable append.

Every figure is printed with its ratio to a baseline measured in the same run, because
the machines are shared and noisy (ratios hold, absolute rates do not):

* durable append (SQLite WAL, ``synchronous=FULL``: one fsync per group commit) from
  several threads vs the same code with ``synchronous=OFF`` (no fsync). The two modes run
  in alternating slices and the median rate of each is reported. The durable
  single-thread rate is shown too: the gap between it and the threaded rate is what
  group commit buys.

Run: ``.venv/bin/python bench/audit.py [--threads N] [--seconds S] [--repeats R]``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from hansa.node.auditlog import AuditLog, RequestReceived
from hansa.protocol.envelope import message_id

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


def main() -> None:
    """Run the benchmark and print rates with same-run ratios."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="directory for the databases")
    args = parser.parse_args()
    print(f"hansa bench/audit.py — pid {os.getpid()}, {os.cpu_count()} cpus\n")
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
