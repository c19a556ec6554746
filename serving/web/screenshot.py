"""Screenshot of the web page for the docs: starts api.py on a model, asks questions in headless Chromium.

    python -m serving.web.screenshot --model runs/quickstart/best                  # -> docs/img/web.png
    python -m serving.web.screenshot --model runs/quickstart/best --phone /tmp/web-phone.png

The first question is answered greedily (streamed), the others with --beams; the picture shows the page
after the last one, with the history of all of them.
"""

import argparse
import sys
from pathlib import Path

from serving.web.browser import ROOT, BrowserUnavailable, Page, api_server, chromium

QUESTIONS = ["Who lived longer, Nikola Tesla or Milutin Milankovic?",
             "Which is older, the Eiffel Tower or the Statue of Liberty?"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.web.screenshot", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder served by api.py")
    parser.add_argument("--backend", default=None, help="api.py --backend (default: api.py's)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "web.png", help="PNG to write")
    parser.add_argument("--phone", type=Path, default=None, help="also a PNG at a phone's width (390 px)")
    parser.add_argument("--width", type=int, default=900, help="page width in CSS pixels (default 900)")
    parser.add_argument("--beams", type=int, default=4, help="beams for the questions after the first")
    parser.add_argument("questions", nargs="*", default=QUESTIONS, help="questions to ask, in order")
    args = parser.parse_args(argv)
    if not args.questions:
        parser.error("give at least one question")
    server_args = ["--backend", args.backend] if args.backend else []
    try:
        with api_server(args.model, *server_args) as url, chromium() as driver:
            page = Page(driver, url)
            for i, question in enumerate(args.questions):
                shown = page.ask(question, beams=1 if i == 0 else args.beams)
                if shown.error:
                    print(f"error: {question!r}: the page shows {shown.error!r}", file=sys.stderr)
                    return 1
                print(f"{question} -> {' | '.join(shown.subqueries) or '(none)'}  [{shown.status}]")
            page.screenshot(args.out, args.width)
            print(f"wrote {args.out}")
            if args.phone:
                page.screenshot(args.phone, 390, mobile=True)
                print(f"wrote {args.phone}")
    except (BrowserUnavailable, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
