"""The notebook client (:mod:`hansa.client`) against real nodes on 127.0.0.1.

A module-scoped alliance runs three city nodes (each in its own thread,
real HTTP) and names a fourth member whose endpoint is a closed port. The
roster is built with the nodes' real endpoints and keys, so the client takes
its targets from the roster exactly as an analyst would. Combined counts are
checked against a central count over the cities' CSV files.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import socket
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nodeutil import PURPOSE, Analyst, init_test_node, open_reply, threaded_node

from hansa.client import (
    Alliance,
    QueryResult,
    build_query,
    fetch_receipts,
    format_aggregate,
    format_filter,
    format_group_key,
    format_literal,
    parse_aggregate,
    parse_filter,
    parse_group_key,
    parse_literal,
    read_roster_file,
)
from hansa.crypto import PublicKey, SigningKey
from hansa.crypto.envelope import open_envelope
from hansa.crypto.keyfile import read_public_key, write_key_file
from hansa.crypto.note import NoteVerifier, open_checkpoint
from hansa.federation.combine import combine_answers
from hansa.federation.evidence import read_bundle, verify_bundle
from hansa.federation.fanout import CityStatus, Target, fan_out
from hansa.federation.roster import (
    Analyst as RosterAnalyst,
)
from hansa.federation.roster import (
    Member,
    Role,
    RootKey,
    Roster,
    SignedRoster,
    encode_signed_roster,
    roster_digest,
    sign_roster,
    unsigned,
)
from hansa.node.app import ROSTER_MEDIA_TYPE, ROSTER_ROUTE
from hansa.node.config import configure_alliance
from hansa.protocol.codec import decode_as
from hansa.protocol.envelope import decode_envelope
from hansa.protocol.errors import (
    ConfigError,
    ErrorCode,
    FreshnessError,
    HansaError,
    PolicyDenied,
    QueryError,
    SignatureError,
)
from hansa.protocol.messages import (
    Aggregate,
    AuditOp,
    AuditResponse,
    Count,
    Dimension,
    Filter,
    FilterOp,
    GroupKey,
    Histogram,
    Max,
    Mean,
    Min,
    PolicyTags,
    Quantiles,
    QueryAnswer,
    QueryRequest,
    ResultScope,
    Stddev,
    Sum,
    TimeBucket,
    TimeUnit,
    Variance,
)

ANSWERING = ("amsterdam", "berlin", "copenhagen")
GONE = "dublin"
CITIES = (*ANSWERING, GONE)
ANALYST = "ana@amsterdam"
ROWS = 300


@dataclass(frozen=True)
class Fixture:
    """The running alliance and the files an analyst holds."""

    root: Path
    roster_file: Path
    key_file: Path
    signed_roster: SignedRoster
    analyst: Analyst
    csv_files: dict[str, Path]


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def build_roster(
    endpoints: dict[str, str],
    node_keys: dict[str, bytes],
    analyst_key: bytes,
    *,
    expires_ms: int | None = None,
    version: int = 1,
    log_keys: dict[str, bytes] | None = None,
) -> SignedRoster:
    """A roster of :data:`CITIES` (threshold 2 of 2 root keys), signed by both roots."""
    roots = [SigningKey(bytes([0x50 + i]) * 32) for i in range(2)]
    roster = Roster(
        alliance="hanse",
        version=version,
        expires_ms=time.time_ns() // 1_000_000 + 86_400_000 if expires_ms is None else expires_ms,
        threshold=2,
        root_keys=tuple(RootKey(CITIES[i], k.public_key.raw) for i, k in enumerate(roots)),
        members=tuple(
            Member(
                city=city,
                name=city.title(),
                public_key=node_keys[city],
                endpoint=endpoints[city],
                roles=(Role.MEMBER,),
                log_key=(log_keys or {}).get(city),
            )
            for city in CITIES
        ),
        analysts=(RosterAnalyst(ANALYST, analyst_key, "amsterdam", (PURPOSE,)),),
        purposes=(PURPOSE, "planning"),
    )
    signed = unsigned(roster)
    for key in roots:
        signed = sign_roster(signed, key)
    return signed


@contextlib.contextmanager
def running_alliance(root: Path) -> Iterator[Fixture]:
    """Three answering nodes, one member that is down, and the analyst's files."""
    analyst = Analyst.create(ANALYST, seed=b"\x61" * 32)
    configs = {
        city: init_test_node(root, city, analysts=[analyst], rows=ROWS, seed=i + 7)
        for i, city in enumerate(CITIES)
    }
    node_keys = {city: read_public_key(cfg.key_file).raw for city, cfg in configs.items()}
    with contextlib.ExitStack() as stack:
        endpoints = {
            city: stack.enter_context(threaded_node(configs[city])).url for city in ANSWERING
        }
        endpoints[GONE] = f"http://127.0.0.1:{closed_port()}"
        signed = build_roster(endpoints, node_keys, analyst.key.public_key.raw)
        roster_file = root / "alliance.roster"
        roster_file.write_bytes(encode_signed_roster(signed))
        key_file = root / "ana.key"
        write_key_file(key_file, analyst.key)
        yield Fixture(
            root=root,
            roster_file=roster_file,
            key_file=key_file,
            signed_roster=signed,
            analyst=analyst,
            csv_files={city: root / f"{city}-listings.csv" for city in CITIES},
        )


