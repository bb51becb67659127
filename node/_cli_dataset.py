"""``hansa dataset`` commands: register, inspect and remove a node's datasets.

* ``hansa dataset add NAME PATH [--data-dir DIR] [--replace | --append]
  [--role COLUMN=ROLE ...]`` loads a CSV or Parquet file (atomically) and
  prints the inferred schema: column, logical type, role and the aggregates
  offered. Roles and disclosure settings stay editable in
  ``<data_dir>/datasets.toml``.
* ``hansa dataset list`` lists the datasets with their versions and settings.
* ``hansa dataset show NAME`` prints one dataset's schema and disclosure settings.
* ``hansa dataset remove NAME`` removes a dataset and its data.
* ``hansa dataset synth PATH --city CITY [--rows N] [--seed S]`` writes
  synthetic Inside-Airbnb-shaped listings (for trials and demos).

``list`` and ``show`` open the store read-only, so they work while a node
serves; ``add`` and ``remove`` need the node stopped (DuckDB allows one
writing process).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from hansa.node.catalog import ROLE_AGGREGATES, Catalog, DatasetSpec, LoadMode
from hansa.protocol.errors import ConfigError, ErrorCode, QueryError
from hansa.protocol.messages import ColumnRole

__all__ = ["register"]

_DATA_DIR_ENV = "HANSA_DATA_DIR"


def _data_dir_arg(p: argparse.ArgumentParser) -> None:
    default = os.environ.get(_DATA_DIR_ENV)
    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path(default) if default else None,
        required=not default,
        metavar="DIR",
        help=f"the node's data directory (default: ${_DATA_DIR_ENV})",
    )


def _role_override(text: str) -> tuple[str, ColumnRole]:
    column, sep, role = text.partition("=")
    if not sep or not column:
        raise argparse.ArgumentTypeError(f"expected COLUMN=ROLE, got {text!r}")
    try:
        return column.strip(), ColumnRole(role.strip().lower())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"unknown role {role!r} (one of: {', '.join(r.value for r in ColumnRole)})"
        ) from None


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``dataset`` command group."""
    p = sub.add_parser("dataset", help="register and inspect the node's datasets")
    ds = p.add_subparsers(dest="dataset_command", metavar="DATASET_COMMAND")
    ds.required = True

    add = ds.add_parser("add", help="load a CSV or Parquet file as a dataset")
    add.add_argument("name", metavar="NAME", help="dataset name (letter, then letters/digits/_)")
    add.add_argument("path", metavar="PATH", type=Path, help="a .csv, .tsv, .csv.gz or .parquet")
    _data_dir_arg(add)
    mode = add.add_mutually_exclusive_group()
    mode.add_argument("--replace", action="store_true", help="replace the existing data")
    mode.add_argument("--append", action="store_true", help="append rows to the existing data")
    add.add_argument(
        "--role",
        action="append",
        type=_role_override,
        default=[],
        metavar="COLUMN=ROLE",
        help="set a column's role: dimension, measure, time, identifier or hidden (repeatable)",
    )
    add.set_defaults(handler=_add)

    ls = ds.add_parser("list", help="list the datasets")
    _data_dir_arg(ls)
    ls.set_defaults(handler=_list)

    show = ds.add_parser("show", help="show a dataset's schema and disclosure settings")
    show.add_argument("name", metavar="NAME")
    _data_dir_arg(show)
    show.set_defaults(handler=_show)

    rm = ds.add_parser("remove", help="remove a dataset and its data")
    rm.add_argument("name", metavar="NAME")
    _data_dir_arg(rm)
    rm.set_defaults(handler=_remove)

    synth = ds.add_parser("synth", help="write synthetic listings shaped like Inside Airbnb's")
    synth.add_argument("path", metavar="PATH", type=Path, help="the CSV file to write")
    synth.add_argument("--city", required=True, help="city id (e.g. austin, melbourne)")
    synth.add_argument("--rows", type=int, default=5000, help="number of listings (default 5000)")
    synth.add_argument("--seed", type=int, default=1, help="generator seed (default 1)")
    synth.set_defaults(handler=_synth)


