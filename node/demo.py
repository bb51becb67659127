"""``python -m hansa.node.demo`` (``make demo``): an alliance of city nodes on this machine.

What it does, end to end, in well under a minute:

1. creates one node per city in a temporary directory (or ``--data-dir``):
   data directory, node key (0600), ``node.toml``; and loads each city's
   short-term-rental listings. With the repository's sibling checkout
   ``../shared/data/airbnb_listings/`` present it uses the six real cities
   (Inside Airbnb, CC BY 4.0); otherwise it generates listings of the same
   shape for the same six cities (``hansa.node.synthetic``);
2. founds an alliance: every city gets a governance (root) key, and version 1
   of the alliance roster (:mod:`hansa.federation.roster`) names the six
   member cities (node key, endpoint, roles, and the log and witness keys of
   their audit logs, so nobody trusts those on first use, spec §16.1), one
   analyst with her allowed purposes, and a signing threshold. A threshold of
   the member cities sign it; it is verified as a first, pinned roster
   (TUF-style, spec §15). Every city witnesses the others' logs: each node
   pushes its checkpoints to the other five, which cosign them;
3. pins every node to the roster (``[alliance]`` in ``node.toml``; no
   ``[[trusted]]`` keys, so the roster alone says who may query), starts
   every node as a real ``hansa node serve`` subprocess on 127.0.0.1 and
   checks that each reports the same roster (``GET /v1/roster``);
4. fans one signed query with a purpose out to every member city with
   :func:`hansa.federation.fanout.fan_out` (a live per-city status line):
   listings, how many are available more than 180 days a year, mean
   availability and median nightly price, by room type;
   then asks every city for a receipt of the request (its signed log leaf,
   proven under a checkpoint signed by the log key the roster names);
5. combines the verified answers from their mergeable states and prints the
   alliance-wide table (counts, shares and availability only: prices are in
   local currencies, so they are shown per city and never added up) and the
   per-city rows;
6. writes the evidence bundle (:mod:`hansa.federation.evidence`) beside the
   nodes, re-verifies it offline against the pinned roster and prints the
   verdict city by city;
7. stops the nodes with SIGTERM and checks that they exit cleanly.

For a rough comparison the per-city table also shows the median converted to
US dollars with the fixed, approximate exchange rates of :data:`USD_PER_UNIT`
(mid-market, November 2021, the month the listings were scraped); they are
not exact and not current.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import aiohttp
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

import hansa
from hansa.client import fetch_receipts
from hansa.crypto import PublicKey, SigningKey
from hansa.crypto.keyfile import read_public_key
from hansa.federation.combine import CombinedResult, CombinedRow, HistogramCounts, finalize
from hansa.federation.evidence import Receipt, Verdict, build_bundle, verify_bundle
from hansa.federation.fanout import CityResult, CityStatus, FanOutResult, Target, fan_out
from hansa.federation.roster import (
    Analyst,
    Member,
    Role,
    RootKey,
    Roster,
    SignedRoster,
    decode_signed_roster,
    encode_signed_roster,
    roster_digest,
    sign_roster,
    unsigned,
    verify_roster,
)
from hansa.node._cli_node import init_node
from hansa.node.config import configure_alliance
from hansa.protocol.errors import HansaError
from hansa.protocol.messages import (
    AggregateState,
    Count,
    CountState,
    Dimension,
    Histogram,
    HistogramState,
    Mean,
    PolicyTags,
    Quantiles,
    Query,
    QueryAnswer,
    ResultScope,
)

__all__ = ["QUERY", "REAL_CITIES", "USD_PER_UNIT", "find_listings", "main"]

DATASET: Final = "listings"
ALLIANCE: Final = "Hansa demo alliance"
ANALYST: Final = "ana@melbourne"
ANALYST_HOME: Final = "melbourne"
PURPOSE: Final = "research"
PURPOSES: Final = ("planning", "research", "statistics")
ROSTER_DAYS: Final = 30
DEADLINE_S: Final = 20.0
MIN_PARTICIPANTS: Final = 2
BUNDLE_NAME: Final = "evidence.bundle"
ROSTER_NAME: Final = "roster.v1.bin"

REAL_CITIES: Final[dict[str, tuple[str, str, str]]] = {
    # file stem -> (city id, display name, currency)
    "austin": ("austin", "Austin", "USD"),
    "bangkok": ("bangkok", "Bangkok", "THB"),
    "buenos_aires": ("buenos-aires", "Buenos Aires", "ARS"),
    "cape_town": ("cape-town", "Cape Town", "ZAR"),
    "istanbul": ("istanbul", "Istanbul", "TRY"),
    "melbourne": ("melbourne", "Melbourne", "AUD"),
}
USD_PER_UNIT: Final[dict[str, float]] = {
    # Approximate mid-market rates, November 2021 (US dollars per unit of currency).
    "USD": 1.0,
    "THB": 1 / 33.0,
    "ARS": 1 / 100.0,
    "ZAR": 1 / 15.5,
    "TRY": 1 / 10.5,
    "AUD": 1 / 1.37,
}

LONG_STAY_DAYS: Final = 180
"""A listing available more than this many days a year is (nearly) a full-time rental."""

QUERY: Final = Query(
    dataset=DATASET,
    aggregates=(
        Count(),
        # availability_365 is an integer 0..365: the bins are [0, 181) and [181, 365],
        # so the second bin counts the listings available more than 180 days.
        Histogram("availability_365", (0.0, LONG_STAY_DAYS + 1.0, 365.0)),
        Mean("availability_365"),
        Quantiles("price", (0.5,)),
    ),
    group_by=(Dimension("room_type"),),
)
_COUNT, _HIST, _AVAIL, _PRICE = range(4)


@dataclass
class City:
    """One demo node."""

    city: str
    name: str
    currency: str
    data_dir: Path
    source: Path
    port: int = 0
    node_key: PublicKey | None = None
    log_key: PublicKey | None = None
    witness_key: PublicKey | None = None
    root_key: SigningKey | None = None
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""

    @property
    def endpoint(self) -> str:
        """The URL the roster names for this city's node."""
        return f"http://127.0.0.1:{self.port}"


def find_listings() -> Path | None:
    """Return ``shared/data/airbnb_listings`` beside the repository, if present.

    The package is installed editable from the repository, so the checkout is
    found from the package's location; the current directory and
    ``$HANSA_SHARED`` are tried too.

    Returns:
        The directory holding all six ``listings_<city>.csv`` files, or None.
    """
    candidates: list[Path] = []
    if env := os.environ.get("HANSA_SHARED"):
        candidates.append(Path(env) / "data" / "airbnb_listings")
    package_root = Path(hansa.__file__).resolve().parent.parent
    for base in (package_root, Path.cwd()):
        candidates.append(base.parent / "shared" / "data" / "airbnb_listings")
        candidates.append(base / "shared" / "data" / "airbnb_listings")
    for path in candidates:
        if all((path / f"listings_{stem}.csv").is_file() for stem in REAL_CITIES):
            return path
    return None


def _free_port() -> int:
    # The roster names each node's endpoint before the node starts, so ports
    # are chosen up front (the OS picks a free one; we release it at once).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _prepare(root: Path, *, synthetic: bool, rows: int) -> tuple[list[City], bool]:
    listings = None if synthetic else find_listings()
    cities: list[City] = []
    if listings is not None:
        for stem, (city, name, currency) in REAL_CITIES.items():
            source = listings / f"listings_{stem}.csv"
            cities.append(City(city, name, currency, root / city, source))
        return cities, True
    from hansa.node.synthetic import write_listings_csv

    for i, (city, name, currency) in enumerate(REAL_CITIES.values()):
        # The generator knows these six cities' price levels, so the generated
        # prices look like their local currencies.
        csv = write_listings_csv(root / f"{city}.csv", city=city, rows=rows, seed=100 + i)
        cities.append(City(city, name, currency, root / city, csv))
    return cities, False