@pytest.fixture(scope="module")
def alliance_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fixture]:
    with running_alliance(tmp_path_factory.mktemp("client")) as fixture:
        yield fixture


@pytest.fixture
def alliance(alliance_files: Fixture) -> Alliance:
    return Alliance.load(alliance_files.roster_file, alliance_files.key_file)


def central_counts(files: Sequence[Path], column: str) -> Counter[str]:
    """Rows per value of ``column`` over the given CSV files (the central computation)."""
    counts: Counter[str] = Counter()
    for path in files:
        with path.open(newline="", encoding="utf-8") as fh:
            counts.update(row[column] for row in csv.DictReader(fh))
    return counts


def check_counts_match_central(result: QueryResult, fixture: Fixture) -> None:
    """Every released cell's count is the central count over its contributors' files."""
    assert result.combined is not None
    released = [row for row in result.combined.rows if row.released]
    assert released
    for row in released:
        expected = central_counts([fixture.csv_files[c] for c in row.contributors], "room_type")
        assert row.values[0] == expected[str(row.key[0])], row


# --- the client against real nodes ------------------------------------------------------


async def test_query_combines_the_verified_answers_of_every_member(
    alliance: Alliance, alliance_files: Fixture
) -> None:
    seen: list[str] = []
    result = await alliance.query(
        "listings",
        ["count", "mean:price"],
        group_by="room_type",
        purpose=PURPOSE,
        cities=ANSWERING,
        deadline_s=20,
        on_status=lambda r: seen.append(r.city),
    )
    assert result.quorum_met and sorted(seen) == sorted(ANSWERING)
    assert result.statuses == dict.fromkeys(ANSWERING, CityStatus.ANSWERED)
    # Re-verify every reply independently with the node keys from the roster file.
    roster = alliance.roster
    answers = []
    for city in result.cities:
        member = roster.member(city.city)
        assert member is not None and city.reply is not None
        reply = open_reply(200, city.reply, PublicKey(member.public_key))
        assert isinstance(reply, QueryAnswer)
        answers.append(reply)
    assert result.combined == combine_answers(result.query, answers)
    check_counts_match_central(result, alliance_files)
    # Each city's own rows are its own central counts.
    for name in ANSWERING:
        own = central_counts([alliance_files.csv_files[name]], "room_type")
        for row in result.per_city[name].rows:
            if row.released:
                assert row.values[0] == own[str(row.key[0])]


async def test_requests_carry_the_roster_version_targets_and_endpoints(
    alliance: Alliance,
) -> None:
    result = await alliance.query(
        "listings", "count", purpose=PURPOSE, cities=ANSWERING, quorum=2, deadline_s=20
    )
    for city in result.cities:
        request = decode_as(decode_envelope(city.request).payload, QueryRequest)
        assert request.roster_version == alliance.roster.version == 1
        assert request.targets == ANSWERING and request.quorum == 2
        assert request.requester == ANALYST
    assert len({city.request for city in result.cities}) == 1  # one request for all
    assert [t.endpoint for t in alliance.targets(ANSWERING)] == [
        m.endpoint for m in alliance.roster.members[: len(ANSWERING)]
    ]


