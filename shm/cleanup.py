"""`python -m shm.cleanup`: reclaim segments left in /dev/shm by crashed runs.

A segment is ours when its name starts with ``dpserve.`` (or ``$DPSERVE_SHM_PREFIX.``); it is stale when the pid
encoded in its name (its creator) no longer exists. Live runs are never touched. The
metrics folders of crashed launchers (``dpserve-metrics.<pid>.*`` in the temporary
directory, ``--api-server-count``; not namespaced by ``--prefix``) go too.
"""

from __future__ import annotations

import argparse
import sys

from shm.segment import (NAME_PREFIX, list_segments, name_prefix, owner_pid, pid_alive,
                         reclaim_stale_metrics_dirs, reclaim_stale_segments)


def _prefix(text: str) -> str:
    """``--prefix``: a namespace as ``DPSERVE_SHM_PREFIX`` takes it, the dot optional."""
    try:
        return name_prefix(text.removesuffix("."))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shm.cleanup", description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="list what would be removed")
    parser.add_argument("--prefix", type=_prefix, default=NAME_PREFIX,
                        help="the segments' namespace, as a server's DPSERVE_SHM_PREFIX "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)
    if args.dry_run:
        stale = [n for n in list_segments(args.prefix)
                 if (p := owner_pid(n, args.prefix)) is not None and not pid_alive(p)]
        for name in stale:
            print(f"would remove {name}")
        print(f"{len(stale)} stale segment(s)")
        for path in reclaim_stale_metrics_dirs(dry_run=True):
            print(f"would remove {path} (a crashed launcher's metrics folder)")
        return 0
    removed = reclaim_stale_segments(args.prefix)
    for name in removed:
        print(f"removed {name}")
    print(f"{len(removed)} stale segment(s) removed")
    for path in reclaim_stale_metrics_dirs():
        print(f"removed {path} (a crashed launcher's metrics folder)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
