"""Files named on the command line are read within their limit; errors print no controls."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hansa.node._cli_io import printable, read_limited
from hansa.node.cli import main
from hansa.protocol.errors import ErrorCode, ProtocolError


def test_a_huge_sparse_file_is_refused_by_its_size(tmp_path: Path) -> None:
    sparse = tmp_path / "huge.bundle"
    with sparse.open("wb") as fh:
        fh.truncate(10 * 1024**3)
    with pytest.raises(ProtocolError) as caught:
        read_limited(sparse, 1024)
    assert caught.value.code is ErrorCode.TOO_LARGE


def test_devices_are_refused_and_files_read_whole(tmp_path: Path) -> None:
    with pytest.raises(ProtocolError) as caught:
        read_limited("/dev/zero", 1024)
    assert caught.value.code is ErrorCode.INVALID_FIELD
    small = tmp_path / "small"
    small.write_bytes(b"x" * 1024)
    assert read_limited(small, 1024) == b"x" * 1024
    with pytest.raises(ProtocolError):
        read_limited(small, 1023)


def test_printable_escapes_terminal_controls() -> None:
    assert printable("ok\x1b[2J\u202eevil\u2028") == "ok\\x1b[2J\\u202eevil\\u2028"
    assert printable("plain text, unicode é") == "plain text, unicode é"


def test_reconcile_refuses_dev_zero_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    assert main(["audit", "reconcile", "--store", str(store), os.devnull]) != 0
    assert main(["audit", "reconcile", "--store", str(store), "/dev/zero"]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "not a regular file" in err


def test_error_messages_print_no_escape_sequences(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hostile = tmp_path / "\x1b[2Jnot-a-node"
    assert main(["node", "show", "--data-dir", str(hostile)]) != 0
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\\x1b[2J" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_a_named_pipe_without_a_writer_does_not_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "bundle.fifo"
    os.mkfifo(fifo)
    assert read_limited(fifo, 1024) == b""  # no writer: empty, at once


def test_file_names_in_os_errors_print_no_escape_sequences(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "x\x1b[2Jy.bundle"
    assert main(["verify", str(missing)]) != 0
    err = capsys.readouterr().err
    assert "\x1b" not in err and "Traceback" not in err