async def test_default_targets_are_every_member_and_a_down_member_is_listed(
    alliance: Alliance, alliance_files: Fixture
) -> None:
    result = await alliance.query(
        "listings", "count", group_by="room_type", purpose=PURPOSE, quorum=3, deadline_s=20
    )
    assert result.fanout.targets == CITIES
    assert result.statuses[GONE] is CityStatus.UNREACHABLE
    assert result.quorum_met
    assert result.combined is not None and result.combined.cities == ANSWERING
    check_counts_match_central(result, alliance_files)
    assert verify_bundle(result.bundle()).ok


async def test_quorum_of_all_is_not_met_when_a_member_is_down(alliance: Alliance) -> None:
    result = await alliance.query("listings", "count", purpose=PURPOSE, deadline_s=20)
    assert not result.quorum_met and result.combined is None
    assert result.reason is not None and "quorum" in result.reason
    assert result.to_records() == []
    assert len(result.city_summary()) == len(CITIES)
    # The evidence of a failed quorum still verifies (every city is on record).
    assert verify_bundle(result.bundle()).ok


async def test_outputs_have_one_row_per_combined_row(alliance: Alliance) -> None:
    result = await alliance.query(
        "listings",
        ["count", "quantiles:price:0.5,0.9", "histogram:price:0,100,1000"],
        group_by=["room_type"],
        filters=["price>=1"],
        purpose=PURPOSE,
        cities=ANSWERING,
        deadline_s=20,
    )
    assert result.combined is not None
    records = result.to_records()
    assert len(records) == len(result.combined.rows)
    assert result.columns[:2] == ["room_type", "count"]
    assert "price:q0.5" in result.columns and "price:[100,1000]" in result.columns
    rows = list(csv.reader(result.to_csv().splitlines()))
    assert rows[0] == result.columns and len(rows) == len(records) + 1
    data = json.loads(result.to_json())
    assert data["filters"] == ["price>=1"] and data["quorum_met"] is True
    assert [c["city"] for c in data["cities"]] == list(ANSWERING)
    assert all(c["cells"] >= 1 for c in data["cities"])
    assert sorted(data["per_city"]) == sorted(ANSWERING)
    for record, row in zip(records, result.combined.rows, strict=True):
        assert record["count"] == row.values[0]
        assert record["contributors"] == list(row.contributors)


def test_query_sync_outside_and_inside_an_event_loop(alliance: Alliance) -> None:
    result = alliance.query_sync("listings", "count", purpose=PURPOSE, cities=ANSWERING)
    assert result.quorum_met

    async def inside() -> QueryResult:
        return alliance.query_sync("listings", "count", purpose=PURPOSE, cities=ANSWERING[:1])

    nested = asyncio.run(inside())
    assert nested.quorum_met and nested.fanout.targets == ANSWERING[:1]


def test_chart_writes_a_png(alliance: Alliance, tmp_path: Path) -> None:
    result = alliance.query_sync(
        "listings", "mean:price", group_by="room_type", purpose=PURPOSE, cities=ANSWERING
    )
    labels, series = result.chart_series()
    assert sorted(series) == sorted(ANSWERING)
    assert all(len(values) == len(labels) for values in series.values())
    target = tmp_path / "chart.png"
    result.save_chart(target)
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- refusals before anything is sent ---------------------------------------------------------


async def test_a_purpose_the_roster_does_not_allow_is_refused_locally(
    alliance: Alliance,
) -> None:
    with pytest.raises(PolicyDenied, match="planning"):
        await alliance.query("listings", "count", purpose="planning")


async def test_unknown_cities_and_bad_specs_are_refused_locally(alliance: Alliance) -> None:
    with pytest.raises(ConfigError, match="oslo"):
        await alliance.query("listings", "count", purpose=PURPOSE, cities=["oslo"])
    with pytest.raises(ConfigError, match="twice"):
        await alliance.query("listings", "count", purpose=PURPOSE, cities=["berlin", "berlin"])
    with pytest.raises(QueryError, match="median"):
        await alliance.query("listings", "median:price", purpose=PURPOSE)
    with pytest.raises(QueryError, match="identifier"):
        await alliance.query("2listings", "count", purpose=PURPOSE)
    with pytest.raises(ConfigError, match="scope"):
        await alliance.query("listings", "count", purpose=PURPOSE, scope="everyone")


