"""``benchmarks/gpu_check.py``, the prepared GPU run (issue 15), at the tiny size on the CPU: every section
runs and writes its figures, its correctness checks pass, and nothing it imports needs Ray or DeepSpeed
(the device image has neither). The device runs the same code at DeepSeek-V2-Lite size."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]


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

    # 1. correctness: every check ran and passed, with real error figures
    checks = secs["checks"]
    for name in ("moe_grouped_vs_loop", "incremental_vs_full", "absorbed_vs_expanded"):
        assert checks[name]["passed"] is True, checks[name]
    moe = checks["moe_grouped_vs_loop"]["tensors"]
    assert {"out", "grad_x", "grad_experts_gate_up", "grad_experts_down", "grad_router"} <= set(moe)
    for r in moe.values():
        assert _number(r["rel_err"]) and r["rel_err"] <= r["tolerance"] < 0.1
        assert 0 < r["baseline_rel_err"]  # bf16 really differs from fp32: the comparison is not vacuous
    for cache in ("kv_cache", "slot_cache"):
        r = checks["incremental_vs_full"][cache]
        assert r["bf16"]["passed"] and r["fp32"]["passed"] and r["fp32"]["rel_err"] < 1e-4
    att = checks["absorbed_vs_expanded"]
    assert att["decode_uses_absorbed"]
    assert att["queries_1"]["fp32"]["rel_err"] < 1e-5 and att["queries_4"]["bf16"]["passed"]
    assert all(_number(v) for v in att["decode_attention_ms"].values())

    # 2. MoE layer: every implementation timed, the check against transformers passed
    m = secs["moe_layer"]
    assert set(m["rows"]) == {"ours grouped_mm", "ours loop", "hf eager", "hf grouped_mm", "dense matmul"}
    assert all(_number(r["median_ms"]) and r["tflops"] > 0 for r in m["rows"].values())
    assert all(_number(v) for v in m["ratios"].values()) and set(m["goals"]) == {
        "at_least_1x_transformers_grouped_mm", "at_least_50pct_of_dense_rate"}
    assert m["check"]["passed"] and m["shape"]["tokens"] == gpu_check.SIZES["tiny"].moe_tokens

    # 3. serving: TTFA for 1 and N sessions, decode steps at every row count
    s = secs["serving"]
    for k in ("1_session", "concurrent", "sequential"):
        assert _number(s["ttfa"][k]["p50_ms"]) and s["ttfa"][k]["p99_ms"] >= s["ttfa"][k]["p50_ms"] > 0
    assert _number(s["ttfa"]["concurrency_gain"]) and isinstance(s["goal_ttfa_1_session_under_250ms"], bool)
    rows = [str(r) for r in gpu_check.SIZES["tiny"].step_rows]
    assert set(s["decode_step"]["text_rows"]) == set(s["decode_step"]["forward_only"]) == set(rows)
    for r in rows:
        assert 0 < s["decode_step"]["text_rows"][r]["rows_mean"] <= int(r)  # a session may end early (EOT)
        assert s["decode_step"]["text_rows"][r]["step_ms"] > 0 and s["decode_step"]["forward_only"][r]["forward_ms"] > 0
    assert all(x["rows_mean"] > 0 for x in s["decode_step"]["speech_sessions"].values())

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
    assert rc == 0


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
    """What the script imports (anywhere in it: its sections import lazily), and what those modules and their
    packages import when loaded, reaches neither Ray nor DeepSpeed."""
    seen: set[str] = set()
    todo = sorted(_imports(ROOT / "benchmarks" / "gpu_check.py", "benchmarks.gpu_check", top_level_only=False))
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
    assert "deepomni" in reached and "transformers" in reached
    assert not reached & set(gpu_check.FORBIDDEN), sorted(reached & set(gpu_check.FORBIDDEN))
