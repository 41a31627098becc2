"""Several Ray nodes on this machine (``cluster/local.sh start --nodes N``: each node in its own network namespace,
``cluster/local_cluster.py``) and the tests' hands on them (:class:`Client`); the ``cluster`` fixture is in
tests/conftest.py. Needs root and iproute2 (``CAN``)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "cluster" / "local.sh"
_spec = importlib.util.spec_from_file_location("local_cluster", ROOT / "cluster" / "local_cluster.py")
local_cluster = importlib.util.module_from_spec(_spec)  # cluster/ holds scripts, not a package
sys.modules["local_cluster"] = local_cluster  # (dataclasses look their module up)
_spec.loader.exec_module(local_cluster)

CAN = os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("curl") is not None


class Client:
    """The test's hands on the cluster: cluster/local.sh, `ray job submit`, the dashboard's REST API."""

    def __init__(self, env: dict[str, str], ports: local_cluster.Ports):
        self.env, self.ports = env, ports
        self.job_env = {**env, "RAY_ADDRESS": f"http://127.0.0.1:{ports.dashboard}", "RAY_AUTH_MODE": "token",
                        "PATH": f"{ROOT / '.venv' / 'bin'}:{env['PATH']}"}

    def local(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
        return subprocess.run([str(SCRIPT), *args], cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def state(self) -> local_cluster.Cluster:
        return local_cluster.Cluster.load(self.ports)

    def submit(self, *entrypoint: str, wait: bool = True, timeout: float = 600) -> str:
        """``ray job submit --working-dir .``: the submission id (once the job ended, if ``wait``)."""
        sid = f"test-{uuid.uuid4().hex[:12]}"
        r = subprocess.run(["ray", "job", "submit", "--working-dir", ".", "--submission-id", sid, "--no-wait", "--",
                            *entrypoint], cwd=ROOT, env=self.job_env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        if wait:
            self.wait(sid, timeout)
        return sid

    def job(self, sid: str) -> dict:
        return self.api(f"/api/jobs/{sid}")

    def wait(self, sid: str, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while (job := self.job(sid))["status"] not in ("SUCCEEDED", "FAILED", "STOPPED"):
            assert time.monotonic() < deadline, f"job {sid} still {job['status']} after {timeout:.0f} s"
            time.sleep(1)
        assert job["status"] == "SUCCEEDED", (job.get("message"), self.logs(sid)[-4000:])
        return job

    def logs(self, sid: str) -> str:
        return self.api(f"/api/jobs/{sid}/logs")["logs"]

    def api(self, path: str) -> dict:
        headers = local_cluster.auth_header("token")
        req = urllib.request.Request(f"http://127.0.0.1:{self.ports.dashboard}{path}", headers=headers)
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def nodes(self) -> dict[str, dict]:
        """Ray's nodes by their ``node`` label, the live one where a name had several (a replaced node)."""
        out: dict[str, dict] = {}
        for n in local_cluster.ray_nodes(self.state(), "token"):
            name = n.get("labels", {}).get("node")
            if name and (name not in out or n["state"] == "ALIVE"):
                out[name] = n
        return out
