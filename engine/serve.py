"""``python -m engine.serve [--dp-size N] ...``: the serving engine's documented command,
an alias of ``python -m server`` (all of it lives in ``server.launch``)."""

import sys

from server.launch import main

if __name__ == "__main__":
    sys.exit(main())
