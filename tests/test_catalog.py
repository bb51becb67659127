"""The dataset catalog: loading, versions, atomicity, roles and the editable TOML."""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hansa.node.catalog import (
    AggregateKind,
    Catalog,
    infer_role,
    sanitize_column_names,
)
from hansa.node.synthetic import LISTING_COLUMNS, default_listing_roles, write_listings_csv
from hansa.protocol.errors import ConfigError, ErrorCode, QueryError
from hansa.protocol.messages import ColumnRole, ColumnType

VERSION_RE = re.compile(r"^v(\d+)-[0-9a-f]{12}$")

CSV = (
    "id,name,host_id,district,price,rating,listed_on,seen_at,active\n"
    "1,Alpha,10,North,100,4.5,2021-01-02,2021-01-02 10:00:00,true\n"
    "2,Beta,10,North,200,3.5,2021-02-03,2021-02-03 11:30:00,false\n"
    "3,Gamma,11,South,150,,2021-03-04,2021-03-04 23:59:59,true\n"
)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def rows_of(catalog: Catalog, name: str) -> list[tuple[object, ...]]:
    cur = catalog.cursor()
    try:
        return cur.execute(f'SELECT * FROM "{name}" ORDER BY ALL').fetchall()
    finally:
        cur.close()


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    cat = Catalog(tmp_path / "node")
    yield cat
    cat.close()


def test_add_infers_types_roles_and_writes_toml(catalog: Catalog, tmp_path: Path) -> None:
    spec = catalog.add("stays", write(tmp_path / "a.csv", CSV))
    got = {c.name: (c.type, c.role) for c in spec.columns}
    assert got == {
        "id": (ColumnType.INTEGER, ColumnRole.IDENTIFIER),
        "name": (ColumnType.TEXT, ColumnRole.HIDDEN),
        "host_id": (ColumnType.INTEGER, ColumnRole.IDENTIFIER),
        "district": (ColumnType.TEXT, ColumnRole.DIMENSION),
        "price": (ColumnType.INTEGER, ColumnRole.MEASURE),
        "rating": (ColumnType.FLOAT, ColumnRole.MEASURE),
        "listed_on": (ColumnType.DATE, ColumnRole.TIME),
        "seen_at": (ColumnType.TIMESTAMP, ColumnRole.TIME),
        "active": (ColumnType.BOOLEAN, ColumnRole.DIMENSION),
    }
    assert spec.row_count == 3
    m = VERSION_RE.match(spec.version)
    assert m and m.group(1) == "1"
    doc = tomllib.loads(catalog.toml_path.read_text())
    entry = doc["datasets"]["stays"]
    assert entry["columns"]["price"] == {"type": "integer", "role": "measure"}
    assert entry["disclosure"]["version"] == 1
    assert len(entry["disclosure"]["fingerprint"]) == 64
    assert catalog.get("stays") == spec
    assert [s.name for s in catalog.list()] == ["stays"]


def test_info_publishes_profile_without_hidden_columns(catalog: Catalog, tmp_path: Path) -> None:
    spec = catalog.add("stays", write(tmp_path / "a.csv", CSV))
    info = spec.info()
    names = [c.name for c in info.columns]
    assert "name" not in names and "price" in names
    profile = dict(info.disclosure.aggregates)
    assert profile["id"] == ("count",)
    assert "sum" in profile["price"] and "quantiles" in profile["price"]
    assert "name" not in profile
    assert info.disclosure.min_group_size == spec.disclosure.min_group_size
    assert info.version == spec.version


