"""`python api.py` from a checkout: the HTTP API, serving/api.py (installed as t5r-api)."""

import sys

from serving.api import main

if __name__ == "__main__":
    sys.exit(main())
