"""Where the CLI prints: results on stdout, errors on stderr.

Rich sizes tables to the terminal, and to 80 columns when stdout is a pipe, a file or CI: run ids then come out
as `202612…` and the twin's findings one word per line. Off a terminal (and without COLUMNS) results get 160
columns, so `labtwin runs | tee runs.txt` can be read and copied from.
"""

from __future__ import annotations

import os
import sys

from rich.console import Console

PIPED_WIDTH = 160


def results_console() -> Console:
    on_terminal = sys.stdout.isatty() or "COLUMNS" in os.environ
    return Console(width=None if on_terminal else PIPED_WIDTH)
