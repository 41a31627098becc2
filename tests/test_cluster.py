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
    import psutil

    from benchmarks.harness import free_port
    from tests.helpers.net import check_head

    gcs, client, agent = free_port(), free_port(), free_port()
    env = {**os.environ, "DEEPOMNI_DASHBOARD_PORT": "8365", "DEEPOMNI_METRICS_PORT": "8180",
           "DEEPOMNI_GCS_PORT": str(gcs), "DEEPOMNI_CLIENT_PORT": str(client), "DEEPOMNI_AGENT_PORT": str(agent)}
    env.pop("RAY_ADDRESS", None)
    env.pop("DEEPOMNI_RAY_AUTH_MODE", None)
    started = _run("start", env=env)
    procs = {}
    try:
        assert started.returncode == 0, started.stderr[-2000:]
        exports = _run("env", env=env).stdout
        assert "RAY_ADDRESS=http://127.0.0.1:8365" in exports and "RAY_AUTH_MODE=token" in exports
        # the head keeps Ray's token auth: the CLI reads the token Ray generated (~/.ray/auth_token)
        job_env = {**env, "RAY_AUTH_MODE": "token", "RAY_ADDRESS": "http://127.0.0.1:8365",
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
        # every listener of the head (and of the job's workers) on loopback, token auth on (tests/helpers/net.py)
        procs = check_head(gcs, {8365, 8180, client, agent})
    finally:
        stopped = _run("stop", env=env)
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    # `stop` stopped the head's processes (the ones of its GCS address: not `ray stop`, which stops them all)
    _, alive = psutil.wait_procs(list(procs.values()), timeout=20)
    assert not alive, [(p.pid, p.name()) for p in alive]


def test_usage_error():
    r = subprocess.run([str(SCRIPT), "launch"], capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr
