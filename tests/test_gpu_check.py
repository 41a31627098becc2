"""``python -m benchmarks.gpu_check``, the prepared GPU run (issue 15), at the tiny size on the CPU: every section
runs and writes its figures, its correctness checks (the CUDA tests ``tests/test_cuda_*.py``, through pytest or,
without pytest, the direct runner) pass, and nothing it or those tests import needs Ray or DeepSpeed (the
device image has neither). The device runs the same code at DeepSeek-V2-Lite size."""

from __future__ import annotations

import ast
import json
import math
import re
import sys
from pathlib import Path

import torch

from benchmarks import gpu_check
from benchmarks.gpu import checks as gpu_checks
from benchmarks.gpu.common import SIZES, Context, check_target, cuda_checks_enabled

ROOT = Path(__file__).resolve().parents[1]
CUDA_TESTS = {
    "test_cuda_moe.py": {"test_moe_grouped_mm_matches_loop", "test_moe_layer_matches_transformers_eager"},
    "test_cuda_decode.py": {"test_incremental_kv_cache_matches_full_forward",
                            "test_incremental_slot_cache_matches_full_forward", "test_decode_uses_absorbed_attention",
                            "test_absorbed_matches_expanded_1_query", "test_absorbed_matches_expanded_4_queries",
                            "test_absorbed_matches_expanded_1_query_sharp"},
}


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_gpu_check_tiny_cpu_writes_every_section(tmp_path):
    rc = gpu_check.main(["--device", "cpu", "--preset", "tiny", "--out", str(tmp_path), "--threads", "1"])
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert (tmp_path / "gpu_check.log").read_text().strip()
    secs = data["sections"]
    for name in gpu_check.SECTIONS:
        assert secs[name]["status"] == "ok", secs[name].get("traceback")
        assert _number(secs[name]["wall_s"])
    assert data["env"]["torch"] and data["env"]["transformers"] and data["env"]["dtype"] == "bfloat16"
    assert data["forbidden_modules_loaded"] == []

    # 1. correctness: every CUDA test ran (through pytest) and passed, with real error figures
    checks = secs["checks"]
    assert checks["runner"].startswith("pytest") and checks["exit_code"] == 0 and checks["passed"] is True
    assert checks["environment"]["DEEPOMNI_CUDA_CHECKS_DEVICE"] == "cpu"
    figures = _check_figures(checks)
    moe = figures["test_moe_grouped_mm_matches_loop"]["tensors"]
    assert {"out", "grad_x", "grad_experts_gate_up", "grad_experts_down", "grad_router"} <= set(moe)
    for r in moe.values():
        assert _number(r["rel_err"]) and r["rel_err"] <= r["tolerance"] < 0.1
        assert 0 < r["baseline_rel_err"]  # bf16 really differs from fp32: the comparison is not vacuous
    for cache in ("kv_cache", "slot_cache"):
        r = figures[f"test_incremental_{cache}_matches_full_forward"]
        assert r["bf16"]["passed"] and r["fp32"]["passed"] and r["fp32"]["rel_err"] < 1e-4
    assert all(figures["test_decode_uses_absorbed_attention"].values())
    assert figures["test_absorbed_matches_expanded_1_query"]["fp32"]["rel_err"] < 1e-5
    assert figures["test_absorbed_matches_expanded_4_queries"]["bf16"]["passed"]
    hf = figures["test_moe_layer_matches_transformers_eager"]
    assert hf["out"]["passed"] and hf["grad_x"]["passed"] and hf["shape"]["tokens"] == SIZES["tiny"].moe_tokens

    # 2. MoE layer: every implementation timed, the check against transformers passed
    m = secs["moe_layer"]
    assert set(m["rows"]) == {"ours grouped_mm", "ours loop", "hf eager", "hf grouped_mm", "dense matmul"}
    assert all(_number(r["median_ms"]) and r["tflops"] > 0 for r in m["rows"].values())
    assert all(_number(v) for v in m["ratios"].values()) and set(m["goals"]) == {
        "at_least_1x_transformers_grouped_mm", "at_least_50pct_of_dense_rate"}
    assert m["shape"]["tokens"] == SIZES["tiny"].moe_tokens and m["shape"]["hidden"] == hf["shape"]["hidden"]

    # 3. serving: TTFA for 1 and N sessions, decode steps at every row count
    s = secs["serving"]
    for k in ("1_session", "concurrent", "sequential"):
        assert _number(s["ttfa"][k]["p50_ms"]) and s["ttfa"][k]["p99_ms"] >= s["ttfa"][k]["p50_ms"] > 0
    assert _number(s["ttfa"]["concurrency_gain"]) and isinstance(s["goal_ttfa_1_session_under_250ms"], bool)
    rows = [str(r) for r in SIZES["tiny"].step_rows]
    assert set(s["decode_step"]["text_rows"]) == set(s["decode_step"]["forward_only"]) == set(rows)
    for r in rows:
        assert 0 < s["decode_step"]["text_rows"][r]["rows_mean"] <= int(r)  # a session may end early (EOT)
        assert s["decode_step"]["text_rows"][r]["step_ms"] > 0 and s["decode_step"]["forward_only"][r]["forward_ms"] > 0
    assert all(x["rows_mean"] > 0 for x in s["decode_step"]["speech_sessions"].values())
    att = s["decode_attention"]
    assert att["decode_uses_absorbed"] and _number(att["absorbed_ms"]) and _number(att["expanded_ms"])

    # 4. training: a finite loss, throughput, and a plan whose shares add up
    t = secs["training"]
    assert t["loss_finite"] and t["tokens_per_s"] > 0 and t["peak_memory_gib"] > 0
    plan = t["memory_plan"]
    p = plan["parameters"]
    assert p["routed_experts"] > 0 and p["speech_encoder_frozen"] > 0
    assert p["replicated_trainable"] + p["routed_experts"] + p["speech_encoder_frozen"] == p["total"]
    z2, no_zero = plan["per_gpu"], plan["per_gpu_without_zero"]
    assert 0 < z2["total_states_gib"] < no_zero["total_states_gib"]
    assert math.isclose(z2["total_states_gib"],
                        z2["bf16_weights_gib"] + z2["bf16_grads_gib"] + z2["fp32_master_and_adam_gib"])
    assert "ZeRO-2" in plan["formula"]

    summary = data["summary"]
    assert summary["sections_ok"] == list(gpu_check.SECTIONS) and summary["checks_passed"] is True
    assert summary["moe_check_passed"] is True
    assert rc == 0


def _check_figures(checks: dict) -> dict[str, dict]:
    """Every CUDA test passed and recorded its figures: ``{test name: figures}``."""
    want = {f"tests/{f}::{name}" for f, names in CUDA_TESTS.items() for name in names}
    assert set(checks["tests"]) == want, sorted(set(checks["tests"]) ^ want)
    assert checks["counts"] == {"passed": len(want), "failed": 0, "error": 0, "skipped": 0}
    for nodeid, t in checks["tests"].items():
        assert t["outcome"] == "passed", (nodeid, t.get("longrepr"))
        assert _number(t["duration_s"]) and "figures" in t["properties"], nodeid
    return {nodeid.rpartition("::")[2]: t["properties"]["figures"] for nodeid, t in checks["tests"].items()}


def test_checks_without_pytest_run_the_tests_directly(tmp_path, monkeypatch):
    """On an image without pytest the checks section calls the test functions itself, and says so."""
    monkeypatch.setitem(sys.modules, "pytest", None)  # `import pytest` raises ImportError from here on
    ctx = Context(torch.device("cpu"), "tiny", SIZES["tiny"], 0, tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the run above (--threads 1): tiny work, a shared machine
    try:
        res = gpu_checks.section_checks(ctx)
    finally:
        torch.set_num_threads(threads)
    assert res["runner"].startswith("direct") and res["passed"] is True, res
    figures = _check_figures(res)
    assert figures["test_moe_grouped_mm_matches_loop"]["device"] == "cpu"
    assert any("checks: direct" in line for line in ctx.log_lines)


def test_cuda_tests_skip_without_cuda_unless_asked(monkeypatch):
    monkeypatch.delenv("DEEPOMNI_CUDA_CHECKS_DEVICE", raising=False)
    monkeypatch.delenv("DEEPOMNI_CUDA_CHECKS_PRESET", raising=False)
    assert cuda_checks_enabled() == torch.cuda.is_available()
    assert check_target().preset == "deepseek-v2-lite" and check_target().device.type == "cuda"
    monkeypatch.setenv("DEEPOMNI_CUDA_CHECKS_DEVICE", "cpu")
    assert cuda_checks_enabled() and check_target().preset == "tiny" and check_target().size == SIZES["tiny"]
    assert sorted(p.name for p in gpu_checks.test_files()) == sorted(CUDA_TESTS)


def _import_nodes(tree: ast.Module, top_level_only: bool):
    """Import statements anywhere (``top_level_only=False``), or those that run on import: module level,
    inside top-level ``if`` / ``try`` / ``with`` (not ``if TYPE_CHECKING``), not in functions or classes."""
    if not top_level_only:
        yield from (n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)))
        return
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
            stack.extend(node.body + node.orelse)
        elif isinstance(node, (ast.Try, ast.With, ast.ExceptHandler)):
            stack.extend(ast.iter_child_nodes(node))


def _imports(path: Path, module: str, top_level_only: bool) -> set[str]:
    """Absolute names of the modules ``path`` (module ``module``) imports, relative imports resolved; for
    ``from a import b`` both ``a`` and ``a.b`` (b may be a submodule)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text()), top_level_only):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
            continue
        base = node.module or ""
        if node.level:
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
        out.add(base)
        out.update(f"{base}.{a.name}" for a in node.names)
    return out


def _source(module: str) -> Path | None:
    if not module.startswith(("deepomni", "benchmarks")):
        return None
    base = ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def test_gpu_check_imports_neither_ray_nor_deepspeed():
    """What the run imports (anywhere in its files: its sections import lazily; ``benchmarks/gpu/*.py``, which it
    imports by name, and the CUDA tests it runs), what pytest loads with them (``tests/conftest.py``), and what
    those modules and their packages import when loaded, reaches neither Ray nor DeepSpeed."""
    roots = [(ROOT / "benchmarks" / "gpu_check.py", "benchmarks.gpu_check")]
    roots += [(p, f"benchmarks.gpu.{p.stem}".removesuffix(".__init__"))
              for p in (ROOT / "benchmarks" / "gpu").glob("*.py")]
    roots += [(p, p.stem) for p in gpu_checks.test_files()]
    assert {p.name for p, _ in roots} >= set(CUDA_TESTS) | {"checks.py", "serving.py", "training.py", "moe_layer.py"}
    seen: set[str] = set()
    todo = sorted(m for path, module in roots for m in _imports(path, module, top_level_only=False))
    todo += sorted(_imports(ROOT / "tests" / "conftest.py", "conftest", top_level_only=True))
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py, a/b/__init__.py, a/b/c.py
            name = ".".join(parts[:i])
            path = _source(name)
            if path is not None:
                todo.extend(_imports(path, name, top_level_only=True) - seen)
    reached = {m.split(".")[0] for m in seen}
    assert "deepomni" in reached and "transformers" in reached and "benchmarks" in reached
    assert not reached & set(gpu_check.FORBIDDEN), sorted(reached & set(gpu_check.FORBIDDEN))


def test_gpu_run_is_a_module_without_sys_path_edits():
    """The run's files import as modules of the repository root (``python -m benchmarks.gpu_check``): none of
    them touches ``sys.path``; and the device command in the docstring runs it that way."""
    files = [ROOT / "benchmarks" / "gpu_check.py", ROOT / "benchmarks" / "moe_layer.py",
             *(ROOT / "benchmarks" / "gpu").glob("*.py"), *gpu_checks.test_files()]
    for path in files:
        tree = ast.parse(path.read_text())
        touched = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "path"
                   and isinstance(n.value, ast.Name) and n.value.id == "sys"]
        assert not touched, f"{path.relative_to(ROOT)} uses sys.path at lines {touched}"
        assert len(path.read_text().splitlines()) < 450, path
    command = re.search(r"^ +command: +(.+)$", gpu_check.__doc__, re.M).group(1)
    assert command.endswith("&& timeout 480 python3 -m benchmarks.gpu_check --device cuda"), command
    assert "export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1" in command and "--target /tmp/site .whl/*.whl" in command
