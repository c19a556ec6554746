"""The shape of the code base: no import cycles among the project's own modules, a framework-free core and
backend registry, and `python -m convert to-onnx` with MLX not importable."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("reformulation", "mlx_t5", "torch_t5", "onnx_t5", "convert", "serving")
FRAMEWORKS = ("mlx", "mlx_lm", "torch", "onnxruntime")


def project_modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the project's packages and the top-level scripts."""
    modules = {path.stem: path for path in ROOT.glob("*.py")}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_names(name: str, path: Path):
    """(module, imported names) for every import statement in the file, those inside functions included:
    a lazy import still closes a cycle, only later."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            yield module, tuple(alias.name for alias in node.names)


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules that importing it runs (the packages on the way included)."""
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        edges = set()
        for module, names in imported_names(name, path):
            targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules]
            # `from pkg import submodule` needs pkg's __init__ only where pkg is not the importer's own package
            # (that one is already running); `from pkg import function` always needs it
            if len(targets) < len(names) or not name.startswith(f"{module}."):
                targets.append(module)
            for target in targets:
                parts = target.split(".")
                for i in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b first
                    step = ".".join(parts[:i])
                    if step in modules and step != name and not name.startswith(f"{step}."):
                        edges.add(step)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    graph = import_graph()
    assert {"reformulation.engine", "torch_t5.greedy", "serving.api", "convert.__main__"} <= set(graph)
    assert "torch_t5.int8" in graph["torch_t5.greedy"] and "torch_t5" in graph["serving.backends"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_lazy_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_core_and_backend_registry_use_no_framework():
    """reformulation/ is framework-free; serving/backends.py names engines and leaves the framework work to
    them (it may ask torch_t5 whether there is a GPU, not torch)."""
    modules = project_modules()
    for name, path in modules.items():
        if name.startswith("reformulation") or name == "serving.backends":
            used = {module.split(".")[0] for module, _ in imported_names(name, path)} & set(FRAMEWORKS)
            assert not used, f"{path.relative_to(ROOT)} imports {sorted(used)}"
    code = ("import sys, reformulation.engine, serving.backends\n"
            f"print(sorted(m for m in {FRAMEWORKS + ('transformers',)} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# Run in a child where MLX is not importable, as where it is not installed (a None entry in sys.modules makes
# `import mlx...` fail and importlib.util.find_spec answer None, which libraries probing for MLX expect).
NO_MLX = """
import sys
sys.modules.update(mlx=None, mlx_lm=None)
from convert.__main__ import main
code = main(sys.argv[1:])
assert not [m for m in sys.modules if m.split(".")[0] == "mlx_t5"], "mlx_t5 was imported"
sys.exit(code)
"""


def test_convert_to_onnx_runs_without_mlx(tmp_path, tokenizer_dir):
    from hf_models import save_model

    model = save_model("odd-heads", tmp_path / "hf", tokenizer_dir)
    argv = ["to-onnx", "--model", str(model), "--out", str(tmp_path / "onnx")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", NO_MLX, *argv], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((tmp_path / "onnx" / "onnx.json").read_text())["format"] == "onnx-t5"
    # the block works: an MLX subcommand fails in the same child
    result = subprocess.run([sys.executable, "-c", NO_MLX, "hf-to-mlx", "--model", str(model), "--out",
                             str(tmp_path / "mlx")], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode != 0 and "No module named 'mlx" in result.stderr, result.stderr


def test_install_has_the_packages_and_console_scripts():
    """pyproject installs every package of the checkout and no generic top-level module (api, chat, ...);
    each console script names a main() that exists (read from the source: importing mlx_t5.generate here
    would rebind the function mlx_t5.generate to the CLI module for the rest of the session)."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = project["tool"]["setuptools"]
    assert "py-modules" not in setuptools
    packages = {".".join(init.parent.relative_to(ROOT).parts) for top in ROOT.glob("[!.]*/__init__.py")
                for init in top.parent.rglob("__init__.py")}
    assert set(setuptools["packages"]) == packages
    scripts = project["project"]["scripts"]
    assert {"t5r-train-mlx", "t5r-train-torch", "t5r-convert", "t5r-chat", "t5r-api"} <= set(scripts)
    modules = project_modules()
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        tree = ast.parse(modules[module].read_text(encoding="utf-8"))
        assert function in [node.name for node in tree.body if isinstance(node, ast.FunctionDef)], name


@pytest.mark.parametrize("script", ["chat.py", "api.py"])
def test_root_scripts_are_the_serving_commands(script):
    """chat.py / api.py at the root of a checkout (the README's commands) run serving.chat / serving.api."""
    result = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--model" in result.stdout and "--backend" in result.stdout


def long_functions(path: Path, limit: int = 50) -> list[str]:
    tree = ast.parse(path.read_text())
    return [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > limit]


@pytest.mark.parametrize("module", ["mlx_t5/trainer.py", "mlx_t5/checkpoint.py"])
def test_the_trainer_reads_as_short_functions(module):
    """The trainer is a recipe of small named steps (build_run, train_loop, maybe_*, finish), none over 50 lines."""
    assert long_functions(ROOT / module) == []


def test_the_length_check_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(60))
    (tmp_path / "m.py").write_text(f"def long():\n{body}\n\ndef short():\n    return 1\n")
    assert long_functions(tmp_path / "m.py") == ["long (61 lines)"]


def test_no_test_hooks_in_the_trainer():
    """Tests kill real processes and monkeypatch; the product code has no switches for them."""
    source = (ROOT / "mlx_t5" / "trainer.py").read_text()
    assert "stop_after" not in source and "recompute =" not in source and '"killed"' not in source
