"""`python -m shm.cleanup`: reclaim segments left in /dev/shm by crashed runs.

A segment is ours when its name starts with ``dpserve.`` (or ``$DPSERVE_SHM_PREFIX.``); it is stale when the pid
encoded in its name (its creator) no longer exists. Live runs are never touched.
"""

from __future__ import annotations

import argparse
import sys

from shm.segment import NAME_PREFIX, list_segments, owner_pid, pid_alive, reclaim_stale_segments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shm.cleanup", description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="list what would be removed")
    parser.add_argument("--prefix", default=NAME_PREFIX, help="segment name prefix (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.dry_run:
        stale = [n for n in list_segments(args.prefix) if (p := owner_pid(n)) is not None and not pid_alive(p)]
        for name in stale:
            print(f"would remove {name}")
        print(f"{len(stale)} stale segment(s)")
        return 0
    removed = reclaim_stale_segments(args.prefix)
    for name in removed:
        print(f"removed {name}")
    print(f"{len(removed)} stale segment(s) removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
