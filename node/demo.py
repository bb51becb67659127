"""``python -m hansa.node.demo`` (``make demo``): an alliance of city nodes on this machine.

What it does, end to end, in well under a minute:

1. creates one node per city in a temporary directory (or ``--data-dir``):
   data directory, node key (0600), ``node.toml``; and loads each city's
   short-term-rental listings. With the repository's sibling checkout
   ``../shared/data/airbnb_listings/`` present it uses the six real cities
   (Inside Airbnb, CC BY 4.0); otherwise it generates listings of the same
   shape for three cities (``hansa.node.synthetic``);
2. creates an analyst key and trusts it on every node (``[[trusted]]``);
3. starts every node as a real ``hansa node serve`` subprocess on a free
   port of 127.0.0.1;
4. fetches each node's signed capability document and sends each city one
   signed aggregate query (count, median and p90 nightly price, mean
   availability, grouped by room type);
5. verifies every reply (strict Ed25519 under the node's key, the reply
   cites our request's message id, names the right city and requester), and
   prints the per-city answers;
6. stops the nodes with SIGTERM and checks that they exit cleanly.

Prices are in each city's local currency. For a rough comparison the table
also shows the median converted to US dollars with the fixed, approximate
exchange rates of :data:`USD_PER_UNIT` (mid-market, November 2021, the month
the listings were scraped); they are not exact and not current.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import aiohttp
from rich.console import Console
from rich.table import Table

import hansa
from hansa.crypto import PublicKey, SigningKey, open_envelope, seal
from hansa.crypto.keyfile import read_public_key
from hansa.federation.combine import finalize
from hansa.node._cli_node import init_node
from hansa.node.app import ENVELOPE_MEDIA_TYPE
from hansa.node.config import add_trusted_key
from hansa.protocol.codec import decode_as
from hansa.protocol.envelope import PayloadType, decode_envelope, message_id
from hansa.protocol.errors import HansaError, ProtocolError
from hansa.protocol.messages import (
    AggregateState,
    Capabilities,
    Count,
    CountState,
    Dimension,
    ErrorMessage,
    Mean,
    PolicyTags,
    Quantiles,
    Query,
    QueryAnswer,
    QueryRefusal,
    QueryRequest,
    ResultScope,
)

__all__ = ["REAL_CITIES", "USD_PER_UNIT", "find_listings", "main"]

DATASET: Final = "listings"
ANALYST: Final = "ana@alliance"

REAL_CITIES: Final[dict[str, tuple[str, str]]] = {
    # file stem -> (city id, currency)
    "austin": ("austin", "USD"),
    "bangkok": ("bangkok", "THB"),
    "buenos_aires": ("buenos-aires", "ARS"),
    "cape_town": ("cape-town", "ZAR"),
    "istanbul": ("istanbul", "TRY"),
    "melbourne": ("melbourne", "AUD"),
}
SYNTHETIC_CITIES: Final[tuple[tuple[str, str], ...]] = (
    # The generator knows these cities' price levels, so the generated prices
    # look like their local currencies.
    ("austin", "USD"),
    ("bangkok", "THB"),
    ("melbourne", "AUD"),
)
USD_PER_UNIT: Final[dict[str, float]] = {
    # Approximate mid-market rates, November 2021 (US dollars per unit of currency).
    "USD": 1.0,
    "THB": 1 / 33.0,
    "ARS": 1 / 100.0,
    "ZAR": 1 / 15.5,
    "TRY": 1 / 10.5,
    "AUD": 1 / 1.37,
}

QUERY: Final = Query(
    dataset=DATASET,
    aggregates=(Count(), Quantiles("price", (0.5, 0.9)), Mean("availability_365")),
    group_by=(Dimension("room_type"),),
)


@dataclass
class City:
    """One demo node."""

    city: str
    currency: str
    data_dir: Path
    source: Path
    node_key: PublicKey | None = None
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""


@dataclass
class Outcome:
    """What one city replied, after verification."""

    city: City
    capabilities_ok: bool
    reply: QueryAnswer | QueryRefusal | ErrorMessage
    checks: tuple[str, ...]
    elapsed_ms: float


def find_listings() -> Path | None:
    """Return ``shared/data/airbnb_listings`` beside the repository, if present.

    The package is installed editable from the repository, so the checkout is
    found from the package's location; the current directory and
    ``$HANSA_SHARED`` are tried too.
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