def test_roster_pin_principal_and_expiry_are_checked(alliance_files: Fixture) -> None:
    signed = alliance_files.signed_roster
    key = alliance_files.analyst.key
    good = roster_digest(signed)
    assert Alliance.from_roster(signed, key, pin=good.hex()).principal == ANALYST
    with pytest.raises(SignatureError):
        Alliance.from_roster(signed, key, pin=bytes(32))
    with pytest.raises(ConfigError, match="pin"):
        Alliance.from_roster(signed, key, pin="abc")
    with pytest.raises(ConfigError, match="bob@berlin"):
        Alliance.from_roster(signed, key, principal="bob@berlin")
    with pytest.raises(ConfigError, match="no analyst"):
        Alliance.from_roster(signed, SigningKey(b"\x77" * 32))
    roster = read_roster_file(alliance_files.roster_file)
    assert roster == signed
    with pytest.raises(FreshnessError):
        Alliance.from_roster(signed, key, now_ms=2**52)


def test_a_file_that_is_not_a_roster_is_one_clear_error(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.roster"
    bogus.write_bytes(b"\x93\x01\x02\x03")
    with pytest.raises(HansaError, match="not a roster file"):
        read_roster_file(bogus)


# --- spec strings -----------------------------------------------------------------------------

identifiers = st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,15}", fullmatch=True)
finite = st.floats(allow_nan=False, allow_infinity=False)
# Strings the grammar can carry: no surrounding blanks (values are stripped);
# inside in/between lists no commas either (commas separate the values).
plain_text = st.text(min_size=0, max_size=20).filter(lambda s: s == s.strip())
list_text = plain_text.filter(lambda s: "," not in s)
scalars = st.one_of(st.booleans(), st.integers(-(2**63), 2**64 - 1), finite, plain_text)
list_scalars = st.one_of(st.booleans(), st.integers(-(2**63), 2**64 - 1), finite, list_text)


@st.composite
def aggregates(draw: st.DrawFn) -> Aggregate:
    column = draw(identifiers)
    kind = draw(st.sampled_from(["count", "count_col", "col", "quantiles", "histogram"]))
    if kind == "count":
        return Count()
    if kind == "count_col":
        return Count(column)
    if kind == "col":
        makers: list[Callable[[str], Aggregate]] = [Sum, Mean, Min, Max, Variance, Stddev]
        return draw(st.sampled_from(makers))(column)
    if kind == "quantiles":
        ranks = draw(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=5))
        return Quantiles(column, tuple(ranks))
    edges = draw(st.lists(finite, min_size=2, max_size=6, unique=True))
    return Histogram(column, tuple(sorted(edges)))


@st.composite
def filters(draw: st.DrawFn) -> Filter:
    column = draw(identifiers)
    op = draw(st.sampled_from(list(FilterOp)))
    if op in (FilterOp.IS_NULL, FilterOp.NOT_NULL):
        return Filter(column, op)
    if op is FilterOp.BETWEEN:
        return Filter(column, op, (draw(list_scalars), draw(list_scalars)))
    if op in (FilterOp.IN, FilterOp.NOT_IN):
        return Filter(column, op, tuple(draw(st.lists(list_scalars, min_size=1, max_size=4))))
    return Filter(column, op, (draw(scalars),))


group_keys: st.SearchStrategy[GroupKey] = st.one_of(
    identifiers.map(Dimension),
    st.builds(TimeBucket, identifiers, st.sampled_from(list(TimeUnit))),
)


def typed(values: Sequence[object]) -> list[tuple[type, object]]:
    return [(type(v), v) for v in values]


@given(scalars)
def test_literal_round_trip_keeps_the_type(value: bool | int | float | str) -> None:
    back = parse_literal(format_literal(value))
    assert type(back) is type(value) and back == value


@given(aggregates())
def test_aggregate_spec_round_trip(aggregate: Aggregate) -> None:
    assert parse_aggregate(format_aggregate(aggregate)) == aggregate


