"""Reading files named on the command line, and printing what they contain, safely.

The files a command reads (evidence bundles, rosters) may come from anyone, and so may
every string in them that ends up on the terminal.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Final

from hansa.protocol.errors import ErrorCode, ProtocolError

__all__ = ["printable", "read_limited"]

_CHUNK: Final = 1024 * 1024

# Characters a terminal acts on (C0, DEL, C1: ESC starts cursor movement and colour,
# CR and BS overwrite a line) and the Unicode line separators and bidi controls that
# reorder what is shown. Rich strips BEL, BS and CR but passes ESC through.
_UNPRINTABLE: Final = re.compile(
    r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]"
)


def read_limited(path: str | os.PathLike[str], limit: int) -> bytes:
    """Read a whole file of at most ``limit`` bytes, refusing larger ones without reading them.

    A bundle is the analyst's, so hostile: a 10 GB (sparse) file used to be read
    up to ``limit + 1`` bytes (512 MiB) before it was refused, and a character
    device such as /dev/zero never ends. A regular file is judged by its size and
    read in one piece of that size; a pipe (``/dev/stdin``) is read in chunks up to
    the limit; anything else (a device, a socket) is refused.

    Raises:
        ProtocolError: ``TOO_LARGE`` over the limit, ``INVALID_FIELD`` for a file
            that is neither a regular file nor a pipe.
        OSError: the file cannot be opened or read (a directory, a missing file).
    """
    # O_NONBLOCK for the open only: a named pipe without a writer would block it
    # forever; read back to blocking below (such a pipe then reads as empty).
    fd = os.open(Path(path), os.O_RDONLY | os.O_NONBLOCK)
    os.set_blocking(fd, True)
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if stat.S_ISREG(info.st_mode):
            if info.st_size > limit:
                raise ProtocolError(
                    f"{path} is larger than {limit} bytes ({info.st_size})", ErrorCode.TOO_LARGE
                )
            expected = info.st_size
        elif stat.S_ISFIFO(info.st_mode):
            expected = _CHUNK
        else:
            raise ProtocolError(f"{path} is not a regular file or a pipe", ErrorCode.INVALID_FIELD)
        parts: list[bytes] = []
        size = 0
        want = expected + 1  # one more than the size: a file that grew is still noticed
        while size <= limit and (part := fh.read(min(want, limit + 1 - size))):
            parts.append(part)
            size += len(part)
            want = _CHUNK
    if size > limit:
        raise ProtocolError(f"{path} is larger than {limit} bytes", ErrorCode.TOO_LARGE)
    return b"".join(parts)


def printable(text: str) -> str:
    """``text`` with terminal controls, line separators and bidi controls as ``\\xNN``.

    Args:
        text: text that may hold bytes of a hostile file (decoder messages quote them).

    Returns:
        The text, safe to write to a terminal.
    """
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode(), text)
