"""``python -m bench.compare``: the side-by-side comparison (``bench.compare.run``)."""

from bench.client.server import exit_on_sigterm
from bench.compare.run import main

if __name__ == "__main__":
    exit_on_sigterm()
    raise SystemExit(main())