@given(filters())
def test_filter_spec_round_trip(flt: Filter) -> None:
    back = parse_filter(format_filter(flt))
    assert back.column == flt.column and back.op is flt.op
    assert typed(back.values) == typed(flt.values)


@given(group_keys)
def test_group_key_spec_round_trip(key: GroupKey) -> None:
    assert parse_group_key(format_group_key(key)) == key


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("room_type=Entire home/apt", Filter("room_type", FilterOp.EQ, ("Entire home/apt",))),
        ("price>=100", Filter("price", FilterOp.GE, (100,))),
        ("price < 99.5", Filter("price", FilterOp.LT, (99.5,))),
        ("price between 50 100", Filter("price", FilterOp.BETWEEN, (50, 100))),
        ("price BETWEEN 50,100", Filter("price", FilterOp.BETWEEN, (50, 100))),
        ("zip=str:3000", Filter("zip", FilterOp.EQ, ("3000",))),
        ("zip!=3000", Filter("zip", FilterOp.NE, (3000,))),
        ("hood in Centrum,Noord", Filter("hood", FilterOp.IN, ("Centrum", "Noord"))),
        ("hood not in Oost", Filter("hood", FilterOp.NOT_IN, ("Oost",))),
        ("last_review is null", Filter("last_review", FilterOp.IS_NULL)),
        ("last_review is not null", Filter("last_review", FilterOp.NOT_NULL)),
        ("flag=bool:true", Filter("flag", FilterOp.EQ, (True,))),
        ("n=float:2", Filter("n", FilterOp.EQ, (2.0,))),
        ("name=nan", Filter("name", FilterOp.EQ, ("nan",))),
    ],
)
def test_documented_filter_examples(spec: str, expected: Filter) -> None:
    got = parse_filter(spec)
    assert got == expected and typed(got.values) == typed(expected.values)


def test_documented_aggregate_and_group_examples() -> None:
    assert parse_aggregate("mean:price") == Mean("price")
    assert parse_aggregate("quantiles:price:0.5,0.9") == Quantiles("price", (0.5, 0.9))
    assert parse_aggregate("histogram:price:0,50,100,200") == Histogram(
        "price", (0.0, 50.0, 100.0, 200.0)
    )
    assert parse_group_key("last_review:month") == TimeBucket("last_review", TimeUnit.MONTH)
    query = build_query("listings", "count", group_by="neighbourhood", filters="price>1")
    assert query.group_by == (Dimension("neighbourhood"),)


@pytest.mark.parametrize(
    ("parse", "spec"),
    [
        (parse_aggregate, "median:price"),
        (parse_aggregate, "mean"),
        (parse_aggregate, "mean:price:3"),
        (parse_aggregate, "count:1col"),
        (parse_aggregate, "quantiles:price"),
        (parse_aggregate, "quantiles:price:1.5"),
        (parse_aggregate, "quantiles:price:a,b"),
        (parse_aggregate, "histogram:price:5"),
        (parse_aggregate, "histogram:price:5,1"),
        (parse_aggregate, "histogram:price:0,inf"),
        (parse_aggregate, "x" * 5000),
        (parse_group_key, "last_review:fortnight"),
        (parse_group_key, "bad column"),
        (parse_group_key, ""),
        (parse_filter, "price"),
        (parse_filter, "price>="),
        (parse_filter, "price between 1"),
        (parse_filter, "price between 1 2 3"),
        (parse_filter, "price in"),
        (parse_filter, "x is null 3"),
        (parse_filter, "n=int:abc"),
        (parse_filter, "flag=bool:maybe"),
        (parse_filter, "n=float:nan"),
        (parse_filter, "2col=1"),
    ],
)
def test_bad_specs_are_one_line_query_errors(parse: object, spec: str) -> None:
    assert callable(parse)
    with pytest.raises(QueryError) as info:
        parse(spec)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400


@given(st.text(max_size=60))
def test_any_text_parses_or_fails_cleanly(text: str) -> None:
    for parse in (parse_aggregate, parse_filter, parse_group_key):
        try:
            parse(text)
        except QueryError:
            pass


