"""``python -m engine.serve [--dp-size N] ...``: the serving engine's command line.

All of it lives in ``server.launch``; this module is the entry point's name.
"""

import sys

from server.launch import main

if __name__ == "__main__":
    sys.exit(main())
