"""``hansa dataset`` add/list/show/remove through ``hansa.node.cli.main``."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from hansa.node.catalog import Catalog
from hansa.node.cli import EXIT_ERROR, EXIT_USAGE, main
from hansa.protocol.messages import ColumnRole

CSV = (
    "id,host_name,district,price,listed_on\n1,Ana,North,100,2021-01-02\n2,Ben,South,80,2021-02-03\n"
)


@pytest.fixture
def csv_file(tmp_path: Path) -> Path:
    path = tmp_path / "stays.csv"
    path.write_text(CSV)
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_add_list_show_remove(
    tmp_path: Path, csv_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = str(tmp_path / "node")
    code, out, _ = run(
        capsys,
        "dataset",
        "add",
        "stays",
        str(csv_file),
        "--data-dir",
        data,
        "--role",
        "price=hidden",
    )
    assert code == 0
    # The inferred schema is shown: every column with its type and role.
    for expected in ("id", "identifier", "host_name", "district", "dimension", "listed_on", "time"):
        assert expected in out
    assert "price" in out and "hidden" in out
    assert "datasets.toml" in out and "v1-" in out
    doc = tomllib.loads((tmp_path / "node" / "datasets.toml").read_text())
    assert doc["datasets"]["stays"]["columns"]["price"]["role"] == "hidden"

    code, out, _ = run(capsys, "dataset", "list", "--data-dir", data)
    assert code == 0 and "stays" in out and "v1-" in out

    code, out, _ = run(capsys, "dataset", "show", "stays", "--data-dir", data)
    assert code == 0
    assert "min group size k = 5" in out and str(csv_file) in out

    code, out, _ = run(
        capsys, "dataset", "add", "stays", str(csv_file), "--data-dir", data, "--append"
    )
    assert code == 0 and "v2-" in out and "appended" in out
    with Catalog(data, read_only=True) as catalog:
        assert catalog.get("stays").row_count == 4
        assert catalog.get("stays").column("price").role is ColumnRole.HIDDEN  # type: ignore[union-attr]

    code, out, _ = run(capsys, "dataset", "remove", "stays", "--data-dir", data)
    assert code == 0 and "removed" in out
    code, out, _ = run(capsys, "dataset", "list", "--data-dir", data)
    assert code == 0 and "no datasets" in out


def test_errors_are_one_line(
    tmp_path: Path, csv_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = str(tmp_path / "node")
    assert run(capsys, "dataset", "add", "stays", str(csv_file), "--data-dir", data)[0] == 0
    code, _, err = run(capsys, "dataset", "add", "stays", str(csv_file), "--data-dir", data)
    assert code == EXIT_ERROR and "already exists" in err and "Traceback" not in err
    code, _, err = run(capsys, "dataset", "show", "nope", "--data-dir", data)
    assert code == EXIT_ERROR and "no dataset named 'nope'" in err
    code, _, err = run(capsys, "dataset", "remove", "nope", "--data-dir", data)
    assert code == EXIT_ERROR and "does not exist" in err
    code, _, err = run(
        capsys,
        "dataset",
        "add",
        "x",
        str(csv_file),
        "--data-dir",
        data,
        "--role",
        "district=measure",
    )
    assert code == EXIT_ERROR and "does not fit" in err
    code, _, err = run(capsys, "dataset", "list", "--data-dir", str(tmp_path / "missing"))
    assert code == EXIT_ERROR and "no such data directory" in err
    code, _, err = run(
        capsys, "dataset", "add", "y", str(tmp_path / "nope.csv"), "--data-dir", data
    )
    assert code == EXIT_ERROR and "no such file" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["dataset", "add", "x", "f.csv", "--data-dir", "d", "--role", "price"],
        ["dataset", "add", "x", "f.csv", "--data-dir", "d", "--role", "price=metric"],
        ["dataset", "add", "x", "f.csv", "--data-dir", "d", "--replace", "--append"],
        ["dataset", "add", "x", "f.csv"],  # no --data-dir and no HANSA_DATA_DIR
        ["dataset"],
    ],
)
def test_usage_errors(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("HANSA_DATA_DIR", raising=False)
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == EXIT_USAGE
    capsys.readouterr()


def test_data_dir_from_environment(
    tmp_path: Path,
    csv_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("HANSA_DATA_DIR", str(tmp_path / "env-node"))
    assert run(capsys, "dataset", "add", "stays", str(csv_file))[0] == 0
    code, out, _ = run(capsys, "dataset", "list")
    assert code == 0 and "stays" in out


def test_synth_writes_listings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "l.csv"
    code, out, _ = run(capsys, "dataset", "synth", str(target), "--city", "austin", "--rows", "50")
    assert code == 0 and "50" in out
    assert target.read_text().splitlines()[0].startswith("id,name,host_id,host_name")
