"""`python chat.py` from a checkout: the terminal REPL, serving/chat.py (installed as t5r-chat)."""

import sys

from serving.chat import main

if __name__ == "__main__":
    sys.exit(main())
