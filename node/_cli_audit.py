"""``hansa audit``: fetch, import, verify, compare and reconcile cities' audit logs.

::

    hansa audit fetch CITY --roster R --key AUDITOR.key [--store DIR]
    hansa audit import DATA_DIR [--store DIR] [--witness-vkey VKEY ...]
    hansa audit verify [--store DIR] --roster R [--roster R2 ...] [--city CITY ...]
    hansa audit compare --store DIR --other DIR2 [--roster R ...] [--city CITY ...]
    hansa audit reconcile --store DIR BUNDLE...

``fetch`` downloads a city's checkpoint, the new leaves and the envelopes they log,
incrementally, through signed ``POST /v1/audit`` requests (spec §16.3), into the
auditor store (:class:`hansa.federation.audit.AuditorStore`). The city's log key and
each roster witness city's witness key are the roster's when its entry names them
(spec §16.1): a node serving another log key at ``GET /v1/log/keys`` is refused. For a
city whose entry names none they are fetched from ``GET /v1/log/keys`` and pinned on
first use (TOFU), and ``verify`` says so. ``import`` builds the same store from a node's data
directory on this machine: it reads ``audit.sqlite`` read-only with plain SQLite (no
writer lock, no repair, nothing trusted: a damaged file is imported as it is, for
``verify`` to judge) and pins the log key from ``log.key``.

``verify`` runs :func:`hansa.federation.audit.verify_log` per city with progress bars
and prints counts and every failure; ``compare`` detects a forked history shown to two
auditors; ``reconcile`` checks analysts' evidence bundles against the logs.

Exit status: 0 when everything checks out; :data:`~hansa.node.cli.EXIT_VERIFY_FAILED`
when a check fails; 1 for unreadable files, bad options or network errors.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sqlite3
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.table import Table

from hansa.crypto.envelope import open_envelope, seal
from hansa.crypto.keyfile import read_key_file, read_public_key
from hansa.crypto.keys import PublicKey, SigningKey
from hansa.crypto.note import NoteVerifier
from hansa.federation.audit import (
    ANSWER_SENT,
    REQUEST_RECEIVED,
    SCOPE_DISCLOSURE,
    SETTINGS_CHANGED,
    AuditorStore,
    AuditReport,
    AuditStoreError,
    LogContents,
    compare_stores,
    parse_leaf,
    reconcile,
    verify_log,
)
from hansa.federation.evidence import MAX_BUNDLE_SIZE, read_bundle
from hansa.federation.roster import (
    MAX_ROSTER_SIGNATURES,
    MAX_ROSTER_SIZE,
    Role,
    Roster,
    decode_signed_roster,
    roster_digest,
    verify_roster,
)
from hansa.node._cli_io import read_limited
from hansa.node.cli import EXIT_VERIFY_FAILED
from hansa.node.config import AUDIT_FILE, load_config
from hansa.protocol.envelope import PayloadType, decode_envelope, message_id
from hansa.protocol.errors import (
    ConfigError,
    ErrorCode,
    HansaError,
    ProtocolError,
    SignatureError,
)
from hansa.protocol.messages import AuditOp, AuditRequest, AuditResponse, QueryRefusal

__all__ = [
    "fetch_city",
    "import_data_dir",
    "read_rosters",
    "read_signed_rosters",
    "register",
]

_MAX_ROSTER_FILE = MAX_ROSTER_SIZE + 65 * MAX_ROSTER_SIGNATURES + 1024
_PAGE = 1000
_DEFAULT_STORE = "audit-store"
_TIMEOUT_S = 30.0
_MAX_REPLY = 64 * 1024 * 1024
_ENVELOPE_MEDIA_TYPE = "application/vnd.hansa.envelope+msgpack"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``audit`` command group."""
    audit = sub.add_parser(
        "audit",
        help="fetch and verify cities' tamper-evident audit logs",
        description="Keep local copies of cities' audit logs and verify them without "
        "trusting any node.",
    )
    cmds = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")

    fetch = cmds.add_parser("fetch", help="download a city's log incrementally")
    fetch.add_argument("city", metavar="CITY")
    fetch.add_argument("--roster", required=True, metavar="FILE", help="the alliance roster")
    fetch.add_argument("--key", required=True, metavar="FILE", help="the auditor's key file")
    fetch.add_argument("--passphrase-env", metavar="VAR", help="passphrase of a sealed key")
    fetch.add_argument("--store", default=_DEFAULT_STORE, metavar="DIR")
    fetch.add_argument("--endpoint", metavar="URL", help="the node's URL instead of the roster's")
    fetch.set_defaults(handler=_fetch)

    imp = cmds.add_parser("import", help="build the store from a local node's data directory")
    imp.add_argument("data_dir", metavar="DATA_DIR")
    imp.add_argument("--store", default=_DEFAULT_STORE, metavar="DIR")
    imp.add_argument(
        "--witness-vkey", action="append", default=[], metavar="VKEY", help="pin a witness key"
    )
    imp.set_defaults(handler=_import)

    verify = cmds.add_parser("verify", help="verify the stored logs")
    verify.add_argument("--store", default=_DEFAULT_STORE, metavar="DIR")
    verify.add_argument("--roster", required=True, action="append", metavar="FILE")
    verify.add_argument("--city", action="append", default=[], metavar="CITY")
    verify.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="signature-checking processes besides this one, which checks too "
        "(default: one fewer than the usable CPUs; 0: all in this process)",
    )
    verify.add_argument("--skew-ms", type=int, default=30_000, metavar="MS")
    verify.set_defaults(handler=_verify)

    compare = cmds.add_parser("compare", help="compare two auditors' stores (forks)")
    compare.add_argument("--store", default=_DEFAULT_STORE, metavar="DIR")
    compare.add_argument("--other", required=True, metavar="DIR")
    compare.add_argument("--city", action="append", default=[], metavar="CITY")
    compare.add_argument(
        "--roster",
        action="append",
        default=[],
        metavar="FILE",
        help="roster versions naming the cities' log keys (repeatable; without one, both "
        "stores must have pinned the same log key)",
    )
    compare.set_defaults(handler=_compare)

    rec = cmds.add_parser("reconcile", help="check evidence bundles against the logs")
    rec.add_argument("--store", default=_DEFAULT_STORE, metavar="DIR")
    rec.add_argument("bundles", nargs="+", metavar="BUNDLE")
    rec.set_defaults(handler=_reconcile)


