"""``hansa query`` end to end: real nodes on 127.0.0.1, run through ``hansa.node.cli.main``.

The alliance (three answering nodes and a member that is down) comes from
:func:`test_client.running_alliance`; the command reads the same roster and
key files an analyst would hold.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from nodeutil import PURPOSE
from rich.console import Console
from test_client import ANSWERING, GONE, Fixture, central_counts, running_alliance

from hansa.crypto.keyfile import MIN_MEMLIMIT, MIN_OPSLIMIT, write_key_file
from hansa.federation.evidence import read_bundle
from hansa.federation.fanout import CityResult, CityStatus
from hansa.federation.roster import roster_digest
from hansa.node._cli_query import EXIT_QUORUM_NOT_MET, _LiveStatus
from hansa.node.cli import EXIT_ERROR, build_parser, main
from hansa.protocol.errors import ErrorCode


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fixture]:
    with running_alliance(tmp_path_factory.mktemp("cli-query")) as fixture:
        yield fixture


def base(files: Fixture, *extra: str) -> list[str]:
    return [
        "query",
        "--roster",
        str(files.roster_file),
        "--key",
        str(files.key_file),
        "--dataset",
        "listings",
        "--purpose",
        PURPOSE,
        "--deadline",
        "20",
        *extra,
    ]


ANSWERING_ONLY = ("--cities", ",".join(ANSWERING))


def run(capsys: pytest.CaptureFixture[str], argv: list[str], expected: int = 0) -> tuple[str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == expected, (code, out, err)
    return out, err


def test_json_output_is_the_combined_answer(
    files: Fixture, capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = run(
        capsys,
        base(
            files,
            *ANSWERING_ONLY,
            "--agg",
            "count",
            "--agg",
            "mean:price",
            "--group-by",
            "room_type",
            "--json",
        ),
    )
    data = json.loads(out)
    assert data["quorum_met"] is True
    assert data["aggregates"] == ["count", "mean:price"] and data["group_by"] == ["room_type"]
    assert {c["city"]: c["status"] for c in data["cities"]} == dict.fromkeys(ANSWERING, "answered")
    assert data["quorum"] == len(ANSWERING) and sorted(data["per_city"]) == sorted(ANSWERING)
    for record in data["combined"]:
        if record["contributors"]:
            files_used = [files.csv_files[c] for c in record["contributors"]]
            assert record["count"] == central_counts(files_used, "room_type")[record["room_type"]]


def test_default_quorum_of_all_members_fails_with_a_member_down(
    files: Fixture, capsys: pytest.CaptureFixture[str]
) -> None:
    out, err = run(capsys, base(files, "--agg", "count", "--json"), EXIT_QUORUM_NOT_MET)
    data = json.loads(out)
    assert data["quorum_met"] is False and data["combined"] == []
    assert "quorum" in err and err.count("\n") == 1


def test_explicit_quorum_over_the_members_that_answer(
    files: Fixture, capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = run(
        capsys, base(files, "--agg", "count", "--group-by", "room_type", "--quorum", "3", "--json")
    )
    data = json.loads(out)
    assert data["quorum_met"] is True and data["quorum"] == 3
    assert {c["city"]: c["status"] for c in data["cities"]} == {
        **dict.fromkeys(ANSWERING, "answered"),
        GONE: "unreachable",
    }
    for record in data["combined"]:
        if record["contributors"]:
            files_used = [files.csv_files[c] for c in record["contributors"]]
            assert record["count"] == central_counts(files_used, "room_type")[record["room_type"]]


def test_csv_output_has_a_header_and_one_line_per_row(
    files: Fixture, capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = run(
        capsys,
        base(
            files,
            *ANSWERING_ONLY,
            "--agg",
            "count",
            "--agg",
            "quantiles:price:0.5,0.9",
            "--group-by",
            "room_type",
            "--where",
            "price>=1",
            "--csv",
        ),
    )
    rows = list(csv.reader(out.splitlines()))
    assert rows[0] == [
        "room_type",
        "count",
        "price:q0.5",
        "price:q0.9",
        "contributors",
        "suppressed_by",
    ]
    assert len(rows) >= 2
    for row in rows[1:]:
        assert int(row[1]) > 0 and set(row[4].split()) <= set(ANSWERING)


def test_out_bundle_verifies_with_hansa_verify(
    files: Fixture, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bundle = tmp_path / "evidence.hansa"
    out, _ = run(
        capsys,
        base(
            files,
            *ANSWERING_ONLY,
            "--agg",
            "count",
            "--group-by",
            "room_type",
            "--out",
            str(bundle),
        ),
    )
    assert "combined" in out and "quorum met" in out and "evidence bundle written" in out
    for city in ANSWERING:
        assert city in out
    decoded = read_bundle(bundle.read_bytes())
    assert decoded.targets == ANSWERING and decoded.quorum_met
    pin = roster_digest(files.signed_roster).hex()
    out, _ = run(capsys, ["verify", str(bundle), "--pin", pin])
    assert "VALID" in out and "INVALID" not in out
    # A flipped byte in the bundle is caught.
    data = bytearray(bundle.read_bytes())
    data[len(data) // 2] ^= 0x01
    bundle.write_bytes(bytes(data))
    assert main(["verify", str(bundle)]) != 0
    capsys.readouterr()


def test_quorum_failure_still_writes_the_bundle_and_exits_non_zero(
    files: Fixture, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bundle = tmp_path / "failed.hansa"
    out, _ = run(
        capsys,
        base(files, "--agg", "count", "--cities", f"berlin,{GONE}", "--out", str(bundle)),
        EXIT_QUORUM_NOT_MET,
    )
    assert "no combined result" in out and "unreachable" in out
    decoded = read_bundle(bundle.read_bytes())
    assert not decoded.quorum_met and decoded.targets == ("berlin", GONE)
    run(capsys, ["verify", str(bundle)])


def test_chart_writes_a_png(
    files: Fixture, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    chart = tmp_path / "chart.png"
    out, _ = run(
        capsys,
        base(
            files,
            *ANSWERING_ONLY,
            "--agg",
            "mean:price",
            "--group-by",
            "room_type",
            "--chart",
            str(chart),
        ),
    )
    assert "chart written" in out
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ungrouped = tmp_path / "ungrouped.png"
    run(capsys, base(files, *ANSWERING_ONLY, "--agg", "count", "--chart", str(ungrouped), "--json"))
    assert ungrouped.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (("--agg", "median:price"), "median"),
        (("--agg", "count", "--where", "price"), "filter"),
        (("--agg", "count", "--group-by", "last_review:fortnight"), "fortnight"),
        (("--agg", "count", "--cities", "oslo"), "oslo"),
        (("--agg", "count", "--quorum", "9"), "quorum"),
        (("--agg", "count", "--deadline", "0"), "deadline"),
        (("--agg", "count", "--pin", "00" * 32), "pin"),
    ],
)
def test_bad_input_is_one_line_on_stderr(
    files: Fixture, capsys: pytest.CaptureFixture[str], extra: tuple[str, ...], fragment: str
) -> None:
    out, err = run(capsys, base(files, *extra), EXIT_ERROR)
    assert out == "" and err.count("\n") == 1 and err.startswith("hansa: error:")
    assert fragment in err.lower()


def test_another_purpose_is_refused_before_sending(
    files: Fixture, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = base(files, "--agg", "count")
    argv[argv.index(PURPOSE)] = "planning"
    _, err = run(capsys, argv, EXIT_ERROR)
    assert "PURPOSE_NOT_ALLOWED" in err


def test_missing_key_file_is_one_line(
    files: Fixture, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = base(files, "--agg", "count")
    argv[argv.index(str(files.key_file))] = str(tmp_path / "missing.key")
    _, err = run(capsys, argv, EXIT_ERROR)
    assert err.count("\n") == 1


def test_every_flag_is_documented() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    query = sub.choices["query"]  # type: ignore[index]
    flags = [a for a in query._actions if a.option_strings and a.dest != "help"]
    expected = {
        "--roster",
        "--key",
        "--as",
        "--dataset",
        "--agg",
        "--group-by",
        "--where",
        "--purpose",
        "--legal-basis",
        "--scope",
        "--cities",
        "--quorum",
        "--deadline",
        "--out",
        "--json",
        "--csv",
        "--chart",
        "--pin",
    }
    assert expected <= {s for a in flags for s in a.option_strings}
    assert all(a.help for a in flags)


def test_sealed_key_file_reads_its_passphrase_from_the_environment(
    files: Fixture,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sealed = tmp_path / "sealed.key"
    write_key_file(
        sealed,
        files.analyst.key,
        passphrase=b"open sesame",
        opslimit=MIN_OPSLIMIT,
        memlimit=MIN_MEMLIMIT,
    )
    argv = base(files, *ANSWERING_ONLY, "--agg", "count", "--json")
    argv[argv.index(str(files.key_file))] = str(sealed)
    _, err = run(capsys, argv, EXIT_ERROR)
    assert "encrypted" in err and err.count("\n") == 1
    monkeypatch.setenv("HANSA_TEST_PASSPHRASE", "open sesame")
    out, _ = run(capsys, [*argv, "--passphrase-env", "HANSA_TEST_PASSPHRASE"])
    data = json.loads(out)
    assert data["quorum_met"] is True and data["requester"] == "ana@amsterdam"
    assert data["roster_version"] == 1 and data["alliance"] == "hanse"
    assert data["roster_digest"] == roster_digest(files.signed_roster).hex()
    monkeypatch.setenv("HANSA_TEST_PASSPHRASE", "wrong")
    _, err = run(capsys, [*argv, "--passphrase-env", "HANSA_TEST_PASSPHRASE"], EXIT_ERROR)
    assert "KEY_FILE" in err


def test_live_status_table_shows_each_city_as_it_arrives() -> None:
    live = _LiveStatus(["amsterdam", "berlin"])

    def render() -> str:
        console = Console(record=True, width=120)
        console.print(live.table())
        return console.export_text()

    first = render()
    assert "0 done" in first and first.count("waiting") == 2
    live.update(
        CityResult(
            city="berlin",
            status=CityStatus.REFUSED,
            code=ErrorCode.PURPOSE_NOT_ALLOWED,
            reply=None,
            request=b"x",
            latency_ms=12.0,
            detail="PURPOSE_NOT_ALLOWED: no",
        )
    )
    second = render()
    assert "1 done" in second and second.count("waiting") == 1
    assert "refused" in second and "12 ms" in second