def _console() -> Console:
    # Wide when not on a terminal, so piped output and logs keep one row per line.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def _schema_table(spec: DatasetSpec) -> Table:
    table = Table(
        title=f"{spec.name}  {spec.version}  ({spec.row_count} rows)", title_justify="left"
    )
    table.add_column("column")
    table.add_column("type")
    table.add_column("role")
    table.add_column("aggregates offered")
    for column in spec.columns:
        offered = spec.disclosure.allowed(column.name)
        shown = ", ".join(sorted(k.value for k in offered)) or "-"
        if column.role is not ColumnRole.HIDDEN and offered != ROLE_AGGREGATES[column.role]:
            shown += "  (restricted)"
        table.add_row(column.name, column.type.value, column.role.value, shown)
    return table


def _settings_lines(spec: DatasetSpec) -> list[str]:
    d = spec.disclosure
    return [
        f"disclosure version {d.version}: min group size k = {d.min_group_size}, "
        f"dominance p = {d.dominance_p:g} %, max groups = {d.max_groups}",
        f"purposes: {', '.join(sorted(d.purposes)) or '(none: every request is refused)'}",
    ]


def _add(args: argparse.Namespace) -> int:
    mode: LoadMode = "replace" if args.replace else "append" if args.append else "create"
    roles = dict(args.role)
    with Catalog(args.data_dir) as catalog:
        spec = catalog.add(args.name, args.path, mode=mode, roles=roles)
        console = _console()
        console.print(_schema_table(spec))
        for line in _settings_lines(spec):
            console.print(line)
        verb = {"create": "added", "replace": "replaced", "append": "appended to"}[mode]
        console.print(
            f"{verb} dataset {spec.name!r}: data version {spec.version}, {spec.row_count} rows."
            f" Edit roles and disclosure settings in {catalog.toml_path}."
        )
    return 0


def _open_read_only(data_dir: Path) -> Catalog:
    if not data_dir.is_dir():
        raise ConfigError(f"{data_dir}: no such data directory", ErrorCode.CONFIG)
    return Catalog(data_dir, read_only=True)


def _list(args: argparse.Namespace) -> int:
    with _open_read_only(args.data_dir) as catalog:
        specs = catalog.list()
        console = _console()
        if not specs:
            console.print(f"no datasets in {args.data_dir}")
        else:
            table = Table()
            for header in ("name", "version", "rows", "columns", "k", "p %", "max groups"):
                table.add_column(header)
            table.add_column("purposes")
            table.add_column("disclosure v")
            for s in specs:
                d = s.disclosure
                table.add_row(
                    s.name,
                    s.version,
                    str(s.row_count),
                    str(len(s.columns)),
                    str(d.min_group_size),
                    f"{d.dominance_p:g}",
                    str(d.max_groups),
                    ", ".join(sorted(d.purposes)),
                    str(d.version),
                )
            console.print(table)
        for name in catalog.unregistered:
            console.print(
                f"warning: table {name!r} has no entry in datasets.toml and is not published"
                f" (hansa dataset add {name} PATH --replace, or hansa dataset remove {name})"
            )
    return 0


def _show(args: argparse.Namespace) -> int:
    with _open_read_only(args.data_dir) as catalog:
        try:
            spec = catalog.get(args.name)
        except QueryError as exc:  # UNKNOWN_DATASET is a wire code; here it is a local error
            raise ConfigError(f"no dataset named {args.name!r}", ErrorCode.CONFIG) from exc
        console = _console()
        console.print(_schema_table(spec))
        for line in _settings_lines(spec):
            console.print(line)
        console.print(f"source: {spec.source} (loaded {spec.loaded_at})")
        console.print(f"settings file: {catalog.toml_path}")
    return 0


def _remove(args: argparse.Namespace) -> int:
    if not args.data_dir.is_dir():
        raise ConfigError(f"{args.data_dir}: no such data directory", ErrorCode.CONFIG)
    with Catalog(args.data_dir) as catalog:
        catalog.remove(args.name)
    _console().print(f"removed dataset {args.name!r}")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from hansa.node.synthetic import write_listings_csv

    if args.rows < 0:
        raise ConfigError("--rows must be >= 0", ErrorCode.CONFIG)
    path = write_listings_csv(args.path, city=args.city, rows=args.rows, seed=args.seed)
    _console().print(f"wrote {args.rows} synthetic {args.city} listings to {path}")
    return 0
