"""cluster/local.sh: a local head that `ray job submit --working-dir .` can run this project's jobs on."""

import os
import subprocess
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "cluster" / "local.sh"


def _run(*args, env, timeout=180):
    return subprocess.run([str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_start_submit_stop():
    env = {**os.environ, "DEEPOMNI_DASHBOARD_PORT": "8365", "DEEPOMNI_METRICS_PORT": "8180"}
    env.pop("RAY_ADDRESS", None)
    started = _run("start", env=env)
    try:
        assert started.returncode == 0, started.stderr[-2000:]
        exports = _run("env", env=env).stdout
        assert "RAY_ADDRESS=http://127.0.0.1:8365" in exports and "RAY_AUTH_MODE=disabled" in exports
        job_env = {**env, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": "http://127.0.0.1:8365",
                   "PATH": f"{ROOT / '.venv' / 'bin'}:{env['PATH']}"}
        for attempt in range(4):  # a loaded machine: the head may not have discovered its job agent yet
            job = subprocess.run(
                ["ray", "job", "submit", "--working-dir", ".", "--", "python", "-c",
                 "import sys, deepomni.config as c; print('JOB', sys.prefix, c.load_preset('tiny').hidden_size)"],
                cwd=ROOT, env=job_env, capture_output=True, text=True, timeout=180)
            if "No available agent" not in job.stderr:
                break
            time.sleep(5)
        assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-2000:]
        line = next(l for l in job.stdout.splitlines() if l.startswith("JOB"))
        assert line.endswith(" 128") and ".venv" in line  # the project's interpreter and package
        metrics = urllib.request.urlopen("http://127.0.0.1:8180/metrics", timeout=10).read().decode()
        assert "# TYPE" in metrics
    finally:
        _run("stop", env=env)


def test_usage_error():
    r = subprocess.run([str(SCRIPT), "launch"], capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr
