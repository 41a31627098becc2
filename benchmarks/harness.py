"""What every benchmark shares: the machine's facts, saving results, the Serve app started and stopped, timing.

    from benchmarks.harness import machine, percentile, save_result, serve_app

    with serve_app({"checkpoint": readable_checkpoint(tmp), "max_steps": 32}) as (url, mode):
        ...                                        # the app on 127.0.0.1:<free port>, an embedded local Ray
    save_result("serve_latency", {"machine": machine(), ...})   # benchmarks/results/serve_latency.json

Benchmarks run as modules from the repository root (``python -m benchmarks.<name>``), so they import each
other and the package as ``benchmarks.<name>`` / ``deepomni``, ``serve_apps`` without touching ``sys.path``.
The tests use :func:`serve_app` and :func:`readable_checkpoint` too (``tests/helpers``): one start-up sequence.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serve_apps.ray_mode import free_port  # a TCP port free on 127.0.0.1 now (stdlib only)

if TYPE_CHECKING:
    import argparse

    from deepomni.model.model import DeepOmniModel

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LOOPBACK = "127.0.0.1"


# ------------------------------------------------------------------------------------------- machine, results
def machine() -> dict:
    """Where a figure was measured: CPU, cores, Python, torch (and its device), Ray, the git commit."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    try:
        ray_version = version("ray")  # without importing Ray (the GPU image has none; its checks forbid it)
    except PackageNotFoundError:
        ray_version = None
    git = {}
    for key, cmd in (("git_commit", ["git", "rev-parse", "HEAD"]), ("git_dirty", ["git", "status", "--porcelain"])):
        try:
            out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = None
        git[key] = out if key == "git_commit" else (None if out is None else bool(out))
    return {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "ray": ray_version, **git}


def command(module: str, argv: Sequence[str] | None = None) -> str:
    """The command line that ran a benchmark: ``python -m benchmarks.<module> <argv>`` (argv: sys.argv's)."""
    import shlex
    import sys

    return f"python -m benchmarks.{module} {shlex.join(sys.argv[1:] if argv is None else argv)}".strip()


def parser(module: str, doc: str) -> "argparse.ArgumentParser":
    """The benchmark's command-line parser: ``python -m benchmarks.<module>`` in its usage line, ``doc`` (its
    module docstring) as the description, laid out as written."""
    import argparse

    return argparse.ArgumentParser(prog=f"python -m benchmarks.{module}", description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def save_result(name_or_path: str | Path, data: Mapping[str, Any]) -> Path:
    """Write ``data`` as JSON to ``benchmarks/results/<name>.json`` (or to the path given) and say where."""
    path = Path(name_or_path)
    if path.suffix != ".json":
        path = RESULTS / f"{name_or_path}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    print(f"saved {path}", flush=True)
    return path


# ------------------------------------------------------------------------------------------------ timing
def percentile(values: Sequence[float], p: float) -> float | None:
    """The ``p``-th percentile of ``values``: the value at rank ``round(p / 100 * (n - 1))`` of the sorted
    values (p99 of fewer than 51 values is the largest); None when there are none."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))] if ordered else None


# ------------------------------------------------------------------------------------------------ models
def readable_text_head(model: DeepOmniModel) -> DeepOmniModel:
    """The model's text head limited to printable ASCII (specials too are zeroed, so answers end at
    max_steps), so the byte tokenizer turns a random model's answers into visible text that reads back as
    the same tokens (a conversation's next turn then extends the context the Backbone kept); codec channels
    untouched. In place; returns the model."""
    import torch

    keep = torch.zeros(model.layout.total_size, dtype=torch.bool)
    keep[32:127] = True
    keep[model.layout.channel_size(0):] = True
    with torch.no_grad():
        for w in (model.embed.weight, model.embed.head_weight):
            if w is not None:
                w[~keep] = 0.0
    return model


def readable_checkpoint(directory: str | Path) -> str:
    """The tiny preset's random weights (seed 0) with :func:`readable_text_head`, saved to ``directory``."""
    import torch

    from deepomni.checkpoint import save_model
    from deepomni.config import load_preset
    from deepomni.model.model import DeepOmniModel

    torch.manual_seed(0)
    model = readable_text_head(DeepOmniModel(load_preset("tiny")).init_weights(seed=0))
    return str(save_model(model, directory))


# ------------------------------------------------------------------------------------------------- serve
@contextmanager
def serve_app(app_args: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Iterator[tuple[str, dict]]:
    """The Serve app as ``deepomni serve`` runs it (``serve_apps/config.yaml``'s deployments, Ray Serve's
    high-throughput mode when HAProxy is installed), with ``app_args`` (AppConfig's fields, plus
    ``serve_config``), on an embedded local Ray and a free port of 127.0.0.1. Yields ``(base URL, the Ray
    Serve mode set)``; then shuts Serve and Ray down. ``env``: variables set for the Ray processes (and
    restored after)."""
    from serve_apps import ray_mode

    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    mode = ray_mode.apply()  # before Ray Serve is imported and Ray starts (HAProxy's own ports included: free ones)
    import ray
    from ray import serve

    from deepomni.ray_env import init_ray
    from serve_apps.app import build_app

    try:
        init_ray()
        port = free_port()
        serve.start(http_options={"host": LOOPBACK, "port": port})
        serve.run(build_app(dict(app_args)), name="deepomni", route_prefix="/")
        yield f"http://{LOOPBACK}:{port}", mode
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