def _prepare(root: Path, *, synthetic: bool, rows: int) -> tuple[list[City], bool]:
    listings = None if synthetic else find_listings()
    cities: list[City] = []
    if listings is not None:
        for stem, (city, currency) in REAL_CITIES.items():
            cities.append(City(city, currency, root / city, listings / f"listings_{stem}.csv"))
        return cities, True
    from hansa.node.synthetic import write_listings_csv

    for i, (city, currency) in enumerate(SYNTHETIC_CITIES):
        csv = write_listings_csv(root / f"{city}.csv", city=city, rows=rows, seed=100 + i)
        cities.append(City(city, currency, root / city, csv))
    return cities, False


def _load(city: City, analyst: SigningKey) -> None:
    from hansa.node.catalog import Catalog
    from hansa.node.synthetic import default_listing_roles

    config = init_node(city.data_dir, city=city.city, port=0)
    add_trusted_key(city.data_dir, ANALYST, analyst.public_key.raw.hex())
    with Catalog(city.data_dir) as catalog:
        catalog.add(DATASET, city.source, roles=default_listing_roles())
    city.node_key = read_public_key(config.key_file)


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
        if code != 0:
            problems.append(f"{city.city} exited with {code}")
    return problems


def _request(city: str) -> QueryRequest:
    now = time.time_ns() // 1_000_000
    return QueryRequest(
        requester=ANALYST,
        audience=city,
        issued_at=now,
        expires_at=now + 60_000,
        nonce=secrets.token_bytes(16),
        roster_version=0,
        policy=PolicyTags(
            purpose="research",
            legal_basis="alliance housing study (demo)",
            scope=ResultScope.ALLIANCE,
            analyst=ANALYST,
        ),
        query=QUERY,
        targets=(city,),
        quorum=1,
    )


async def _ask(session: aiohttp.ClientSession, city: City, analyst: SigningKey) -> Outcome:
    assert city.node_key is not None
    keys = {city.node_key.key_id: city.node_key}
    started = time.perf_counter()
    async with session.get(city.url + "/v1/capabilities") as resp:
        caps_body = await resp.read()
    caps = open_envelope(caps_body, keys, Capabilities).message
    capabilities_ok = caps.city == city.city and caps.node_key == city.node_key.raw
    envelope = seal(_request(city.city), analyst)
    async with session.post(
        city.url + "/v1/query", data=envelope, headers={"Content-Type": ENVELOPE_MEDIA_TYPE}
    ) as resp:
        status, body = resp.status, await resp.read()
    elapsed = (time.perf_counter() - started) * 1000
    if status != 200:
        return Outcome(city, capabilities_ok, decode_as(body, ErrorMessage), (), elapsed)
    reply: QueryAnswer | QueryRefusal
    if decode_envelope(body).payload_type == PayloadType.QUERY_ANSWER:
        reply = open_envelope(body, keys, QueryAnswer).message
    else:
        reply = open_envelope(body, keys, QueryRefusal).message
    checks = ["sig"]
    if reply.request_id == message_id(envelope):
        checks.append("request-id")
    if reply.responder == city.city and reply.requester == ANALYST:
        checks.append("parties")
    return Outcome(city, capabilities_ok, reply, tuple(checks), elapsed)


async def _ask_all(cities: Sequence[City], analyst: SigningKey) -> list[Outcome]:
    timeout = aiohttp.ClientTimeout(total=20)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        return list(await asyncio.gather(*(_ask(session, c, analyst) for c in cities)))


def _count(state: AggregateState) -> int:
    if not isinstance(state, CountState):
        raise ProtocolError("the first aggregate of the demo query is a count")
    return state.n


def _price(value: object) -> str:
    return f"{value:,.0f}" if isinstance(value, int | float) else "—"


