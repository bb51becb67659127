"""``hansa witness alarms``: report the equivocations a node's witness has caught.

Usage::

    hansa witness alarms --data-dir D

Reads ``D/witness.db`` (:data:`~hansa.node.witness.WITNESS_DB`) and prints every stored
equivocation alarm with both signed checkpoint notes, verbatim, so they can be handed to
the alliance as proof (issue 5, part 5: "CLI report"), after re-checking the evidence
(:func:`~hansa.node.witness.alarm_holds`). Exit status: 0 when there are no
alarms, :data:`~hansa.node.cli.EXIT_VERIFY_FAILED` when there is at least one, and 1 when
the store is missing or unreadable.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

from hansa.node.cli import EXIT_ERROR, EXIT_VERIFY_FAILED
from hansa.node.witness import WITNESS_DB, EquivocationAlarm, WitnessStore, alarm_holds

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``witness`` command group and its ``alarms`` subcommand."""
    group = sub.add_parser("witness", help="the node's checkpoint witness")
    commands = group.add_subparsers(dest="witness_command", metavar="SUBCOMMAND")
    commands.required = True
    alarms = commands.add_parser(
        "alarms",
        help="print stored equivocation alarms (exit 3 when there are any)",
        description=(
            "Print every equivocation the witness detected: two checkpoints signed by one "
            "log that cannot both be true, with both signed notes as evidence. Exits 0 "
            "when there are none and 3 when there is at least one."
        ),
    )
    alarms.add_argument(
        "--data-dir",
        type=Path,
        default=Path("."),
        metavar="D",
        help="the node's data directory (default: the current directory)",
    )
    alarms.set_defaults(handler=_alarms)


def _alarms(args: argparse.Namespace) -> int:
    path = Path(args.data_dir) / WITNESS_DB
    if not path.is_file():
        print(f"hansa: error: no witness store at {path}", file=sys.stderr)
        return EXIT_ERROR
    with WitnessStore(path) as store:
        found = store.alarms()
        origins = store.origins()
    if not found:
        print(f"no equivocation alarms ({len(origins)} logs witnessed)")
        return 0
    print(f"{len(found)} EQUIVOCATION ALARM(S)")
    for number, alarm in enumerate(found, start=1):
        _print_alarm(number, alarm)
    return EXIT_VERIFY_FAILED


def _print_alarm(number: int, alarm: EquivocationAlarm) -> None:
    when = datetime.datetime.fromtimestamp(alarm.detected_at, datetime.UTC)
    print()
    print(f"alarm {number}: log {alarm.origin} ({alarm.kind.value})")
    print(f"  detected at {when.isoformat(timespec='seconds')}")
    if alarm_holds(alarm):
        print(f"  evidence holds: both notes verify under {alarm.log_vkey}")
    else:
        print("  evidence DOES NOT HOLD on re-check (damaged store or changed log key?)")
    print(
        f"  cosigned size {alarm.cosigned_size}; shown size {alarm.presented_size}"
        f" with old size {alarm.old_size} and a {len(alarm.proof)}-hash proof"
    )
    for hash_ in alarm.proof:
        print(f"    proof {hash_.hex()}")
    for title, note in (
        ("checkpoint the witness cosigned", alarm.cosigned_note),
        ("conflicting checkpoint", alarm.presented_note),
    ):
        print(f"  --- {title} ---")
        # Notes are UTF-8 without control characters (signed-note §Format); replace
        # anything else so a damaged store cannot write escape codes to the terminal.
        text = note.decode("utf-8", errors="replace")
        print("".join(ch if ch >= " " or ch == "\n" else "?" for ch in text), end="")
