"""One log format for every process of a launch: the API's and each rank's.

``[2026-12-06 22:00:00 rank 1] INFO ready on cpu ...`` and ``[... api] INFO ready:
http://...``: the time and who wrote it lead every line, so the interleaved output of
N ranks and the API reads (and greps) as one log. uvicorn's own loggers propagate to
the root logger (the launcher gives uvicorn no logging config of its own), so its
lines take the same form.

Every process also prints the Python stack of each of its threads to stderr on SIGUSR1
(``kill -USR1 PID``: the launcher, an API process or a rank), so a process that hangs
can be looked into where it runs, without a debugger.
"""

from __future__ import annotations

import faulthandler
import logging
import signal
import sys

DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def configure_logging(level: str, process: str) -> None:
    """Send this process's log to stderr as ``[time process] LEVEL message``;
    ``process`` is ``api`` or ``rank N``. Replaces any handler set before."""
    logging.basicConfig(level=level.upper(), stream=sys.stderr, force=True,
                        format=f"[%(asctime)s {process}] %(levelname)s %(message)s",
                        datefmt=DATE_FORMAT)
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