def test_same_file_same_version_and_reopen(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", CSV)
    with Catalog(tmp_path / "n1") as a, Catalog(tmp_path / "n2") as b:
        assert a.add("x", path).version == b.add("x", path).version
    with Catalog(tmp_path / "n1", read_only=True) as again:
        assert again.get("x").row_count == 3


def test_parquet_and_timestamptz_and_nan(tmp_path: Path) -> None:
    # `at` is an SQL keyword: loading must quote every identifier.
    src = tmp_path / "p.parquet"
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute(
        "COPY (SELECT * FROM (VALUES "
        "(1, TIMESTAMPTZ '2021-06-01 12:00:00+02', 'nan'::DOUBLE, 1.5::DECIMAL(6,2)), "
        "(2, TIMESTAMPTZ '2021-06-02 00:30:00-01', 2.0::DOUBLE, 2.25::DECIMAL(6,2))"
        ') v(k, "at", x, d)) TO \'' + str(src) + "' (FORMAT parquet)"
    )
    con.close()
    with Catalog(tmp_path / "n") as cat:
        spec = cat.add("p", src)
        types = {c.name: c.type for c in spec.columns}
        assert types == {
            "k": ColumnType.INTEGER,
            "at": ColumnType.TIMESTAMP,
            "x": ColumnType.FLOAT,
            "d": ColumnType.FLOAT,
        }
        rows = rows_of(cat, "p")
        assert str(rows[0][1]) == "2021-06-01 10:00:00"  # stored as naive UTC
        assert str(rows[1][1]) == "2021-06-02 01:30:00"
        assert rows[0][2] is None  # NaN becomes NULL
        assert rows[1][3] == 2.25


def test_create_twice_is_refused(catalog: Catalog, tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", CSV)
    catalog.add("stays", path)
    with pytest.raises(ConfigError, match="already exists"):
        catalog.add("stays", path)
    with pytest.raises(ConfigError, match="does not exist"):
        catalog.add("other", path, mode="replace")


def test_replace_keeps_roles_and_bumps_version(catalog: Catalog, tmp_path: Path) -> None:
    first = catalog.add(
        "stays", write(tmp_path / "a.csv", CSV), roles={"district": ColumnRole.HIDDEN}
    )
    more = CSV + "4,Delta,12,East,120,4.0,2021-04-05,2021-04-05 08:00:00,true\n"
    second = catalog.add("stays", write(tmp_path / "b.csv", more), mode="replace")
    assert second.row_count == 4
    assert second.version != first.version and second.version.startswith("v2-")
    assert second.column("district") is not None
    assert second.column("district").role is ColumnRole.HIDDEN  # type: ignore[union-attr]
    # Roles unchanged, so the disclosure version is unchanged.
    assert second.disclosure.version == first.disclosure.version


def test_append_adds_rows_and_chains_version(catalog: Catalog, tmp_path: Path) -> None:
    first = catalog.add("stays", write(tmp_path / "a.csv", CSV))
    extra = "id,name,host_id,district,price,rating,listed_on,seen_at,active\n"
    extra += "9,Zeta,19,West,90,5,2021-05-06,2021-05-06 09:00:00,false\n"
    second = catalog.add("stays", write(tmp_path / "b.csv", extra), mode="append")
    assert second.row_count == 4
    assert second.version.startswith("v2-") and second.version != first.version
    # rating was FLOAT, the new file's 5 is an integer: cast to the stored type.
    assert any(r[0] == 9 and r[5] == 5.0 for r in rows_of(catalog, "stays"))


def test_append_with_other_columns_leaves_data_intact(catalog: Catalog, tmp_path: Path) -> None:
    first = catalog.add("stays", write(tmp_path / "a.csv", CSV))
    with pytest.raises(ConfigError, match="cannot append"):
        catalog.add("stays", write(tmp_path / "b.csv", "id,other\n1,2\n"), mode="append")
    assert catalog.get("stays") == first
    assert len(rows_of(catalog, "stays")) == 3


def test_bad_file_leaves_old_data_and_version_intact(catalog: Catalog, tmp_path: Path) -> None:
    first = catalog.add("stays", write(tmp_path / "a.csv", CSV))
    before = rows_of(catalog, "stays")
    toml_before = catalog.toml_path.read_bytes()
    # Valid rows, then a byte sequence that is not UTF-8: the reader fails mid-file.
    header = CSV.split("\n")[0].encode()
    bad = tmp_path / "bad.csv"
    bad.write_bytes(header + b"\n" + CSV.encode().split(b"\n", 1)[1] + b"4,\xff\xfe,1,N,1,1,,,\n")
    corrupt = tmp_path / "bad.parquet"
    corrupt.write_bytes(b"PAR1 not really parquet")
    for path, mode in ((bad, "replace"), (bad, "append"), (corrupt, "replace")):
        with pytest.raises(ConfigError, match="stored data unchanged"):
            catalog.add("stays", path, mode=mode)  # type: ignore[arg-type]
        assert rows_of(catalog, "stays") == before
        assert catalog.get("stays").version == first.version
        assert catalog.toml_path.read_bytes() == toml_before
    # A value that does not fit the stored type on append fails the same way.
    wrong = "id,name,host_id,district,price,rating,listed_on,seen_at,active\n"
    wrong += "x1,Q,1,N,oops,1,2021-01-01,2021-01-01 00:00:00,true\n"
    with pytest.raises(ConfigError):
        catalog.add("stays", write(tmp_path / "w.csv", wrong), mode="append")
    assert rows_of(catalog, "stays") == before
    # And after reopening, still the old data and version.
    catalog.close()
    with Catalog(catalog.data_dir) as again:
        assert again.get("stays").version == first.version
        assert rows_of(again, "stays") == before


def test_unsupported_and_missing_files(catalog: Catalog, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unsupported file type"):
        catalog.add("x", write(tmp_path / "a.json", "{}"))
    with pytest.raises(ConfigError, match="no such file"):
        catalog.add("x", tmp_path / "missing.csv")
    with pytest.raises(ConfigError, match="invalid dataset name"):
        catalog.add("1bad", write(tmp_path / "a.csv", CSV))
    with pytest.raises(ConfigError, match="invalid dataset name"):
        catalog.add('x"; DROP TABLE y; --', write(tmp_path / "b.csv", CSV))


def test_role_overrides_are_validated(catalog: Catalog, tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", CSV)
    with pytest.raises(ConfigError, match="does not fit"):
        catalog.add("stays", path, roles={"district": ColumnRole.MEASURE})
    with pytest.raises(ConfigError, match="unknown column"):
        catalog.add("stays", path, roles={"nope": ColumnRole.HIDDEN})
    with pytest.raises(ConfigError, match="hidden"):
        catalog.add(
            "stays", path, roles={c: ColumnRole.HIDDEN for c in CSV.split("\n")[0].split(",")}
        )
    with pytest.raises(QueryError) as info:
        catalog.get("stays")  # nothing was stored by the failed adds
    assert info.value.code is ErrorCode.UNKNOWN_DATASET
    spec = catalog.add(
        "stays", path, roles={"price": ColumnRole.HIDDEN, "id": ColumnRole.DIMENSION}
    )
    assert spec.column("price").role is ColumnRole.HIDDEN  # type: ignore[union-attr]
    assert spec.column("id").role is ColumnRole.DIMENSION  # type: ignore[union-attr]


def test_operator_edit_and_reload(catalog: Catalog, tmp_path: Path) -> None:
    first = catalog.add("stays", write(tmp_path / "a.csv", CSV))
    text = catalog.toml_path.read_text()
    text = text.replace(
        'district = { type = "text", role = "dimension" }',
        'district = { type = "text", role = "hidden" }  # operator: too fine-grained',
    )
    text = re.sub(r"min_group_size = \d+", "min_group_size = 11", text)
    text = text.replace(
        'price = { type = "integer", role = "measure" }',
        'price = { type = "integer", role = "measure", aggregates = ["count", "sum"] }',
    )
    catalog.toml_path.write_text(text)
    catalog.reload()
    spec = catalog.get("stays")
    assert spec.column("district").role is ColumnRole.HIDDEN  # type: ignore[union-attr]
    assert spec.disclosure.min_group_size == 11
    assert spec.disclosure.allowed("price") == {AggregateKind.COUNT, AggregateKind.SUM}
    assert spec.disclosure.version == first.disclosure.version + 1
    assert spec.version == first.version  # the data did not change
    saved = catalog.toml_path.read_text()
    assert "# operator: too fine-grained" in saved  # the bump keeps the operator's lines
    # Reloading the unchanged file does not bump again.
    catalog.reload()
    assert catalog.get("stays").disclosure.version == spec.disclosure.version
    # configure() changes settings the same way.
    again = catalog.configure("stays", purposes=["audit"], dominance_p=50)
    assert again.disclosure.purposes == ("audit",)
    assert again.disclosure.dominance_p == 50.0
    assert again.disclosure.version == spec.disclosure.version + 1


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("min_group_size = 5", "min_group_size = 0", "min_group_size"),
        ("min_group_size = 5", "min_group_sise = 5", "unknown key"),
        ("max_groups = 1000", "max_groups = 1000000000", "max_groups"),
        ("dominance_p = 80.0", "dominance_p = 0", "dominance_p"),
        ("dominance_p = 80.0", 'dominance_p = "high"', "dominance_p"),
        ('purposes = ["planning"', 'purposes = ["Planning!"', "purpose token"),
        ('role = "measure" }', 'role = "metric" }', "unknown role"),
        ('district = { type = "text"', 'district = { type = "integer"', "does not match"),
        ('district = { type = "text", role = "dimension" }', "", "missing from the file"),
        ('listed_on = { type = "date", role = "time" }',
         'listed_on = { type = "date", role = "measure" }', "does not fit"),
        ('district = { type = "text", role = "dimension" }',
         'district = { type = "text", role = "dimension", aggregates = ["sum"] }',
         "not possible"),
        ("[datasets.stays]", "[datasets.stays", "not valid TOML"),
        ("format = 1", "format = 2", "unsupported format"),
        ("datasets.stays", "datasets.other", "no stored data"),
    ],
)  # fmt: skip
def test_invalid_toml_is_a_config_error(
    catalog: Catalog, tmp_path: Path, old: str, new: str, message: str
) -> None:
    catalog.add("stays", write(tmp_path / "a.csv", CSV))
    good = catalog.get("stays")
    text = catalog.toml_path.read_text()
    assert old in text
    catalog.toml_path.write_text(text.replace(old, new))
    with pytest.raises(ConfigError, match=message) as info:
        catalog.reload()
    assert info.value.code is ErrorCode.CONFIG
    assert catalog.get("stays") == good  # the old catalog stays in effect
    with pytest.raises(ConfigError):
        Catalog(catalog.data_dir, read_only=True)


def test_remove(catalog: Catalog, tmp_path: Path) -> None:
    catalog.add("stays", write(tmp_path / "a.csv", CSV))
    catalog.add("other", write(tmp_path / "b.csv", CSV))
    catalog.remove("stays")
    assert [s.name for s in catalog.list()] == ["other"]
    assert "stays" not in tomllib.loads(catalog.toml_path.read_text())["datasets"]
    cur = catalog.cursor()
    tables = {
        r[0] for r in cur.execute("SELECT table_name FROM information_schema.tables").fetchall()
    }
    cur.close()
    assert "stays" not in tables and "other" in tables
    with pytest.raises(ConfigError, match="does not exist"):
        catalog.remove("stays")
    # Re-adding starts a fresh history.
    assert catalog.add("stays", tmp_path / "a.csv").version.startswith("v1-")


def test_unregistered_table_is_not_published(catalog: Catalog, tmp_path: Path) -> None:
    catalog.add("stays", write(tmp_path / "a.csv", CSV))
    doc = catalog.toml_path.read_text()
    # Simulate a crash between the data commit and the TOML write of a create.
    catalog.toml_path.write_text(doc.split("[datasets.stays]")[0])
    catalog.reload()
    assert catalog.list() == []
    assert catalog.unregistered == ("stays",)
    with pytest.raises(ConfigError, match="already exists"):
        catalog.add("stays", tmp_path / "a.csv")
    assert catalog.add("stays", tmp_path / "a.csv", mode="replace").row_count == 3


def test_read_only_catalog(tmp_path: Path) -> None:
    with Catalog(tmp_path / "n") as cat:
        cat.add("stays", write(tmp_path / "a.csv", CSV))
    with Catalog(tmp_path / "n", read_only=True) as ro:
        assert ro.get("stays").row_count == 3
        with pytest.raises(ConfigError, match="read-only"):
            ro.add("x", tmp_path / "a.csv")
        with pytest.raises(ConfigError, match="read-only"):
            ro.remove("stays")
    with Catalog(tmp_path / "empty", read_only=True) as empty:
        assert empty.list() == []


def test_default_roles() -> None:
    assert infer_role("id", ColumnType.INTEGER) is ColumnRole.IDENTIFIER
    assert infer_role("host_id", ColumnType.INTEGER) is ColumnRole.IDENTIFIER
    assert infer_role("Unique_Key", ColumnType.INTEGER) is ColumnRole.IDENTIFIER
    assert infer_role("width", ColumnType.FLOAT) is ColumnRole.MEASURE  # "id" inside a word
    assert infer_role("valid", ColumnType.BOOLEAN) is ColumnRole.DIMENSION
    assert infer_role("host_name", ColumnType.TEXT) is ColumnRole.HIDDEN
    assert infer_role("email", ColumnType.TEXT) is ColumnRole.HIDDEN
    assert infer_role("created", ColumnType.TIMESTAMP) is ColumnRole.TIME
    assert infer_role("blob", ColumnType.TEXT, supported=False) is ColumnRole.HIDDEN


def test_sanitize_examples() -> None:
    raw = ["Start Time", "date.utc", "", "1st", "a", "A", "Größe", "x" * 80]
    assert sanitize_column_names(raw) == (
        "start_time",
        "date_utc",
        "column",
        "c_1st",
        "a",
        "a_2",
        "groe",
        "x" * 63,
    )


@given(st.lists(st.text(max_size=80), max_size=30))
def test_sanitized_names_are_unique_identifiers(raw: list[str]) -> None:
    names = sanitize_column_names(raw)
    assert len(names) == len(raw)
    assert len({n.lower() for n in names}) == len(names)
    assert all(re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,62}", n) for n in names)


def test_synthetic_listings_are_deterministic_and_load(tmp_path: Path) -> None:
    a = write_listings_csv(tmp_path / "a.csv", city="melbourne", rows=400, seed=7)
    b = write_listings_csv(tmp_path / "b.csv", city="melbourne", rows=400, seed=7)
    c = write_listings_csv(tmp_path / "c.csv", city="melbourne", rows=400, seed=8)
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b, c)]
    assert digest[0] == digest[1] != digest[2]
    with Catalog(tmp_path / "n") as cat:
        spec = cat.add("listings", a, roles=default_listing_roles())
        assert tuple(c.name for c in spec.columns) == LISTING_COLUMNS
        assert spec.row_count == 400
        assert spec.column("last_review").type is ColumnType.DATE  # type: ignore[union-attr]
        assert spec.column("price").role is ColumnRole.MEASURE  # type: ignore[union-attr]
        cur = cat.cursor()
        nulls, multi, hoods = cur.execute(
            "SELECT count(*) FILTER (WHERE last_review IS NULL),"
            " count(*) FILTER (WHERE calculated_host_listings_count > 1),"
            " count(DISTINCT neighbourhood) FROM listings"
        ).fetchone()  # type: ignore[misc]
        null_rpm = cur.execute(
            "SELECT count(*) FROM listings"
            " WHERE (last_review IS NULL) <> (reviews_per_month IS NULL)"
        ).fetchone()
        cur.close()
        assert 0 < nulls < 400 and 0 < multi < 400 and hoods > 3
        assert null_rpm == (0,)
