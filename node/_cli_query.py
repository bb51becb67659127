"""``hansa query``: ask the whole alliance one signed question.

::

    hansa query --roster FILE --key KEYFILE [--as PRINCIPAL] --dataset NAME
                --agg SPEC [--agg SPEC ...] [--group-by SPEC ...] [--where SPEC ...]
                --purpose TOKEN [--legal-basis TEXT] [--scope alliance|public]
                [--cities a,b,c] [--quorum N] [--deadline SECONDS]
                [--out BUNDLE] [--json | --csv] [--chart FILE.png] [--pin HEX]

The roster is verified (its own threshold, and ``--pin`` if given), the
targets and node keys come from it, and :class:`hansa.client.Alliance` fans
the query out. While it runs a live per-city table (rich) shows each city's
status as it arrives, on an interactive terminal and without ``--json`` /
``--csv``. At the end: the combined table and one line per city (status,
code, latency, answered cells), or the machine output on standard output.
The spec grammars are those of :mod:`hansa.client`.

Exit status: 0 when the quorum was met and the answers combined;
:data:`EXIT_QUORUM_NOT_MET` otherwise (the bundle, JSON and CSV are still
written, so the refusals stay on record); 1 with one line on standard error
for bad input (a bad spec, an unreadable file, a roster that does not verify).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from hansa.client import (
    DEFAULT_DEADLINE_S,
    DEFAULT_LEGAL_BASIS,
    Alliance,
    QueryResult,
    read_roster_file,
)
from hansa.crypto.keyfile import is_encrypted, read_key_file
from hansa.federation.fanout import CityResult, CityStatus
from hansa.node.cli import EXIT_QUORUM_NOT_MET
from hansa.protocol.errors import ConfigError

__all__ = ["EXIT_QUORUM_NOT_MET", "register"]

_MAX_PASSPHRASE: Final = 1024

_STATUS_STYLE: Final = {
    CityStatus.ANSWERED: "green",
    CityStatus.REFUSED: "yellow",
    CityStatus.TIMEOUT: "red",
    CityStatus.UNREACHABLE: "red",
    CityStatus.BAD_SIGNATURE: "bold red",
    CityStatus.PROTOCOL_ERROR: "red",
}

_SPEC_HELP: Final = """\
aggregate specs (--agg):
  count | count:COL | sum:COL | mean:COL | min:COL | max:COL | variance:COL | stddev:COL
  quantiles:COL:R1,R2,...   ranks in [0,1], e.g. quantiles:price:0.5,0.9
  histogram:COL:E1,E2,...   increasing edges, e.g. histogram:price:0,50,100,200
group keys (--group-by):
  COL (a dimension) or COL:UNIT with UNIT one of hour day week month year
  day_of_week hour_of_day, e.g. --group-by last_review:month
filters (--where 'COL OP VALUE'; quote the whole spec):
  COL=V  COL!=V  COL<V  COL<=V  COL>V  COL>=V   (the rest of the text is one value:
                                                 'room_type=Entire home/apt')
  'COL in V1,V2'  'COL not in V1,V2'  'COL between LO HI'  'COL is null'  'COL is not null'
  values: int if they read as an integer, float if a finite number, else text;
  force a type with a prefix: 'zip=str:3000', 'flag=bool:true', 'n=float:2'
