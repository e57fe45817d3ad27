"""The package's layering: no import cycles between modules, a codec and a config that do not
need torch, and no method name compared outside the method classes."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).parents[1] / "src"
PACKAGE = SRC / "mpfl"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = SRC.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def top_level_imports(path: Path) -> set[str]:
    """The mpfl modules a module imports when it is imported (not under TYPE_CHECKING, not in functions)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("mpfl"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith("mpfl"):
                continue
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if is_module(f"{base}.{alias.name}") else base)
    return {m for m in found if m != name}


def import_graph() -> dict[str, set[str]]:
    graph = {module_name(p): top_level_imports(p) for p in PACKAGE.rglob("*.py")}
    for name, deps in graph.items():
        # importing a.b.c first runs a/__init__ and a/b/__init__ (a module's own packages are already running)
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
        deps.update({".".join(d.split(".")[:i]) for d in list(deps) for i in range(1, d.count(".") + 1)})
        deps.difference_update(own)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_level_import_cycle():
    graph = import_graph()
    assert "mpfl.server" in graph["mpfl.sim"] and "mpfl.methods" in graph["mpfl.config"]
    assert find_cycle(graph) is None


def test_codec_and_config_do_not_import_torch():
    for module in ("mpfl.codec", "mpfl.config", "mpfl.methods"):
        code = f"import sys, {module}; {module}.__name__; from mpfl.config import Config; Config(); " \
               "print('torch' in sys.modules)"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "False", module


def test_no_method_name_is_compared_outside_the_method_classes():
    compare = re.compile(r"""method\)?\s*(==|!=|not in|in)\s*[\(\["']""")
    offenders = [f"{p.relative_to(SRC)}:{i}: {line.strip()}"
                 for p in PACKAGE.rglob("*.py") if "methods" not in p.relative_to(PACKAGE).parts
                 for i, line in enumerate(p.read_text().splitlines(), start=1) if compare.search(line)]
    assert offenders == []
    assert compare.search('if cfg.method == "fedavg":') and compare.search("r.method in ('mpfl', 'local')")
