"""The project's layers, checked from the source: no import runs back up them, no two files import each other
round a circle, no file is over :data:`MAX_LINES` lines without saying why at its top.

    config, weights, text, atomic writes (what everything stands on)
    model, codec, audio, parallel
    data, checkpoints
    train, serve, foundations
    serve_apps, deepomni.hf (applications of the layers below)
    the command line (every ``cli.py``, ``deepomni.cli``, ``smoke``), jobs, benchmarks, cluster

Every ``import`` counts, those inside functions too: a lazy import still ties the two files together.
``python tests/test_layers.py`` prints the graph's findings (what the issue-27 note reports before/after).
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREES = ("deepomni", "serve_apps", "jobs", "benchmarks", "cluster", "manifests", "tests")
MAX_LINES = 450
REASON = "Longer than 450 lines because"  # how a file over MAX_LINES says why, in its module docstring

# module prefix -> layer (the longest prefix wins); a module named `cli` is always the command line
LAYERS = {
    "deepomni": 0, "deepomni.audio": 1,
    "deepomni.model": 1, "deepomni.codec": 1, "deepomni.parallel": 1,
    "deepomni.data": 2, "deepomni.checkpoint": 2,
    "deepomni.train": 3, "deepomni.serve": 3, "deepomni.foundations": 3,
    "serve_apps": 4, "deepomni.hf": 4,
    "deepomni.cli": 5, "deepomni.smoke": 5, "jobs": 5, "benchmarks": 5, "cluster": 5, "manifests": 5,
    "tests": 6,
}
CLI = 5


def modules() -> dict[str, Path]:
    """Every Python file of the project by module name (``deepomni/model/__init__.py`` -> ``deepomni.model``)."""
    out = {}
    for tree in TREES:
        for path in sorted((ROOT / tree).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def layer(module: str) -> int:
    if module.rsplit(".", 1)[-1] == "cli" and not module.startswith("tests"):
        return CLI
    prefix = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[prefix]


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``module`` imports (a name imported from a package is the submodule if one exists;
    a bare name is a sibling file of the same folder, what ``sys.path`` inserts make importable)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()

    def add(name: str) -> None:
        if name in known:
            found.add(name)
        elif "." not in name and f"{package.rpartition('.')[0] or package}.{name}" in known:
            found.add(f"{package.rpartition('.')[0] or package}.{name}")

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name)
                sibling = f"{package}.{a.name}"
                if "." not in a.name and sibling in known:
                    found.add(sibling)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
                if "." not in name and f"{package}.{name}" in known:
                    name = f"{package}.{name}"
            for a in node.names:
                if f"{name}.{a.name}" in known:
                    found.add(f"{name}.{a.name}")
                elif name in known:
                    found.add(name)
    found.discard(module)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(m, p, known) for m, p in known.items()}


def upward(g: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports from a lower layer to a higher one. A package's ``__init__`` may name its own submodules."""
    return sorted((a, b) for a, deps in g.items() for b in deps
                  if layer(b) > layer(a) and not b.startswith(a + "."))


def circles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one file (Tarjan), a package's ``__init__`` re-exporting its
    submodules left out (that edge is the package's own)."""
    g = {a: {b for b in deps if not b.startswith(a + ".")} for a, deps in g.items()}
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    sys.setrecursionlimit(10000)
    for v in sorted(g):
        if v not in index:
            visit(v)
    return sorted(out)


def long_files() -> list[tuple[int, str, bool]]:
    """(lines, path, says why) of every file over MAX_LINES."""
    out = []
    for path in modules().values():
        text = path.read_text()
        n = text.count("\n")
        if n > MAX_LINES:
            out.append((n, str(path.relative_to(ROOT)), REASON in " ".join((ast.get_docstring(ast.parse(text)) or "").split())))
    return sorted(out, reverse=True)


def test_no_import_runs_up_the_layers():
    assert upward(graph()) == []


def test_no_import_circles():
    assert circles(graph()) == []


def test_long_files_say_why():
    assert [f for f in long_files() if not f[2]] == []


def test_the_checks_can_fail():
    """The analysis finds what it must: an upward import, a circle and a file's submodule import."""
    g = {"deepomni.model.a": {"deepomni.train.b"}, "deepomni.train.b": {"deepomni.model.a"}}
    assert upward(g) == [("deepomni.model.a", "deepomni.train.b")]
    assert circles(g) == [["deepomni.model.a", "deepomni.train.b"]]
    assert layer("deepomni.data.cli") == CLI and layer("deepomni.hf.export") == 4
    assert "deepomni.model.moe" in graph()["deepomni.model.model"]


if __name__ == "__main__":
    g = graph()
    print(f"{len(g)} files, {sum(map(len, g.values()))} imports between them")
    up = upward(g)
    print(f"upward imports: {len(up)}")
    for a, b in up:
        print(f"  {a} ({layer(a)}) -> {b} ({layer(b)})")
    cs = circles(g)
    print(f"circles: {len(cs)}")
    for c in cs:
        print("  " + " <-> ".join(c))
    lf = long_files()
    print(f"files over {MAX_LINES} lines: {len(lf)}")
    for n, p, why in lf:
        print(f"  {n:5d} {p}{'' if why else '  (no reason stated)'}")