exit status: 0 quorum met; 4 quorum not met (outputs still written); 1 bad input
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``query`` command."""
    p = sub.add_parser(
        "query",
        help="ask the alliance one signed aggregate question",
        description="Fan one signed, policy-tagged aggregate query out to the alliance's "
        "cities (taken from a verified roster), show each city's status live, and print "
        "the combined answer with one line per city.",
        epilog=_SPEC_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    who = p.add_argument_group("alliance and analyst")
    who.add_argument(
        "--roster", required=True, metavar="FILE", help="the signed alliance roster file"
    )
    who.add_argument(
        "--pin",
        metavar="HEX",
        help="SHA-256 (64 hex digits) the roster body must have; without it the roster "
        "is trusted on its own threshold of signatures",
    )
    who.add_argument("--key", required=True, metavar="KEYFILE", help="your analyst key file")
    who.add_argument(
        "--as",
        dest="principal",
        metavar="PRINCIPAL",
        help="the analyst principal the key speaks for (default: the one the roster "
        "names with this key)",
    )
    secret = who.add_mutually_exclusive_group()
    secret.add_argument(
        "--passphrase-file",
        metavar="FILE",
        help="read the key file's passphrase from FILE (one trailing newline ignored)",
    )
    secret.add_argument(
        "--passphrase-env", metavar="VAR", help="read the key file's passphrase from variable VAR"
    )
    q = p.add_argument_group("the question")
    q.add_argument("--dataset", required=True, metavar="NAME", help="the dataset to ask about")
    q.add_argument(
        "--agg",
        required=True,
        action="append",
        metavar="SPEC",
        help="an aggregate, repeatable: count, mean:price, quantiles:price:0.5,0.9, ...",
    )
    q.add_argument(
        "--group-by",
        action="append",
        default=[],
        metavar="SPEC",
        help="a group key, repeatable: COL or COL:UNIT (e.g. last_review:month)",
    )
    q.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="SPEC",
        help="a filter 'COL OP VALUE', repeatable, all must hold (e.g. 'price>=100')",
    )
    q.add_argument(
        "--max-groups",
        type=int,
        default=1000,
        metavar="N",
        help="most groups one city may return (default 1000)",
    )
    pol = p.add_argument_group("policy (signed into every request)")
    pol.add_argument(
        "--purpose",
        required=True,
        metavar="TOKEN",
        help="why you ask: a purpose the roster allows you (e.g. research)",
    )
    pol.add_argument(
        "--legal-basis",
        default=DEFAULT_LEGAL_BASIS,
        metavar="TEXT",
        help=f"the legal basis for the query (default: {DEFAULT_LEGAL_BASIS!r})",
    )
    pol.add_argument(
        "--scope",
        choices=("alliance", "public"),
        default="alliance",
        help="who may see the result (default: alliance)",
    )
    run = p.add_argument_group("fan-out")
    run.add_argument(
        "--cities",
        metavar="A,B,C",
        help="comma-separated city ids to ask (default: every answering member)",
    )
    run.add_argument(
        "--quorum",
        type=int,
        metavar="N",
        help="how many cities must answer for a combined result (default: all asked)",
    )
    run.add_argument(
        "--deadline",
        type=float,
        default=DEFAULT_DEADLINE_S,
        metavar="SECONDS",
        help=f"time budget for the whole fan-out (default: {DEFAULT_DEADLINE_S:g})",
    )
    out = p.add_argument_group("output")
    out.add_argument(
        "--out",
        metavar="BUNDLE",
        help="write the evidence bundle here (check it with: hansa verify BUNDLE)",
    )
    fmt = out.add_mutually_exclusive_group()
    fmt.add_argument(
        "--json",
        action="store_true",
        help="print the result as JSON on standard output (no tables, no live display)",
    )
    fmt.add_argument(
        "--csv",
        action="store_true",
        help="print the combined rows as CSV on standard output (no tables, no live display)",
    )
    out.add_argument(
        "--chart",
        metavar="FILE.png",
        help="write a per-city comparison bar chart of the first aggregate "
        "(grouped by the first group key) as PNG",
    )
    p.set_defaults(handler=_query)


def _passphrase(args: argparse.Namespace) -> bytes | None:
    if not is_encrypted(args.key):
        return None
    if args.passphrase_file is not None:
        with Path(args.passphrase_file).open("rb") as fh:
            data = fh.read(_MAX_PASSPHRASE + 1)
        if len(data) > _MAX_PASSPHRASE:
            raise ConfigError(f"passphrase file {args.passphrase_file} is too large")
        return data.removesuffix(b"\n").removesuffix(b"\r")
    if args.passphrase_env is not None:
        value = os.environ.get(args.passphrase_env)
        if not value:
            raise ConfigError(f"environment variable {args.passphrase_env} is not set or empty")
        return value.encode("utf-8", "surrogateescape")
    if sys.stdin.isatty():
        return getpass.getpass(f"Passphrase for {args.key}: ").encode("utf-8", "surrogateescape")
    raise ConfigError(f"{args.key} is encrypted; use --passphrase-file or --passphrase-env")


def _cities(text: str | None) -> list[str] | None:
    if text is None:
        return None
    cities = [c.strip() for c in text.split(",") if c.strip()]
    if not cities:
        raise ConfigError("--cities needs at least one city id")
    return cities


class _LiveStatus:
    """The per-city table shown while the fan-out runs (updated from ``on_status``)."""

    def __init__(self, cities: Sequence[str]) -> None:
        self.results: dict[str, CityResult | None] = dict.fromkeys(cities)
        self.live: Live | None = None

    def table(self) -> Table:
        done = sum(r is not None for r in self.results.values())
        table = Table(title=f"asking {len(self.results)} cities: {done} done")
        for column in ("city", "status", "latency"):
            table.add_column(column)
        table.add_column("detail", no_wrap=True, overflow="ellipsis", max_width=60)
        for city, result in self.results.items():
            if result is None:
                table.add_row(escape(city), "[dim]waiting…[/dim]", "", "")
                continue
            style = _STATUS_STYLE.get(result.status, "")
            table.add_row(
                escape(city),
                f"[{style}]{result.status.value}[/{style}]",
                f"{result.latency_ms:.0f} ms",
                escape(result.detail[:60]),
            )
        return table

    def update(self, result: CityResult) -> None:
        self.results[result.city] = result
        if self.live is not None:
            self.live.update(self.table())


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return " ".join(map(str, value)) or "-"
    return str(value)


def _print_tables(console: Console, result: QueryResult) -> None:
    if result.combined is not None:
        combined = Table(title=f"combined: {result.query.dataset}")
        for column in result.columns:
            combined.add_column(escape(column))
        for record in result.to_records():
            combined.add_row(*(escape(_cell(v)) for v in record.values()))
        console.print(combined)
    cities = Table(title="cities")
    for column in ("city", "status", "code", "latency", "cells", "suppressed"):
        cities.add_column(column)
    cities.add_column("detail", no_wrap=True, overflow="ellipsis", max_width=60)
    for line in result.city_summary():
        status = CityStatus(str(line["status"]))
        style = _STATUS_STYLE.get(status, "")
        cities.add_row(
            escape(str(line["city"])),
            f"[{style}]{status.value}[/{style}]",
            escape(_cell(line["code"])),
            f"{line['latency_ms']} ms",
            _cell(line["cells"]),
            _cell(line["suppressed"]),
            escape(str(line["detail"])[:100]),
        )
    console.print(cities)
    answered = sum(s is CityStatus.ANSWERED for s in result.statuses.values())
    if result.quorum_met:
        console.print(
            f"[bold green]quorum met[/bold green]: {answered} of {len(result.cities)} "
            f"cities answered (quorum {result.fanout.quorum})"
        )
    else:
        console.print(f"[bold red]no combined result[/bold red]: {escape(result.reason or '')}")


def _query(args: argparse.Namespace) -> int:
    key = read_key_file(args.key, passphrase=_passphrase(args))
    alliance = Alliance.from_roster(
        read_roster_file(args.roster), key, principal=args.principal, pin=args.pin
    )
    cities = _cities(args.cities)
    machine = args.json or args.csv
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    targets = [t.city for t in alliance.targets(cities)]
    live_status = _LiveStatus(targets)

    async def run() -> QueryResult:
        return await alliance.query(
            args.dataset,
            list(args.agg),
            group_by=list(args.group_by),
            filters=list(args.where),
            purpose=args.purpose,
            legal_basis=args.legal_basis,
            scope=args.scope,
            cities=targets,
            quorum=args.quorum,
            deadline_s=args.deadline,
            max_groups=args.max_groups,
            on_status=live_status.update,
        )

    if not machine and sys.stdout.isatty():
        with Live(live_status.table(), console=console, refresh_per_second=10) as live:
            live_status.live = live
            result = asyncio.run(run())
            live.update(live_status.table())
    else:
        result = asyncio.run(run())
    if args.out:
        Path(args.out).write_bytes(result.bundle())
    charted = False
    if args.chart:
        if result.per_city:
            result.save_chart(args.chart)
            charted = True
        else:
            print("hansa: no chart written: no city answered", file=sys.stderr)
    if args.json:
        sys.stdout.write(result.to_json() + "\n")
    elif args.csv:
        sys.stdout.write(result.to_csv())
    else:
        _print_tables(console, result)
        if args.out:
            console.print(f"evidence bundle written to {escape(args.out)}")
        if charted:
            console.print(f"chart written to {escape(args.chart)}")
    if not result.quorum_met:
        if machine:
            print(f"hansa: {result.reason}", file=sys.stderr)
        return EXIT_QUORUM_NOT_MET
    return 0