def _render(console: Console, outcomes: Sequence[Outcome]) -> None:
    table = Table(title="One signed query, answered by each city's own node")
    table.add_column("city (currency)")
    table.add_column("room type")
    table.add_column("listings", justify="right")
    table.add_column("share", justify="right")
    table.add_column("median / p90 price", justify="right")
    table.add_column("≈ USD median", justify="right")
    table.add_column("avail. days", justify="right")
    for o in outcomes:
        city = o.city
        reply = o.reply
        label = f"{city.city} ({city.currency})"
        if not isinstance(reply, QueryAnswer):
            table.add_row(label, f"[red]{type(reply).__name__} {reply.code.name}[/red]")
            table.add_section()
            continue
        counts = [_count(g.states[0]) for g in reply.groups]
        total = sum(counts)
        ordered = sorted(zip(counts, reply.groups, strict=True), key=lambda p: -p[0])
        for i, (n, group) in enumerate(ordered):
            quantiles = finalize(QUERY.aggregates[1], group.states[1])
            median, p90 = quantiles if isinstance(quantiles, tuple) else (None, None)
            avail = finalize(QUERY.aggregates[2], group.states[2])
            usd = (
                f"${median * USD_PER_UNIT[city.currency]:,.0f}"
                if isinstance(median, int | float)
                else "—"
            )
            table.add_row(
                label if i == 0 else "",
                str(group.key[0]),
                f"{n:,}",
                f"{100 * n / total:.0f}%" if total else "—",
                f"{_price(median)} / {_price(p90)}",
                usd,
                f"{avail:.0f}" if isinstance(avail, float) else "—",
            )
        for cell in reply.suppressed:
            table.add_row("", str(cell.key[0]), f"[dim]suppressed: {cell.reason.value}[/dim]")
        table.add_section()
    console.print(table)

    proof = Table(title="What each city signed, and what we checked", title_justify="left")
    proof.add_column("city")
    proof.add_column("node key id")
    proof.add_column("reply")
    proof.add_column("dataset version")
    proof.add_column("checks")
    proof.add_column("ms", justify="right")
    for o in outcomes:
        key_id = o.city.node_key.key_id.hex()[:16] if o.city.node_key is not None else "?"
        reply = o.reply
        what = (
            f"answer ({reply.decision.value})"
            if isinstance(reply, QueryAnswer)
            else f"{type(reply).__name__} {reply.code.name}"
        )
        version = reply.dataset_version if isinstance(reply, QueryAnswer) else "—"
        checks = (["caps"] if o.capabilities_ok else []) + list(o.checks)
        mark = "[green]✓[/green] " if len(checks) == 4 else "[red]✗[/red] "
        proof.add_row(
            o.city.city, key_id, what, version, mark + " · ".join(checks), f"{o.elapsed_ms:.0f}"
        )
    console.print(proof)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; return the process exit status."""
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
            console.print(f"[red]{root} is not empty; choose an empty --data-dir[/red]")
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
            _load(city, analyst)
        console.print(
            f"  nodes initialised and data loaded in {time.perf_counter() - started:.1f} s; "
            f"analyst {ANALYST} (key {analyst.key_id.hex()[:16]}…) trusted by every node"
        )
        problems: list[str] = []
        try:
            for city in cities:
                _start(city)
            deadline = time.monotonic() + 30
            for city in cities:
                _wait_ready(city, deadline)
            console.print("  nodes serving: " + ", ".join(f"{c.city} {c.url}" for c in cities))
            outcomes = asyncio.run(_ask_all(cities, analyst))
        except (HansaError, OSError, TimeoutError, RuntimeError, aiohttp.ClientError) as exc:
            console.print(f"[red]demo failed: {exc}[/red]")
            _stop(cities)
            return 1
        finally:
            problems = _stop(cities)
    _render(console, outcomes)
    verified = sum(1 for o in outcomes if o.capabilities_ok and len(o.checks) == 3)
    console.print(
        f"Verified {verified}/{len(outcomes)} replies: each node's capability document and "
        "answer are Ed25519-signed (strict, libsodium) by that node's key; each answer cites "
        "the SHA-256 message id of our signed request and names the city and the analyst."
    )
    console.print(
        "Prices are in local currency; the USD column uses fixed approximate rates "
        "(November 2021). Cells below the node's minimum group size are suppressed by the "
        "node itself, and no row ever leaves a node."
    )
    if real:
        console.print("Data: Inside Airbnb (insideairbnb.com), licensed CC BY 4.0.")
    if problems:
        console.print("[red]shutdown problems: " + "; ".join(problems) + "[/red]")
    else:
        console.print(
            f"All {len(cities)} nodes stopped cleanly (SIGTERM). "
            f"Total {time.perf_counter() - started:.1f} s."
        )
    return 0 if verified == len(outcomes) and not problems else 1


if __name__ == "__main__":
    raise SystemExit(main())
