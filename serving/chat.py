"""Terminal REPL for query reformulation: type a question, get its subqueries as they are generated.

    python chat.py --model runs/base/final [--backend mlx|onnx|torch-int8|torch] [--dtype bfloat16]   # or t5r-chat
    echo "Who lived longer, Tesla or Milankovic?" | python chat.py --model runs/base/final
    # {"query": "...", "subqueries": ["Nikola Tesla lifespan", "Milutin Milankovic lifespan"], "latency_ms": ...}

Interactive (a terminal): line editing and history, streamed numbered answers with their latency,
/commands (see /help); Ctrl-C stops a generation, Ctrl-D quits. Non-interactive (stdin is a pipe, or
--jsonl): one query per line in, one JSON line per query out; the exit code is 1 if any query failed.
"""

import argparse
import json
import os
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import Optional

from rich.markup import escape

from reformulation.data import parse_subqueries
from reformulation.engine import DEFAULT_DECODING, LIMITS, EngineError, check_options

from .backends import BACKENDS, add_model_args, default_backend, make_backend

HISTORY_FILE = Path("~/.cache/query-reformulation/chat_history").expanduser()

COMMANDS = {
    "/help": "this list",
    "/beams N": "beam search with N beams (1 = greedy, streamed)",
    "/temp T": "sampling temperature (0 = deterministic)",
    "/max N": "most tokens generated per answer",
    "/model PATH": "load another checkpoint (the current one stays if it fails)",
    "/backend NAME": f"switch backend: {', '.join(BACKENDS)} ('torch' = float)",
    "/history": "the queries of this session and their answers",
    "/quit": "exit (or Ctrl-D)",
}


class UsageError(ValueError):
    """A bad /command or argument: shown as one line, the session goes on."""