@pytest.mark.parametrize(
    "flt",
    [
        Filter("a", FilterOp.EQ, ("",)),
        Filter("a", FilterOp.LT, ("=b",)),
        Filter("a", FilterOp.GT, ("=",)),
        Filter("a", FilterOp.NE, ("<x",)),
        Filter("a", FilterOp.EQ, ("str:x",)),
        Filter("a", FilterOp.EQ, ("12",)),
        Filter("a", FilterOp.EQ, ("1e5",)),
        Filter("a", FilterOp.IN, ("", "in", "between")),
        Filter("a", FilterOp.BETWEEN, ("x y", "z")),
    ],
)
def test_tricky_values_round_trip(flt: Filter) -> None:
    back = parse_filter(format_filter(flt))
    assert back == flt and typed(back.values) == typed(flt.values)


def test_cities_may_be_one_comma_separated_string(alliance: Alliance) -> None:
    assert [t.city for t in alliance.targets("berlin, amsterdam")] == ["berlin", "amsterdam"]
    result = alliance.query_sync("listings", "count", purpose=PURPOSE, cities="berlin")
    assert result.fanout.targets == ("berlin",) and result.quorum_met
    assert result.to_dict()["requester"] == ANALYST


# --- nodes that enforce the roster (spec §8.2) --------------------------------------------------


