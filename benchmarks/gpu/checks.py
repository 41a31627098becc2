"""The GPU run's ``checks`` section: the CUDA tests (``tests/test_cuda_*.py``, marked ``cuda``) on the run's
device, preset and seed (passed to them as ``DEEPOMNI_CUDA_CHECKS_*``), each test's outcome and figures
(what it gave ``record_property``) recorded in the run's JSON.

* pytest importable (the venv; on the device image when its wheels travel in ``.whl/``): ``pytest.main`` in
  this process on those files with ``-m cuda``, a small plugin collecting each test's report;
* else: :func:`run_direct` imports each file and calls its ``test_*`` functions in order (``setup_module`` /
  ``teardown_module`` around them), giving ``record_property`` a recorder: the test modules import without
  pytest for that. ``runner`` in the JSON says which ran.
"""

from __future__ import annotations

import importlib.util
import inspect
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.gpu.common import ENV_DEVICE, ENV_PRESET, ENV_SEED, Context, environ, free_memory
from benchmarks.harness import ROOT

TESTS = ROOT / "tests"
PATTERN = "test_cuda_*.py"
MARKER = "cuda"
LONGREPR_CHARS = 4000  # a failure's report kept in the JSON (its end)


def test_files() -> list[Path]:
    return sorted(TESTS.glob(PATTERN))


def _nodeid(path: Path, name: str) -> str:
    return f"{path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path}::{name}"


class Collector:
    """A pytest plugin: each test's outcome (the worst of its setup / call / teardown), duration and properties."""

    def __init__(self) -> None:
        self.tests: dict[str, dict[str, Any]] = {}

    def pytest_runtest_logreport(self, report) -> None:
        t = self.tests.setdefault(report.nodeid, {"outcome": "passed", "duration_s": 0.0, "properties": {}})
        t["duration_s"] += report.duration
        t["properties"].update(dict(report.user_properties))
        if report.failed:
            t["outcome"] = "failed" if report.when == "call" else "error"
            t.setdefault("longrepr", report.longreprtext[-LONGREPR_CHARS:])
        elif report.skipped and t["outcome"] == "passed":
            t["outcome"] = "skipped"
            longrepr = report.longrepr
            t["reason"] = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)

    def pytest_collectreport(self, report) -> None:
        if report.failed:
            self.tests[report.nodeid or "collection"] = {"outcome": "error", "duration_s": 0.0, "properties": {},
                                                         "longrepr": report.longreprtext[-LONGREPR_CHARS:]}


def run_pytest(pytest, files: list[Path]) -> dict:
    """``pytest.main`` on ``files`` with ``-m cuda``, in this process."""
    collector = Collector()
    args = [*(str(f) for f in files), "-m", MARKER, "-p", "no:cacheprovider", "-q", "-W", "ignore",
            "--rootdir", str(ROOT)]
    recorded = list(args)  # pytest.main prepends the ini's addopts to the list it is given
    code = pytest.main(args, plugins=[collector])
    return {"runner": f"pytest {pytest.__version__} (pytest.main in-process)", "pytest_args": recorded,
            "exit_code": int(code), "tests": collector.tests}


def run_direct(files: list[Path], why: str = "pytest not importable") -> dict:
    """Each file's ``test_*`` functions called in order (no pytest): a test passes when it returns, fails on an
    ``AssertionError``, errs on anything else; ``setup_module`` / ``teardown_module`` run around them."""
    tests: dict[str, dict[str, Any]] = {}
    for path in files:
        name = f"deepomni_cuda_checks.{path.stem}"  # not the name pytest gives it: a module of its own
        try:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            if hasattr(module, "setup_module"):
                module.setup_module()
        except Exception:
            tests[_nodeid(path, "<module>")] = {"outcome": "error", "duration_s": 0.0, "properties": {},
                                                "longrepr": traceback.format_exc()[-LONGREPR_CHARS:]}
            continue
        functions = [(n, f) for n, f in vars(module).items()
                     if n.startswith("test_") and inspect.isfunction(f) and f.__module__ == name]
        try:
            for fname, fn in functions:
                props: dict[str, Any] = {}
                kwargs = {"record_property": props.__setitem__} if "record_property" in \
                    inspect.signature(fn).parameters else {}
                t0 = time.perf_counter()
                entry: dict[str, Any] = {"outcome": "passed", "properties": props}
                try:
                    fn(**kwargs)
                except AssertionError:
                    entry.update(outcome="failed", longrepr=traceback.format_exc()[-LONGREPR_CHARS:])
                except Exception:
                    entry.update(outcome="error", longrepr=traceback.format_exc()[-LONGREPR_CHARS:])
                except BaseException as e:  # pytest.skip's exception, where pytest is importable after all
                    if type(e).__name__ != "Skipped":
                        raise
                    entry.update(outcome="skipped", reason=str(e))
                entry["duration_s"] = time.perf_counter() - t0
                tests[_nodeid(path, fname)] = entry
        finally:
            if hasattr(module, "teardown_module"):
                module.teardown_module()
    return {"runner": f"direct ({why}: benchmarks.gpu.checks.run_direct)", "exit_code": None,
            "tests": tests}


def section_checks(ctx: Context, runner: str = "auto") -> dict:
    """The CUDA tests on ``ctx``'s device, preset and seed. ``runner``: auto (pytest when importable, else
    direct) | pytest | direct."""
    files = test_files()
    env = {ENV_DEVICE: str(ctx.device), ENV_PRESET: ctx.preset, ENV_SEED: str(ctx.seed)}
    pytest = None
    if runner in ("auto", "pytest"):
        try:
            import pytest
        except ImportError:
            if runner == "pytest":
                raise
    with environ(env):
        if pytest is not None:
            res = run_pytest(pytest, files)
        else:
            res = run_direct(files, "pytest not importable" if runner == "auto" else "--checks-runner direct")
    free_memory(ctx.device)  # what the tests held (their modules drop their models in teardown_module)
    outcomes = [t["outcome"] for t in res["tests"].values()]
    res["files"] = [f.relative_to(ROOT).as_posix() for f in files]
    res["environment"] = env
    res["counts"] = {k: outcomes.count(k) for k in ("passed", "failed", "error", "skipped")}
    res["passed"] = bool(outcomes) and all(o == "passed" for o in outcomes)
    for nodeid, t in res["tests"].items():
        ctx.log(f"  checks/{nodeid.rpartition('::')[2]}: {t['outcome']} ({t['duration_s']:.1f} s)")
    ctx.log(f"  checks: {res['runner']}: {res['counts']}")
    return res