def _load(city: City) -> None:
    from hansa.node.catalog import Catalog
    from hansa.node.synthetic import default_listing_roles

    city.port = _free_port()
    config = init_node(city.data_dir, city=city.city, port=city.port, witness=True)
    with Catalog(city.data_dir) as catalog:
        catalog.add(DATASET, city.source, roles=default_listing_roles())
    city.node_key = read_public_key(config.key_file)
    city.log_key = read_public_key(config.path(config.audit.log_key_file))
    assert config.audit.witness_key_file is not None  # init_node(witness=True) wrote it
    city.witness_key = read_public_key(config.path(config.audit.witness_key_file))
    city.root_key = SigningKey.generate()


# --- the alliance roster -------------------------------------------------------------------


def _threshold(members: int) -> int:
    """A two-thirds majority of the member cities' root keys."""
    return max(1, -(-2 * members // 3))


def _found_alliance(
    cities: Sequence[City], analyst: SigningKey, now_ms: int
) -> tuple[SignedRoster, Roster, list[str]]:
    """Write version 1 of the roster and have a threshold of its cities sign it.

    Returns:
        The signed roster, its verified body, and the cities that signed.
    """
    members = []
    root_keys = []
    for city in cities:
        assert city.node_key is not None and city.root_key is not None
        assert city.log_key is not None and city.witness_key is not None
        members.append(
            Member(
                city=city.city,
                name=city.name,
                public_key=city.node_key.raw,
                endpoint=city.endpoint,
                roles=(Role.MEMBER, Role.WITNESS),
                log_key=city.log_key.raw,
                witness_key=city.witness_key.raw,
            )
        )
        root_keys.append(RootKey(city=city.city, public_key=city.root_key.public_key.raw))
    threshold = _threshold(len(cities))
    draft = Roster(
        alliance=ALLIANCE,
        version=1,
        expires_ms=now_ms + ROSTER_DAYS * 86_400_000,
        threshold=threshold,
        root_keys=tuple(root_keys),
        members=tuple(members),
        analysts=(
            Analyst(
                principal=ANALYST,
                public_key=analyst.public_key.raw,
                home_city=ANALYST_HOME,
                purposes=(PURPOSE,),
            ),
        ),
        purposes=PURPOSES,
    )
    signed = unsigned(draft)
    # Exactly a threshold of the cities sign: enough, and the rest could not
    # have added anything the verifier needs.
    signers = [c for c in cities if c.city != "istanbul"][:threshold]
    for city in signers:
        assert city.root_key is not None
        signed = sign_roster(signed, city.root_key)
    roster = verify_roster(signed, None, now_ms, pin=roster_digest(signed))
    return signed, roster, [c.city for c in signers]


def _pin_nodes(
    cities: Sequence[City], signed: SignedRoster, now_ms: int, min_participants: int
) -> None:
    """Pin every node to roster v1 (``[alliance]`` in its ``node.toml``, spec §15.1).

    The nodes have no ``[[trusted]]`` keys: from now on the roster alone says
    who may query them and for which purposes.
    """
    data = encode_signed_roster(signed)
    pin = roster_digest(signed)
    for city in cities:
        configure_alliance(city.data_dir, data, pin, now_ms, min_participants=min_participants)


async def _rosters_held(cities: Sequence[City]) -> set[bytes]:
    """Return the SHA-256 of the roster each node says it trusts (``GET /v1/roster``)."""
    digests: set[bytes] = set()
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for city in cities:
            async with session.get(city.url + "/v1/roster") as resp:
                resp.raise_for_status()
                digests.add(roster_digest(decode_signed_roster(await resp.read())))
    return digests


# --- node processes ------------------------------------------------------------------------


def _start(city: City) -> None:
    city.proc = subprocess.Popen(  # noqa: S603 — fixed argv: this interpreter, our own CLI
        [sys.executable, "-m", "hansa", "node", "serve", "--data-dir", str(city.data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _wait_ready(city: City, deadline: float) -> None:
    assert city.proc is not None and city.proc.stdout is not None
    fd = city.proc.stdout.fileno()
    line = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while b"\n" not in line:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"node {city.city} did not start in time")
            if not selector.select(left):
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                city.proc.wait(timeout=10)
                err = city.proc.stderr.read().decode(errors="replace") if city.proc.stderr else ""
                raise RuntimeError(f"node {city.city} exited: {err.strip()[-500:]}")
            line += chunk
    text = line.decode(errors="replace")
    city.url = text[text.index("http://") :].split()[0]


def _stop(cities: Sequence[City]) -> list[str]:
    problems: list[str] = []
    for city in cities:
        if city.proc is not None and city.proc.poll() is None:
            city.proc.send_signal(signal.SIGTERM)
    for city in cities:
        if city.proc is None:
            continue
        try:
            code = city.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            city.proc.kill()
            code = city.proc.wait()
        for stream in (city.proc.stdout, city.proc.stderr):
            if stream is not None:
                stream.close()
        city.proc = None
        if code != 0:
            problems.append(f"{city.city} exited with {code}")
    return problems


# --- the fan-out ---------------------------------------------------------------------------

_STATUS_STYLE: Final[dict[CityStatus, str]] = {
    CityStatus.ANSWERED: "green",
    CityStatus.REFUSED: "yellow",
    CityStatus.TIMEOUT: "red",
    CityStatus.UNREACHABLE: "red",
    CityStatus.BAD_SIGNATURE: "bold red",
    CityStatus.PROTOCOL_ERROR: "red",
}


def _status_line(cities: Sequence[City], seen: Mapping[str, CityResult], elapsed: float) -> Text:
    line = Text(f"  fan-out {elapsed:4.1f} s  ")
    for city in cities:
        result = seen.get(city.city)
        if result is None:
            line.append(f"{city.city} …  ", style="dim")
        else:
            mark = "✓" if result.status is CityStatus.ANSWERED else "✗"
            line.append(
                f"{city.city} {mark} {result.latency_ms:.0f} ms  ",
                style=_STATUS_STYLE[result.status],
            )
    return line


async def _ask_all(
    console: Console, cities: Sequence[City], analyst: SigningKey, roster: Roster
) -> tuple[FanOutResult, dict[str, Receipt]]:
    targets = []
    for city in cities:
        member = roster.member(city.city)
        assert member is not None
        # Endpoint and node key come from the verified roster, nothing else.
        targets.append(Target(member.city, member.endpoint, PublicKey(member.public_key)))
    seen: dict[str, CityResult] = {}
    started = time.perf_counter()
    policy = PolicyTags(
        purpose=PURPOSE,
        legal_basis="alliance study of short-term rentals and housing supply (demo)",
        scope=ResultScope.ALLIANCE,
        analyst=ANALYST,
    )
    displays: list[Live] = []  # the live display, once it is up (terminals only)

    def on_status(result: CityResult) -> None:
        seen[result.city] = result
        for live in displays:
            live.update(_status_line(cities, seen, time.perf_counter() - started))

    async def ask() -> FanOutResult:
        return await fan_out(
            QUERY,
            policy,
            targets,
            signer=analyst,
            requester=ANALYST,
            quorum=max(1, len(targets) // 2 + 1),
            deadline_s=DEADLINE_S,
            roster_version=roster.version,
            on_status=on_status,
        )

    if not console.is_terminal:
        # A pipe or a log gets the final status line once, not redraws.
        result = await ask()
        console.print(_status_line(cities, seen, time.perf_counter() - started))
    else:
        with Live(_status_line(cities, seen, 0.0), console=console, refresh_per_second=12) as live:
            displays.append(live)
            result = await ask()
            live.update(_status_line(cities, seen, time.perf_counter() - started))
    # Receipts: each city's log holds the request, under a checkpoint the roster's log
    # key signed (the key served at GET /v1/log/keys must be that one, spec §16.1).
    receipts = await fetch_receipts(
        result,
        targets,
        signer=analyst,
        requester=ANALYST,
        roster_version=roster.version,
        log_keys={m.city: m.log_key for m in roster.members if m.log_key is not None},
    )
    return result, receipts


# --- rendering -----------------------------------------------------------------------------


def _n(state: AggregateState) -> int:
    return state.n if isinstance(state, CountState) else 0


def _long_stay(counts: HistogramCounts | HistogramState | None) -> int | None:
    # Bins [0, 181) and [181, 365]; "above" would be > 365 (none in the data).
    if counts is None:
        return None
    return counts.counts[1] + counts.above


def _pct(part: int | None, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if part is not None and whole else "—"


def _days(value: object) -> str:
    return f"{value:.0f}" if isinstance(value, float) else "—"


def _price(value: object) -> str:
    return f"{value:,.0f}" if isinstance(value, int | float) else "—"


def _combined_count(row: CombinedRow) -> int:
    n = row.values[_COUNT]
    return n if isinstance(n, int) else 0


def _render_combined(console: Console, result: FanOutResult, combined: CombinedResult) -> None:
    rows = sorted(combined.rows, key=lambda r: -_combined_count(r))
    total = sum(v for r in rows if isinstance(v := r.values[_COUNT], int))
    answered = len(combined.cities)
    table = Table(
        title=f"The alliance's answer: {answered} of {len(result.targets)} cities combined "
        "from their signed, mergeable states",
        title_justify="left",
    )
    table.add_column("room type")
    table.add_column("listings", justify="right")
    table.add_column("share of listings", justify="right")
    table.add_column(f"available > {LONG_STAY_DAYS} d/yr", justify="right")
    table.add_column("mean availability (days)", justify="right")
    table.add_column("cities", justify="right")
    for row in rows:
        n = row.values[_COUNT]
        count = n if isinstance(n, int) else 0
        hist = row.values[_HIST]
        long_stay = _long_stay(hist if isinstance(hist, HistogramCounts) else None)
        cities = f"{len(row.contributors)}"
        if row.suppressed:
            cities += f" [dim](+{len(row.suppressed)} suppressed)[/dim]"
        table.add_row(
            escape(str(row.key[0])),
            f"{count:,}" if row.released else "—",
            _pct(count, total) if row.released else "—",
            f"{_pct(long_stay, count)} ({long_stay:,})" if long_stay is not None else "—",
            _days(row.values[_AVAIL]),
            cities,
        )
    table.add_section()
    all_long = sum(
        _long_stay(h) or 0 for r in rows if isinstance(h := r.values[_HIST], HistogramCounts)
    )
    table.add_row(
        "[bold]all room types[/bold]",
        f"[bold]{total:,}[/bold]",
        "100%",
        f"[bold]{_pct(all_long, total)}[/bold] ({all_long:,})",
        "",
        f"{answered}",
    )
    console.print(table)


def _render_cities(console: Console, cities: Sequence[City], result: FanOutResult) -> None:
    table = Table(
        title="Per city (each row from that city's own signed answer; prices in local currency)",
        title_justify="left",
    )
    table.add_column("city (currency)")
    table.add_column("room type")
    table.add_column("listings", justify="right")
    table.add_column("share", justify="right")
    table.add_column(f"> {LONG_STAY_DAYS} d/yr", justify="right")
    table.add_column("median price", justify="right")
    table.add_column("≈ USD", justify="right")
    for city in cities:
        outcome = result.city(city.city)
        label = f"{city.name} ({city.currency})"
        answer = outcome.answer
        if not isinstance(answer, QueryAnswer):
            style = _STATUS_STYLE[outcome.status]
            table.add_row(label, f"[{style}]{outcome.status.value}: {escape(outcome.detail)}[/]")
            table.add_section()
            continue
        groups = sorted(answer.groups, key=lambda g: -_n(g.states[_COUNT]))
        total = sum(_n(g.states[_COUNT]) for g in groups)
        for i, group in enumerate(groups):
            n = _n(group.states[_COUNT])
            hist = group.states[_HIST]
            long_stay = _long_stay(hist if isinstance(hist, HistogramState) else None)
            quantiles = finalize(QUERY.aggregates[_PRICE], group.states[_PRICE])
            median = quantiles[0] if isinstance(quantiles, tuple) else None
            usd = (
                f"${median * USD_PER_UNIT[city.currency]:,.0f}"
                if isinstance(median, int | float)
                else "—"
            )
            table.add_row(
                label if i == 0 else "",
                escape(str(group.key[0])),
                f"{n:,}",
                _pct(n, total),
                _pct(long_stay, n),
                _price(median),
                usd,
            )
        for cell in answer.suppressed:
            table.add_row(
                "" if groups else label,
                escape(str(cell.key[0])),
                f"[dim]suppressed ({cell.reason.value})[/dim]",
            )
        table.add_section()
    console.print(table)


_SHOWN_CHECKS: Final = {
    "request signature": "request sig",
    "purpose": "purpose",
    "reply signature": "reply sig",
    "reply cites request": "cites request",
    "answer fits query": "fits query",
}
"""The checks named on each city's verdict line (all are counted)."""


def _render_verdict(console: Console, verdict: Verdict, path: Path, size: int) -> None:
    mark = "[bold green]VALID[/bold green]" if verdict.ok else "[bold red]INVALID[/bold red]"
    console.print(
        f"Evidence bundle [bold]{escape(str(path))}[/bold] ({size:,} bytes), verified offline "
        f"against the pinned roster: {mark} — roster v{verdict.roster_version} of "
        f"{escape(verdict.alliance or '?')}, {verdict.answered} answers re-verified and "
        "recombined, the claimed combination matches"
        if verdict.ok
        else f"Evidence bundle {escape(str(path))}: {mark}"
    )
    if verdict.receipts:
        console.print(
            f"  receipts: {verdict.receipts} cities logged the request, proven under "
            "checkpoints signed by the log keys the roster names"
        )
    if verdict.request:
        ok = "[green]✓[/green]" if all(c.ok for c in verdict.request) else "[red]✗[/red]"
        shown = [_SHOWN_CHECKS.get(c.name, c.name) for c in verdict.request if c.ok]
        console.print(
            f"  the one signed request, sent to every city: {ok} "
            f"{sum(c.ok for c in verdict.request)}/{len(verdict.request)}: " + ", ".join(shown)
        )
    table = Table(show_header=True, box=None, pad_edge=False)
    table.add_column("  city")
    table.add_column("status")
    table.add_column("checks")
    for line in verdict.cities:
        passed = sum(c.ok for c in line.checks)
        ok = "[green]✓[/green]" if line.ok else "[red]✗[/red]"
        what = "signed" if line.signed else "unsigned claim"
        shown = [_SHOWN_CHECKS[c.name] for c in line.checks if c.ok and c.name in _SHOWN_CHECKS]
        table.add_row(
            f"  {line.city}",
            f"{line.status} ({what})",
            f"{ok} {passed}/{len(line.checks)}: " + ", ".join(shown),
        )
    console.print(table)
    for failure in verdict.failures:
        console.print(f"  [red]✗ {escape(failure)}[/red]")


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The process exit status: 0 when every city answered, the bundle
        verified and every node stopped cleanly.
    """
    parser = argparse.ArgumentParser(prog="python -m hansa.node.demo", description=__doc__)
    parser.add_argument("--data-dir", type=Path, help="keep the nodes here (default: a temp dir)")
    parser.add_argument("--synthetic", action="store_true", help="use generated listings")
    parser.add_argument("--rows", type=int, default=5000, help="generated listings per city")
    args = parser.parse_args(argv)
    # A pipe gets a fixed, readable width instead of rich's 80-column default.
    console = Console() if sys.stdout.isatty() else Console(width=110)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hansa-demo-") as tmp:
        root: Path = args.data_dir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        if args.data_dir is not None and any(root.iterdir()):
            console.print(
                f"[red]{escape(str(root))} is not empty; choose an empty --data-dir[/red]"
            )
            return 1
        cities, real = _prepare(root, synthetic=args.synthetic, rows=args.rows)
        analyst = SigningKey.generate()
        source = (
            "real listings from Inside Airbnb (insideairbnb.com), CC BY 4.0"
            if real
            else f"generated listings ({args.rows:,} per city; ../shared/data not found)"
        )
        console.print(f"[bold]Hansa demo[/bold]: {len(cities)} city nodes, {source}")
        for city in cities:
            _load(city)
        console.print(
            f"  nodes initialised and data loaded in {time.perf_counter() - started:.1f} s"
        )
        now = time.time_ns() // 1_000_000
        signed, roster, signers = _found_alliance(cities, analyst, now)
        roster_file = root / ROSTER_NAME
        roster_file.write_bytes(encode_signed_roster(signed))
        console.print(
            f"[bold]Alliance[/bold] {escape(ALLIANCE)!r}: roster v{roster.version}, "
            f"{len(roster.members)} member cities, threshold {roster.threshold} of "
            f"{len(roster.root_keys)} root keys, expires {_iso(roster.expires_ms)}\n"
            f"  signed by {', '.join(signers)} (each with its own governance key) and "
            f"verified: SHA-256 pin {roster_digest(signed).hex()[:16]}…\n"
            f"  analyst {ANALYST} (home city {ANALYST_HOME}, key "
            f"{analyst.key_id.hex()[:16]}…) may query for: {', '.join(PURPOSES[1:2])}"
        )
        _pin_nodes(cities, signed, now, min_participants=MIN_PARTICIPANTS)
        console.print(
            "  every node is pinned to this roster (\\[alliance] in node.toml, no other "
            "trusted keys): only keys it names may query, for the purposes it allows; "
            f"each node also wants at least {MIN_PARTICIPANTS} participating cities"
        )
        problems: list[str] = []
        try:
            for city in cities:
                _start(city)
            deadline = time.monotonic() + 30
            for city in cities:
                _wait_ready(city, deadline)
            held = asyncio.run(_rosters_held(cities))
            same = held == {roster_digest(signed)}
            console.print(
                f"  {len(cities)} nodes serving on 127.0.0.1 ports "
                + ", ".join(str(c.port) for c in cities)
                + (
                    f"; each reports roster v{roster.version} (GET /v1/roster, same SHA-256)"
                    if same
                    else "; [red]the nodes report different rosters[/red]"
                )
            )
            console.print(
                f"[bold]Query[/bold] (purpose {PURPOSE!r}, deadline {DEADLINE_S:.0f} s, one "
                f"signed request per city): listings, share available > {LONG_STAY_DAYS} days "
                "a year, mean availability and median price, by room type"
            )
            result, receipts = asyncio.run(_ask_all(console, cities, analyst, roster))
        except (HansaError, OSError, TimeoutError, RuntimeError, aiohttp.ClientError) as exc:
            console.print(f"[red]demo failed: {escape(str(exc))}[/red]")
            _stop(cities)
            return 1
        finally:
            problems = _stop(cities)

        if result.combined is not None:
            _render_combined(console, result, result.combined)
        else:
            console.print(f"[red]no combined answer: {escape(result.reason or '?')}[/red]")
        _render_cities(console, cities, result)

        bundle = build_bundle(result, signed, receipts)
        bundle_path = root / BUNDLE_NAME
        bundle_path.write_bytes(bundle)
        verdict = verify_bundle(bundle_path.read_bytes(), pin=roster_digest(signed))
        _render_verdict(console, verdict, bundle_path, len(bundle))
        if args.data_dir is not None:
            console.print(
                f"  check it yourself: hansa verify {escape(str(bundle_path))} "
                f"--roster {escape(str(roster_file))}"
            )
        else:
            console.print(
                "  [dim](the demo directory is temporary; run with --data-dir DIR to keep the "
                "bundle and check it with `hansa verify DIR/evidence.bundle`)[/dim]"
            )

    answered = len(result.by_status(CityStatus.ANSWERED))
    console.print(
        "Prices stay in local currency (USD column: fixed approximate November 2021 rates); "
        "only counts, shares and availability are combined across cities. Cells below a "
        "node's minimum group size are suppressed by the node itself; no row leaves a node."
    )
    if real:
        console.print("Data: Inside Airbnb (insideairbnb.com), licensed CC BY 4.0.")
    if problems:
        console.print("[red]shutdown problems: " + escape("; ".join(problems)) + "[/red]")
    else:
        console.print(
            f"All {len(cities)} nodes stopped cleanly (SIGTERM). "
            f"Total {time.perf_counter() - started:.1f} s."
        )
    ok = answered == len(cities) and verdict.ok and same and not problems
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