def _console() -> Console:
    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def read_rosters(paths: Sequence[str | Path]) -> list[Roster]:
    """Read roster files (see :func:`read_signed_rosters`); return the rosters."""
    return [roster for roster, _digest in read_signed_rosters(paths)]


def read_signed_rosters(paths: Sequence[str | Path]) -> list[tuple[Roster, bytes]]:
    """Read roster files, each checked against its own root-key threshold.

    Expiry is not judged here: :func:`verify_log` checks each request against the roster
    it cites, at the time it was logged.

    Args:
        paths: roster files.

    Returns:
        Each roster with the SHA-256 of its signed body.

    Raises:
        ProtocolError: a file is not a roster.
        SignatureError: a roster lacks its threshold of root signatures.
    """
    rosters = []
    for path in paths:
        signed = decode_signed_roster(read_limited(path, _MAX_ROSTER_FILE))
        rosters.append((verify_roster(signed, None, 0), roster_digest(signed)))
    return rosters


# --------------------------------------------------------------------------- import


def import_data_dir(
    store_dir: str | Path, data_dir: str | Path, *, witness_vkeys: Sequence[str] = ()
) -> tuple[str, int, int]:
    """Copy a local node's audit log into the auditor store (read-only, nothing trusted).

    Args:
        store_dir: the auditor store directory.
        data_dir: the node's data directory (``node.toml``, ``audit.sqlite``, ``log.key``).
        witness_vkeys: witness verifier keys to pin.

    Returns:
        ``(city, leaves held, conflicts found)``.

    Raises:
        AuditStoreError: the log cannot be read, or a pin conflicts.
        ConfigError: the node configuration cannot be read.
    """
    config = load_config(Path(data_dir))
    db = Path(data_dir) / AUDIT_FILE
    try:
        # mode=ro: never write, lock or repair the node's file; the auditor judges it.
        conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
        try:
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            leaves = conn.execute("SELECT idx, leaf FROM leaves ORDER BY idx").fetchall()
            envelopes = [bytes(e) for (e,) in conn.execute("SELECT envelope FROM envelopes")]
            notes = [bytes(n) for (n,) in conn.execute("SELECT note FROM checkpoints")]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise AuditStoreError(f"cannot read the audit log {db}: {exc}") from exc
    origin = str(meta.get("origin", ""))
    log_key = read_public_key(config.path(config.audit.log_key_file))
    with AuditorStore.open(store_dir, config.city, origin) as store:
        store.pin(origin, NoteVerifier(origin, log_key).vkey, "log")
        for vkey in witness_vkeys:
            store.pin(vkey.partition("+")[0], vkey, "witness")
        conflicts = 0
        # Offer every leaf as a run of contiguous indices; a gap starts a new run.
        run_start, run = 0, list[bytes]()
        for idx, leaf in leaves:
            if run and idx != run_start + len(run):
                conflicts += store.add_leaves(run_start, run)
                run = []
            if not run:
                run_start = int(idx)
            run.append(bytes(leaf))
        if run:
            conflicts += store.add_leaves(run_start, run)
        store.add_envelopes(envelopes)
        for note in notes:
            store.add_checkpoint(note)
        return config.city, store.size, conflicts


