"""Quiet exit when the reader of standard output goes away early (`fastv-compare --format json | head`)."""

from __future__ import annotations

import os
import sys
from typing import Callable

SIGPIPE_EXIT_STATUS = 141  # 128 + SIGPIPE: what a shell reports for `yes | head`


def exit_quietly_on_broken_pipe(run: Callable[[], int | None]) -> int:
    """`run()`'s exit status, with its output flushed; `SIGPIPE_EXIT_STATUS` and no traceback when standard output
    was closed by its reader (stdout then points at /dev/null so that Python's own last flush stays quiet)."""
    try:
        status = run()
        sys.stdout.flush()
        return status or 0
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return SIGPIPE_EXIT_STATUS
