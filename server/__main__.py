"""``python -m server``: the launcher (``server.launch``); ``python -m engine.serve`` is its
documented name."""

import sys

from server.launch import main

if __name__ == "__main__":
    sys.exit(main())