def _import(args: argparse.Namespace) -> int:
    city, size, conflicts = import_data_dir(
        args.store, args.data_dir, witness_vkeys=args.witness_vkey
    )
    note = f", [red]{conflicts} conflicting leaves[/red]" if conflicts else ""
    _console().print(f"imported {escape(city)}: {size} leaves held in {escape(args.store)}{note}")
    return 0


# --------------------------------------------------------------------------- fetch


def _http(url: str, body: bytes | None = None) -> bytes:
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"not an http(s) URL: {url[:64]!r}")
    headers = {"Content-Type": _ENVELOPE_MEDIA_TYPE} if body is not None else {}
    request = urllib.request.Request(url, data=body, headers=headers)  # noqa: S310 (checked)
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as reply:  # noqa: S310
            data: bytes = reply.read(_MAX_REPLY + 1)
    except urllib.error.HTTPError as exc:
        data = exc.read(_MAX_REPLY + 1)
        if body is None or not data:
            raise ConfigError(f"{url}: HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise ConfigError(f"cannot reach {url}: {exc}") from exc
    if len(data) > _MAX_REPLY:
        raise ProtocolError(f"{url}: reply too large", ErrorCode.TOO_LARGE)
    return data


def _log_keys(endpoint: str) -> dict[str, object]:
    data = _http(endpoint.rstrip("/") + "/v1/log/keys")
    try:
        keys = json.loads(data)
    except ValueError as exc:
        raise ProtocolError(f"{endpoint}/v1/log/keys is not JSON") from exc
    if not isinstance(keys, dict):
        raise ProtocolError(f"{endpoint}/v1/log/keys is not a JSON object")
    return keys


class _Client:
    """Signed audit requests to one city (spec §16.3)."""

    def __init__(self, roster: Roster, city: str, key: SigningKey, principal: str) -> None:
        member = roster.member(city)
        if member is None:
            raise ConfigError(f"{city!r} is not a member of roster v{roster.version}")
        self.endpoint = member.endpoint.rstrip("/")
        self.node_key = PublicKey(member.public_key)
        self.roster = roster
        self.city = city
        self.key = key
        self.principal = principal

    def ask(self, op: AuditOp, **fields: object) -> AuditResponse:
        now = time.time_ns() // 1_000_000
        request = AuditRequest(
            requester=self.principal,
            audience=self.city,
            issued_at=now,
            expires_at=now + 60_000,
            nonce=secrets.token_bytes(16),
            roster_version=self.roster.version,
            op=op,
            **fields,  # type: ignore[arg-type]
        )
        sealed = seal(request, self.key)
        data = _http(self.endpoint + "/v1/audit", sealed)
        keys = {self.node_key.key_id: self.node_key}
        env = decode_envelope(data)
        if env.payload_type == PayloadType.QUERY_REFUSAL:
            refusal = open_envelope(data, keys, QueryRefusal).message
            raise HansaError(f"{self.city} refused: {refusal.reason}", refusal.code)
        opened = open_envelope(data, keys, AuditResponse)
        reply = opened.message
        if reply.op is not op or reply.responder != self.city:
            raise ProtocolError(f"{self.city} answered another audit request")
        if reply.request_id != message_id(sealed):
            raise ProtocolError(f"{self.city}'s audit response cites another request")
        return reply


def fetch_city(
    store_dir: str | Path,
    city: str,
    roster: Roster,
    key: SigningKey,
    *,
    endpoint: str | None = None,
    progress: Progress | None = None,
) -> tuple[int, int]:
    """Fetch a city's new leaves, their envelopes and its latest checkpoint.

    Args:
        store_dir: the auditor store directory.
        city: the city to fetch.
        roster: the alliance roster (endpoints, node keys, witness cities, and the log
            and witness keys it pins).
        key: the auditor's key (must hold the auditor role in ``roster``).
        endpoint: the node's base URL, instead of the roster's (a proxy, a test).
        progress: a rich progress display to report on.

    Returns:
        ``(leaves held, conflicts found)``.

    Raises:
        ConfigError: the key is not an auditor's, the city is unknown or unreachable.
        SignatureError: ``ROSTER_MISMATCH`` when the node serves a log key other than
            the one the roster names for the city.
        HansaError: the node refused or answered something invalid.
    """
    holder = roster.holder(key.public_key.key_id)
    if holder is None or Role.AUDITOR not in holder.roles:
        raise ConfigError("the key does not hold the auditor role in the roster")
    client = _Client(roster, city, key, holder.principal)
    if endpoint is not None:
        client.endpoint = endpoint.rstrip("/")
    keys = _log_keys(client.endpoint)
    origin, log_vkey = keys.get("origin"), keys.get("log_vkey")
    if not isinstance(origin, str) or not isinstance(log_vkey, str):
        raise ProtocolError(f"{city}/v1/log/keys lacks origin or log_vkey")
    named = roster.log_verifier(city, origin)
    if named is not None and named.vkey != log_vkey:
        # The roster pins the key (spec §16.1): another one is never trusted on first use.
        raise SignatureError(
            f"{city} serves the log key {log_vkey[:80]!r} at /v1/log/keys, but roster "
            f"v{roster.version} names {named.vkey!r}: refusing to fetch",
            ErrorCode.ROSTER_MISMATCH,
        )
    with AuditorStore.open(store_dir, city, origin) as store:
        _pin(store, origin, log_vkey, "log", roster_named=named is not None)
        for member in roster.members:
            if Role.WITNESS in member.roles and member.city != city:
                witness = roster.witness_verifier(member.city)
                if witness is not None:
                    _pin(store, witness.name, witness.vkey, "witness", roster_named=True)
                    continue
                try:
                    wkey = _log_keys(member.endpoint).get("witness_vkey")
                except HansaError:
                    continue  # an unreachable witness: its cosignatures cannot count yet
                if isinstance(wkey, str):
                    store.pin(wkey.partition("+")[0], wkey, "witness")
        head = client.ask(AuditOp.CHECKPOINT)
        if head.checkpoint is not None:
            store.add_checkpoint(head.checkpoint)
        total = head.tree_size
        task = None if progress is None else progress.add_task(f"fetch {city}", total=total)
        start, conflicts = store.size, 0
        while start < total:
            page = client.ask(AuditOp.ENTRIES, start=start, end=min(total, start + _PAGE))
            if page.first_index != start or not page.entries:
                raise ProtocolError(f"{city} returned entries from {page.first_index}, not {start}")
            conflicts += store.add_leaves(start, page.entries)
            wanted = []
            for leaf in page.entries:
                try:
                    entry = parse_leaf(leaf)
                except ValueError:
                    continue  # verify reports it
                if entry.kind == REQUEST_RECEIVED:
                    wanted.append(entry.first)
                elif entry.kind == ANSWER_SENT:
                    wanted.append(entry.second)
                elif entry.kind == SETTINGS_CHANGED and entry.outcome == SCOPE_DISCLOSURE:
                    wanted.append(entry.first)  # the signed capability document
            missing = [h for h in wanted if store.envelope(h) is None]
            for i in range(0, len(missing), _PAGE):
                got = client.ask(AuditOp.ENVELOPES, hashes=tuple(missing[i : i + _PAGE]))
                store.add_envelopes(e for _h, e in got.envelopes)
            start += len(page.entries)
            if progress is not None and task is not None:
                progress.update(task, completed=start)
        return store.size, conflicts


def _pin(store: AuditorStore, name: str, vkey: str, role: str, *, roster_named: bool) -> None:
    """Pin ``vkey`` under ``name``; a roster-named key does not fail on an older pin.

    A key the roster names is what :func:`~hansa.federation.audit.verify_log` checks
    against whatever the store pinned: an earlier pin that differs (taken on first use
    before the roster named a key, or before a rotation the roster records) stays as
    it was, and the verification reports it.
    """
    if roster_named and store.pins(role).get(name) not in (None, vkey):
        return
    store.pin(name, vkey, role)


def _fetch(args: argparse.Namespace) -> int:
    (roster,) = read_rosters([args.roster])
    passphrase = None
    if args.passphrase_env:
        value = os.environ.get(args.passphrase_env)
        if not value:
            raise ConfigError(f"environment variable {args.passphrase_env} is not set or empty")
        passphrase = value.encode()
    key = read_key_file(args.key, passphrase=passphrase)
    with _progress() as progress:
        size, conflicts = fetch_city(
            args.store, args.city, roster, key, endpoint=args.endpoint, progress=progress
        )
    note = f", [red]{conflicts} conflicting leaves[/red]" if conflicts else ""
    _console().print(f"fetched {escape(args.city)}: {size} leaves held{note}")
    return 0


# --------------------------------------------------------------------------- verify


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=not sys.stderr.isatty(),
    )