def post_roster(url: str, data: bytes) -> int:
    """POST a signed roster to a node's ``/v1/roster``; return the HTTP status."""
    request = urllib.request.Request(
        url + ROSTER_ROUTE, data=data, headers={"Content-Type": ROSTER_MEDIA_TYPE}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_nodes_enforcing_the_roster_answer_at_the_clients_roster_version(tmp_path: Path) -> None:
    # The nodes trust no key of their own: the roster is the only authority, and
    # each request's roster_version must be the node's current version. Version 1
    # names placeholder endpoints; once the nodes listen, version 2 names their
    # real endpoints and is installed at run time through POST /v1/roster.
    analyst = Analyst.create(ANALYST, seed=b"\x62" * 32)
    configs = {
        city: init_test_node(tmp_path, city, rows=ROWS, seed=i + 3) for i, city in enumerate(CITIES)
    }
    node_keys = {city: read_public_key(cfg.key_file).raw for city, cfg in configs.items()}
    placeholder = {city: f"http://127.0.0.1:{closed_port()}" for city in CITIES}
    v1 = build_roster(placeholder, node_keys, analyst.key.public_key.raw)
    v1_bytes = encode_signed_roster(v1)
    for city in ANSWERING:
        configs[city] = configure_alliance(
            configs[city].data_dir, v1_bytes, roster_digest(v1), time.time_ns() // 1_000_000
        )
    with contextlib.ExitStack() as stack:
        urls = {city: stack.enter_context(threaded_node(configs[city])).url for city in ANSWERING}
        v2 = build_roster({**placeholder, **urls}, node_keys, analyst.key.public_key.raw, version=2)
        for url in urls.values():
            assert post_roster(url, encode_signed_roster(v2)) == 200
        client = Alliance.from_roster(v2, analyst.key)
        result = client.query_sync(
            "listings", "count", group_by="room_type", purpose=PURPOSE, cities=ANSWERING
        )
        assert result.statuses == dict.fromkeys(ANSWERING, CityStatus.ANSWERED)
        assert result.combined is not None and result.combined.cities == ANSWERING
        assert verify_bundle(result.bundle(), trusted_roster=v1).ok
        # The nodes do enforce it: the same request signed for version 1 is refused.
        stale = asyncio.run(
            fan_out(
                result.query,
                PolicyTags(PURPOSE, "test suite", ResultScope.ALLIANCE, ANALYST),
                client.targets(ANSWERING[:1]),
                signer=analyst.key,
                requester=ANALYST,
                quorum=1,
                deadline_s=10,
                roster_version=1,
            )
        )
        refused = stale.cities[0]
        assert refused.status is CityStatus.REFUSED, refused
        assert refused.code is ErrorCode.ROSTER_MISMATCH


# --- receipts (issue 5, part 4) ----------------------------------------------------------


async def test_every_answering_city_is_asked_for_a_receipt(alliance: Alliance) -> None:
    result = await alliance.query(
        "listings", "count", group_by="room_type", purpose=PURPOSE, cities=ANSWERING, deadline_s=20
    )
    assert sorted(result.receipts) == sorted(ANSWERING)
    for city in ANSWERING:
        receipt = result.receipts[city]
        member = alliance.roster.member(city)
        assert member is not None and receipt.response is not None, receipt
        node_key = PublicKey(member.public_key)
        response = open_envelope(receipt.response, {node_key.key_id: node_key}, AuditResponse)
        reply = response.message
        assert (reply.op, reply.responder) == (AuditOp.RECEIPT, city)
        assert receipt.log_vkey is not None and receipt.origin is not None
        assert reply.checkpoint is not None
        checkpoint = open_checkpoint(
            reply.checkpoint, NoteVerifier.from_vkey(receipt.log_vkey), origin=receipt.origin
        ).checkpoint
        assert reply.index < reply.tree_size == checkpoint.size
        # The node returns the logged leaf (spec §16.4), so every receipt is fetched.
        assert receipt.status == "fetched", receipt
        assert len(reply.entries) == 1 and reply.first_index == reply.index
    verdict = verify_bundle(result.bundle())
    assert verdict.ok, verdict.failures
    assert verdict.receipts == len(ANSWERING)


async def test_receipts_can_be_skipped(alliance: Alliance) -> None:
    result = await alliance.query(
        "listings", "count", purpose=PURPOSE, cities=ANSWERING[:1], receipts=False
    )
    assert result.receipts == {}
    assert all(e.receipt is None for e in read_bundle(result.bundle()).cities)


async def test_receipt_failures_are_retried_a_bounded_number_of_times(
    alliance: Alliance,
) -> None:
    from aiohttp import web

    result = await alliance.query(
        "listings", "count", purpose=PURPOSE, cities=ANSWERING[:2], receipts=False
    )
    hits: list[str] = []

    async def busy(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(status=503)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", busy)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        member = alliance.roster.member(ANSWERING[0])
        assert member is not None
        key = PublicKey(member.public_key)
        targets = [
            Target(ANSWERING[0], f"http://127.0.0.1:{port}", key),
            Target(ANSWERING[1], f"http://127.0.0.1:{closed_port()}", key),
        ]
        receipts = await fetch_receipts(
            result.fanout,
            targets,
            signer=alliance.signer,
            requester=alliance.principal,
            roster_version=alliance.roster.version,
            attempts=3,
            backoff_s=0.01,
        )
    finally:
        await runner.cleanup()
    busy_receipt, gone_receipt = receipts[ANSWERING[0]], receipts[ANSWERING[1]]
    assert (busy_receipt.status, busy_receipt.attempts) == ("failed", 3)
    assert "503" in busy_receipt.detail and len(hits) == 3
    assert (gone_receipt.status, gone_receipt.attempts) == ("failed", 3)
    assert gone_receipt.response is None and gone_receipt.detail


async def test_receipts_hold_the_served_log_key_to_the_roster_s(alliance_files: Fixture) -> None:
    from hansa.federation.roster import decode_roster

    first, second = ANSWERING[:2]
    old = decode_roster(alliance_files.signed_roster.body)
    endpoints = {m.city: m.endpoint for m in old.members}
    node_keys = {m.city: m.public_key for m in old.members}
    real = read_public_key(alliance_files.root / first / "log.key").raw
    signed = build_roster(
        endpoints,
        node_keys,
        alliance_files.analyst.key.public_key.raw,
        log_keys={first: real, second: SigningKey(b"\x52" * 32).public_key.raw},
    )
    roster_file = alliance_files.root / "keyed.roster"
    roster_file.write_bytes(encode_signed_roster(signed))
    keyed = Alliance.load(roster_file, alliance_files.key_file)
    result = await keyed.query("listings", "count", purpose=PURPOSE, cities=(first, second))
    assert result.receipts[first].status == "fetched"
    lost = result.receipts[second]
    assert lost.status == "failed" and "other than the roster's" in lost.detail
    assert lost.log_vkey is not None and lost.response is None  # what the node served
    verdict = verify_bundle(result.bundle())
    assert not verdict.ok
    assert [f for f in verdict.failures if "receipt log key" in f] == [
        f for f in verdict.failures if f.startswith(second)
    ]
    assert verdict.receipts == 1
    assert not any("TOFU" in n for n in verdict.notes)
