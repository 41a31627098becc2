"""``serve_apps``' modules import one way (no Ray, no server): nothing imports the Ingress but the app builder
(``app.py``, which binds it), and the imports among the modules have no cycle. Every import counts, those
under ``if TYPE_CHECKING:`` and inside functions too: a surface (``openai_routes.py``, ``realtime.py``) is
typed and called through :class:`~serve_apps.answers.Answers`, the answering API every surface shares,
never through the Ingress."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

SERVE_APPS = Path(__file__).resolve().parents[1] / "serve_apps"
MODULES = sorted(p.stem for p in SERVE_APPS.glob("*.py"))
BINDS_THE_INGRESS = {"app"}  # the application builder: Ingress.bind(...)


def imports(module: str) -> set[str]:
    """The ``serve_apps`` modules that ``module`` imports, wherever in it: ``from .x import``, ``from . import
    x``, ``from serve_apps.x import``, ``import serve_apps.x``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse((SERVE_APPS / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".") if node.module else []
            if node.level == 0:
                if not parts or parts[0] != "serve_apps":
                    continue
                parts = parts[1:]
            elif node.level > 1:  # above serve_apps: not one of its modules
                continue
            found |= {parts[0]} if parts else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("serve_apps.")}
    return found & set(MODULES)


def test_the_imports_are_read_from_every_kind_of_statement():
    assert "ingress" in imports("app")  # from .ingress import Ingress
    assert {"auth", "answers", "openai_routes", "realtime"} <= imports("ingress")  # from . import auth, ...
    assert "answers" in imports("realtime")  # under TYPE_CHECKING


@pytest.mark.parametrize("module", sorted(set(MODULES) - BINDS_THE_INGRESS - {"ingress"}))
def test_no_module_but_the_app_builder_imports_the_ingress(module):
    assert "ingress" not in imports(module), (
        f"serve_apps/{module}.py imports serve_apps.ingress: call the answering API (serve_apps/answers.py, "
        "Answers) instead, and type it with Answers")


def test_the_surfaces_answer_through_the_answers_api():
    for surface in ("ingress", "openai_routes", "realtime"):
        assert "answers" in imports(surface), surface


def test_serve_apps_imports_have_no_cycle():
    graph = {m: imports(m) - {m} for m in MODULES}
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        if m in path:
            cycle = path[path.index(m):] + [m]
            pytest.fail("an import cycle in serve_apps: " + " -> ".join(cycle))
        if m in done:
            return
        for n in sorted(graph[m]):
            visit(n, path + [m])
        done.add(m)

    for m in MODULES:
        visit(m, [])


@pytest.mark.parametrize("module", [m for m in MODULES if m != "__init__"])
def test_every_module_imports(module):
    importlib.import_module(f"serve_apps.{module}")