def _cities(store: str, wanted: Sequence[str]) -> list[str]:
    cities = list(wanted) or AuditorStore.cities(store)
    if not cities:
        raise ConfigError(f"no city logs in {store}")
    return cities


def _verify(args: argparse.Namespace) -> int:
    signed = read_signed_rosters(args.roster)
    rosters = [roster for roster, _digest in signed]
    digests = {roster.version: digest for roster, digest in signed}
    console = _console()
    ok = True
    for city in _cities(args.store, args.city):
        with AuditorStore.open(args.store, city) as store:
            contents = store.contents()
        report = _verify_city(contents, rosters, digests, args.skew_ms, args.workers)
        _print_report(console, report)
        ok = ok and bool(report)
    return 0 if ok else EXIT_VERIFY_FAILED


def _verify_city(
    contents: LogContents,
    rosters: Sequence[Roster],
    digests: Mapping[int, bytes],
    skew_ms: int,
    workers: int | None,
) -> AuditReport:
    with _progress() as progress:
        tasks: dict[str, TaskID] = {}

        def report_progress(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = progress.add_task(f"{contents.city}: {phase}", total=total)
            progress.update(tasks[phase], completed=done, total=total)

        return verify_log(
            contents,
            rosters,
            skew_ms=skew_ms,
            workers=workers,
            progress=report_progress,
            roster_digests=digests,
        )


def _print_report(console: Console, report: AuditReport) -> None:
    table = Table(title=f"{report.city} ({report.origin})")
    table.add_column("entries")
    table.add_column("count", justify="right")
    for name, count in sorted(report.counts.items()):
        table.add_row(name, f"{count:,}")
    table.add_row("total leaves", f"{report.size:,}")
    table.add_row("checkpoints checked", f"{report.checkpoints:,}")
    table.add_row("largest verified checkpoint", f"{report.largest_checkpoint:,}")
    table.add_row("envelope signatures checked", f"{report.signatures:,}")
    console.print(table)
    for warning in report.warnings:
        console.print(f"note: {escape(warning)}")
    for failure in report.failures:
        console.print(f"[red]FAIL[/red] {escape(str(failure))}")
    if report:
        console.print(f"[bold green]VERIFIED[/bold green]: {escape(report.city)}")
    else:
        console.print(
            f"[bold red]FAILED[/bold red]: {escape(report.city)}: {len(report.failures)} problem(s)"
        )


def _compare(args: argparse.Namespace) -> int:
    console = _console()
    rosters = read_rosters(args.roster)
    ok = True
    for city in _cities(args.store, args.city):
        with AuditorStore.open(args.store, city) as a, AuditorStore.open(args.other, city) as b:
            result = compare_stores(a.contents(), b.contents(), rosters)
        inconclusive = False
        for store, sizes in zip((args.store, args.other), result.unverified, strict=True):
            if sizes:
                inconclusive = True
                shown = ", ".join(map(str, sorted(sizes)[:8])) + (" …" if len(sizes) > 8 else "")
                console.print(
                    f"[red]INCONCLUSIVE[/red] {escape(city)}: {len(sizes)} checkpoint(s) in "
                    f"{escape(str(store))} are signed by no log key a supplied roster names "
                    f"(sizes {shown}) and were not compared: pass the roster versions that "
                    "name every log key the city used (hansa audit verify reports them)"
                )
        ok = ok and not inconclusive
        for failure in result.failures:
            console.print(f"[red]FAIL[/red] {escape(city)}: {escape(failure)}")
        if result.first_difference is not None:
            console.print(
                f"{escape(city)}: the stores first differ at entry {result.first_difference}"
            )
        if result:
            console.print(f"{escape(city)}: consistent ({result.checked_pairs} checkpoint pairs)")
        ok = ok and bool(result)
    return 0 if ok else EXIT_VERIFY_FAILED


def _reconcile(args: argparse.Namespace) -> int:
    logs = {}
    for city in AuditorStore.cities(args.store):
        with AuditorStore.open(args.store, city) as store:
            logs[city] = store.contents()
    bundles = [read_bundle(read_limited(p, MAX_BUNDLE_SIZE)) for p in args.bundles]
    result = reconcile(logs, bundles)
    console = _console()
    console.print(
        f"{result.bundle_answers} replies held by analysts, {result.logged_answers} logged "
        "replies to them"
    )
    for city in sorted(result.unaudited):
        console.print(f"note: no log of {escape(city)} in the store: its replies are unchecked")
    for failure in result.failures:
        console.print(f"[red]FAIL[/red] {escape(failure)}")
    if result:
        console.print("[bold green]RECONCILED[/bold green]: every reply is accounted for")
        return 0
    console.print(f"[bold red]FAILED[/bold red]: {len(result.failures)} problem(s)")
    return EXIT_VERIFY_FAILED
