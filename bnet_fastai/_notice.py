"""One line for the user on stderr, never interleaved with stdout's table or progress."""
from __future__ import annotations

import sys


def notice(message: str) -> None:
    """`message` on stderr as a line of its own: stdout is flushed first and the line is written whole."""
    sys.stdout.flush()
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