class Chat:
    """The REPL state: one loaded backend, decoding options, this session's answers."""

    def __init__(self, console, backend_name: str, model: str, dtype=None, speculative: Optional[bool] = None):
        self.console = console
        self.backend_name, self.model, self.dtype = backend_name, model, dtype
        self.speculative = speculative  # --[no-]speculative (None: the engine's default); onnx and mlx backends
        self.backend = None
        self.options = {"num_beams": DEFAULT_DECODING.num_beams, "max_new_tokens": DEFAULT_DECODING.max_new_tokens,
                        "temperature": DEFAULT_DECODING.temperature}
        self.history: list[dict] = []

    # -- loading

    def load(self, backend_name: str, model: str) -> None:
        """Load `model` with `backend_name`; on failure raise EngineError and keep the current one."""
        opts = {"dtype": self.dtype} if self.dtype else {}
        if self.speculative is not None and backend_name in ("onnx", "mlx"):
            opts["speculative"] = self.speculative
        with self.console.status(f"loading {escape(model)} ({backend_name})"):
            backend = make_backend(backend_name).load(model, **opts)
        self.backend, self.backend_name, self.model = backend, backend_name, model

    # -- answering

    def answer(self, query: str) -> None:
        from rich.live import Live

        start = time.perf_counter()
        text, done = "", False
        with Live(self._render(text, None), console=self.console, refresh_per_second=30, transient=False) as live:
            try:
                with closing(self.backend.stream(query, **self.options)) as pieces:
                    for piece in pieces:
                        text += piece
                        live.update(self._render(text, None))
                done = True
            except KeyboardInterrupt:
                live.update(self._render(text, None, cancelled=True))
            else:
                latency = (time.perf_counter() - start) * 1000
                live.update(self._render(text, latency))
        if done:
            self.history.append({"query": query, "subqueries": parse_subqueries(text), "latency_ms": latency})

    def _render(self, text: str, latency, cancelled: bool = False):
        from rich.console import Group
        from rich.text import Text

        lines = [Text.assemble((f"{i:>2}. ", "bold cyan"), item) for i, item in enumerate(parse_subqueries(text), 1)]
        if not lines:
            lines = [Text("   …" if latency is None and not cancelled else "   (no subqueries)", style="dim")]
        mode = (f"beams={self.options['num_beams']}" if self.options["num_beams"] > 1
                else f"temp={self.options['temperature']:g}" if self.options["temperature"] > 0 else "greedy")
        if cancelled:
            lines.append(Text("   cancelled", style="yellow"))
        elif latency is not None:
            lines.append(Text(f"   {latency:,.0f} ms · {mode} · {self.backend_name}", style="dim"))
        return Group(*lines)

    # -- commands

    def command(self, line: str) -> bool:
        """Run a /command; False means quit."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit", "/q"):
            return False
        if name == "/help":
            self.help()
        elif name == "/beams":
            self._set("num_beams", _number(arg, int, 1, LIMITS.max_beams, "/beams N"))
        elif name == "/max":
            self._set("max_new_tokens", _number(arg, int, 1, LIMITS.max_new_tokens, "/max N"))
        elif name == "/temp":
            self._set("temperature", _number(arg, float, 0.0, LIMITS.max_temperature, "/temp T"))
        elif name in ("/model", "/backend"):
            if not arg:
                raise UsageError(f"usage: {name} {'PATH' if name == '/model' else '|'.join(BACKENDS)}")
            backend_name, model = (self.backend_name, arg) if name == "/model" else (arg, self.model)
            if name == "/backend" and backend_name not in BACKENDS:
                raise UsageError(f"unknown backend {arg!r}: choose {', '.join(BACKENDS)}")
            try:
                self.load(backend_name, model)
            except EngineError as err:
                self.console.print(f"[red]could not load:[/] {escape(str(err))} [dim](still using "
                                   f"{escape(self.model)}, {self.backend_name})[/]")
                return True
            self.console.print(f"[green]loaded[/] {escape(model)} ({backend_name}, "
                               f"{self.backend.load_seconds:.1f} s)")
        elif name == "/history":
            self.show_history()
        else:
            raise UsageError(f"unknown command {name!r}: /help lists the commands")
        return True

    def _set(self, key: str, value) -> None:
        options = dict(self.options, **{key: value})
        # beams and sampling exclude each other: setting one resets the other
        if key == "num_beams" and value > 1:
            options["temperature"] = 0.0
        if key == "temperature" and value > 0:
            options["num_beams"] = 1
        check_options(**options)
        self.options = options
        self.console.print(f"[dim]beams={options['num_beams']} temp={options['temperature']:g} "
                           f"max={options['max_new_tokens']}[/]")

    def help(self) -> None:
        from rich.table import Table

        table = Table(show_header=False, box=None, padding=(0, 2))
        for command, what in COMMANDS.items():
            table.add_row(f"[bold]{command}[/]", what)
        table.add_row("[bold]Ctrl-C[/]", "stop the current answer")
        self.console.print(table)

    def show_history(self) -> None:
        from rich.table import Table

        if not self.history:
            self.console.print("[dim]no queries yet[/]")
            return
        table = Table(show_lines=False)
        table.add_column("#", justify="right")
        table.add_column("query")
        table.add_column("subqueries")
        table.add_column("ms", justify="right")
        for i, item in enumerate(self.history, 1):
            table.add_row(str(i), escape(item["query"]), escape(" | ".join(item["subqueries"])),
                          f"{item['latency_ms']:,.0f}")
        self.console.print(table)

    def banner(self) -> None:
        self.console.print(f"[bold]query reformulation[/] · {escape(self.model)} · {self.backend_name} · "
                           f"[dim]/help for commands, Ctrl-D to quit[/]", highlight=False)


def _number(text: str, kind, low, high, usage: str):
    try:
        value = kind(text)
    except ValueError:
        raise UsageError(f"usage: {usage} ({kind.__name__} from {low} to {high}); got {text!r}") from None
    if not low <= value <= high:
        raise UsageError(f"{usage.split()[0]}: {value} is out of range ({low} to {high})")
    return value


def interactive(chat: Chat, history_file: Path) -> int:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory

    try:
        history_file.parent.mkdir(parents=True, exist_ok=True)
        history = FileHistory(str(history_file))
    except OSError:  # read-only home: keep the session's history in memory
        history = InMemoryHistory()
    session = PromptSession(history=history)
    chat.banner()
    while True:
        try:
            line = session.prompt("› ").strip()
        except KeyboardInterrupt:  # Ctrl-C at the prompt clears the line
            continue
        except EOFError:  # Ctrl-D
            break
        if not line:
            continue
        try:
            if line.startswith("/"):
                if not chat.command(line):
                    break
            else:
                chat.answer(line)
        except (UsageError, EngineError) as err:
            chat.console.print(f"[red]{escape(str(err))}[/]")
        except Exception as err:  # noqa: BLE001 - the REPL reports and carries on, never a traceback
            chat.console.print(f"[red]error:[/] {type(err).__name__}: {escape(str(err))}")
    chat.console.print("[dim]bye[/]")
    return 0


def jsonl(chat: Chat, lines) -> int:
    """One JSON line per non-empty input line; exit code 1 if any query failed."""
    failures = 0
    for line in lines:
        query = line.strip()
        if not query:
            continue
        start = time.perf_counter()
        try:
            (text,) = chat.backend.generate([query], **chat.options)
            row = {"query": query, "subqueries": parse_subqueries(text),
                   "latency_ms": round((time.perf_counter() - start) * 1000, 2)}
        except Exception as err:  # noqa: BLE001 - reported as a JSON line; the run goes on
            failures += 1
            row = {"query": query, "error": f"{type(err).__name__}: {err}"}
        sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--beams", type=int, default=DEFAULT_DECODING.num_beams,
                        help=f"num_beams (1 = greedy; at most {LIMITS.max_beams})")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_DECODING.max_new_tokens,
                        help=f"most tokens per answer (at most {LIMITS.max_new_tokens})")
    parser.add_argument("--temperature", type=float, default=DEFAULT_DECODING.temperature,
                        help=f"0 = deterministic (at most {LIMITS.max_temperature:g})")
    parser.add_argument("--jsonl", action="store_true", help="read queries from stdin, write JSON lines (the default "
                                                             "when stdin is not a terminal)")
    parser.add_argument("--history-file", type=Path, default=HISTORY_FILE, help=f"default {HISTORY_FILE}")
    parser.add_argument("--speculative", action=argparse.BooleanOptionalAction, default=None,
                        help="onnx and mlx backends: greedy answers by speculative decoding, several tokens checked "
                             "per decoder pass (default: on for float32 weights, where the answers are the same; off "
                             "for int8, where a near-tie can differ)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle torch threads must not spin on a shared CPU
    args.backend = args.backend or default_backend()  # may import torch: after the line above

    from rich.console import Console

    batch = args.jsonl or not sys.stdin.isatty()
    console = Console(stderr=batch, highlight=False)  # in JSON-lines mode stdout carries only JSON
    chat = Chat(console, args.backend, args.model, args.dtype, args.speculative)
    try:
        chat.options = {"num_beams": args.beams, "max_new_tokens": args.max_new_tokens,
                        "temperature": args.temperature}
        check_options(**chat.options)
        chat.load(args.backend, args.model)
    except EngineError as err:
        if batch:
            sys.stdout.write(json.dumps({"error": str(err)}) + "\n")
        console.print(f"[red]error:[/] {escape(str(err))}", soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        return 130
    if batch:
        try:
            return jsonl(chat, sys.stdin)
        except KeyboardInterrupt:
            return 130
    return interactive(chat, args.history_file.expanduser())


if __name__ == "__main__":
    sys.exit(main())
