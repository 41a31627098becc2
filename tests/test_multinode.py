"""Several Ray nodes on this machine (issue 25): ``cluster/local.sh start --nodes 3`` (head, n1, n2; each node in
its own network namespace, ``cluster/local_cluster.py``), and what only a cluster has.

* the cluster: 3 live nodes with their labels, every Ray process of it inside its namespaces, from this
  machine only the forwarder's loopback listeners, Ray's token auth on; ``stop`` leaves nothing.
* Ray Data across nodes: ``jobs.prepare_data`` submitted to the cluster runs its actors on several nodes and
  writes the same rows as ``deepomni data prepare`` on one node.
* training across nodes, and a node lost: a reference stage with its 2 expert-parallel workers on one node
  (n1), then the same stage with one worker a node (n1, n2) whose rank-0 node is SIGKILLed whole (every
  process of its namespace) after step 5; the run waits for the replacement node the test starts (n3),
  resumes from the step-4 checkpoint at its data position, and ends with the reference's samples, losses
  and weights, bit for bit.

Cost (2 cores): the cluster ~15 s to start, 3 jobs of ~35 s, the node loss ~40 s more, one local prepare:
about 3 minutes. Needs root (network namespaces) and iproute2: skipped without them, except on CI."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import torch
from safetensors.torch import load_file

from tests.test_listeners import clean_env, free_port
from tests.test_train_faults import _last_per_step, _log, _registered_steps

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "cluster" / "local.sh"
_spec = importlib.util.spec_from_file_location("local_cluster", ROOT / "cluster" / "local_cluster.py")
local_cluster = importlib.util.module_from_spec(_spec)  # cluster/ holds scripts, not a package
sys.modules["local_cluster"] = local_cluster  # (dataclasses look their module up)
_spec.loader.exec_module(local_cluster)

CAN = os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("curl") is not None
pytestmark = [
    pytest.mark.skipif(not CAN and not os.environ.get("CI"), reason="needs root and iproute2 (network namespaces)"),
    pytest.mark.timeout(900),
]
STEPS, EVERY, HOLD_AT = 8, 2, 5  # a checkpoint every 2 steps; rank 0 holds after step 5: resume from step 4


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


@pytest.fixture(scope="module")
def cluster():
    if not CAN:
        pytest.fail("CI must run the multi-node tests: it runs as root with iproute2 and curl (.ci/run)")
    ports = local_cluster.Ports(gcs=free_port(), dashboard=free_port(), metrics=free_port(), client=free_port(),
                                agent=free_port(), serve=free_port())
    env = clean_env(DEEPOMNI_GCS_PORT=str(ports.gcs), DEEPOMNI_DASHBOARD_PORT=str(ports.dashboard),
                    DEEPOMNI_METRICS_PORT=str(ports.metrics), DEEPOMNI_CLIENT_PORT=str(ports.client),
                    DEEPOMNI_AGENT_PORT=str(ports.agent), DEEPOMNI_SERVE_PORT=str(ports.serve))
    c = Client(env, ports)
    t0 = time.monotonic()
    started = c.local("start", "--nodes", "3")
    print(f"\n[multinode] 3 nodes started in {time.monotonic() - t0:.1f} s")
    try:
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        yield c
    finally:
        state = c.state()
        stopped = c.local("stop")
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"deepomni{ports.gcs}-" not in names  # every namespace gone, with every process in it
    if state is not None:
        assert not state.dir.exists()


def test_the_cluster(cluster):
    """3 live Ray nodes labelled head, n1, n2 at their own addresses; each node's processes are exactly its
    namespace's (Ray's raylet among them); what listens on this machine's network is only the forwarder, on
    127.0.0.1; the dashboard, reached through it, refuses a call without Ray's token."""
    import psutil

    nodes = cluster.nodes()
    assert {k: n["state"] for k, n in nodes.items()} == {"head": "ALIVE", "n1": "ALIVE", "n2": "ALIVE"}
    state = cluster.state()
    assert {k: n["node_ip"] for k, n in nodes.items()} == {k: n.address for k, n in state.nodes.items()}
    assert len({n["node_id"] for n in nodes.values()}) == 3
    for name in state.nodes:
        names = {psutil.Process(p).name() for p in state.pids(name)}
        assert "raylet" in names, (name, names)
    assert "gcs_server" in {psutil.Process(p).name() for p in state.pids("head")}
    # no process of the cluster (its temp dirs name it) outside its namespaces
    root_ns = os.stat("/proc/self/ns/net").st_ino
    ours = [p for p in psutil.process_iter(["cmdline"]) if any(str(state.dir) in a for a in p.info["cmdline"] or ())]
    assert ours and all(os.stat(f"/proc/{p.pid}/ns/net").st_ino != root_ns for p in ours)
    fwd = psutil.Process(state.forwarder)
    listening = {(c.laddr.ip, c.laddr.port) for c in fwd.net_connections("inet") if c.status == psutil.CONN_LISTEN}
    assert listening == {("127.0.0.1", p) for p in cluster.ports.forwarded()}
    status = cluster.local("status")
    assert status.returncode == 0 and all(f"{n} " in status.stdout for n in ("head", "n1", "n2")), status.stdout
    req = urllib.request.Request(f"http://127.0.0.1:{cluster.ports.dashboard}/api/jobs/")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code in (401, 403)


@pytest.fixture(scope="module")
def data(cluster, tmp_path_factory) -> Path:
    """A small spoken corpus prepared by a job on the cluster (Ray Data's actors on several nodes)."""
    from deepomni.data.synth import SynthConfig, synthesize

    out = tmp_path_factory.mktemp("mn") / "data"
    synthesize(SynthConfig(seed=3, sizes={"train": 24, "validation": 2, "test": 2}, workers=2), out, progress=False)
    t0 = time.monotonic()
    sid = cluster.submit("python", "-m", "jobs.prepare_data", "--raw", str(out / "raw"), "--out", str(out),
                         "--feature-actors", "2", "--codec-actors", "2")
    job = cluster.job(sid)
    actors = cluster.api(f"/api/v0/actors?detail=1&limit=1000&filter_keys=job_id&filter_predicates=%3D"
                         f"&filter_values={job['job_id']}")["data"]["result"]["result"]
    by_id = {n["node_id"]: k for k, n in cluster.nodes().items()}
    where = sorted({by_id.get(a["node_id"], "?") for a in actors if "MapWorker" in a["class_name"]})
    print(f"\n[multinode] prepare job {time.monotonic() - t0:.1f} s, its Ray Data actors on {where}")
    assert len(where) >= 2, where  # the pipeline's actors really ran on more than one node
    return out


def _rows(data_dir: Path) -> list[dict]:
    table = pads.dataset(data_dir / "tokenized", format="parquet", partitioning="hive").to_table()
    return sorted(table.to_pylist(), key=lambda r: (r["split"], r["status"], r["id"]))


def test_data_prepare_across_nodes_equals_one_node(data, tmp_path):
    """The rows the cluster wrote equal those of ``deepomni data prepare`` on one node (an embedded Ray)."""
    one = tmp_path / "one"
    shutil.copytree(data / "raw", one / "raw")
    env = clean_env(RAY_AUTH_MODE="disabled")
    r = subprocess.run([sys.executable, "-m", "deepomni.cli", "data", "prepare", "--raw", str(one / "raw"),
                        "--out", str(one)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = _rows(data), _rows(one)
    assert len(a) == 28 and [x["id"] for x in a] == [x["id"] for x in b]
    assert a == b


def _train(cluster: Client, data: Path, storage: Path, run: str, *extra: str, wait: bool = True) -> str:
    return cluster.submit("python", "-m", "jobs.train", "--stage", "text_pretrain", "--config", "tiny",
                          "--data", str(data), "--storage-path", str(storage), "--run-name", run,
                          "--num-workers", "2", "--ep-size", "2", "--cpus-per-worker", "1", "--batch-size", "2",
                          "--max-steps", str(STEPS), "--checkpoint-every", str(EVERY), "--sample-log", "true",
                          "--log-every", "1", *extra, wait=wait)


def _placements(run_dir: Path) -> list[dict]:
    return sorted((json.loads(line) for f in run_dir.glob("placement_rank*.jsonl") for line in
                   f.read_text().splitlines()), key=lambda p: (p["time"], p["rank"]))


def test_training_across_nodes_survives_a_node_loss(cluster, data, tmp_path):
    """Expert parallelism 2 with one worker a node equals the same run on one node, through the loss of a whole
    node (the one of rank 0, held after step 5 so the kill lands at a known point) and its replacement."""
    from deepomni.train.faults import HELD_WORKER

    storage = tmp_path / "runs"  # the nodes' shared storage (this machine's file system)
    # the reference: both workers on node n1
    _train(cluster, data, storage, "one_node", "--placement", "STRICT_PACK", "--worker-labels", '{"node": "n1"}')
    ref_dir = storage / "one_node"
    assert {p["labels"]["node"] for p in _placements(ref_dir)} == {"n1"}

    # one worker a node, never the head: rank 0 holds after step 5, its node is killed, n3 replaces it
    run_dir = storage / "two_nodes"
    sid = _train(cluster, data, storage, "two_nodes", "--placement", "STRICT_SPREAD", "--worker-labels",
                 '{"node": "!head"}', "--max-failures", "1", "--fail-at-step", str(HOLD_AT), "--fail-mode", "hold",
                 wait=False)
    deadline = time.monotonic() + 300
    while not (run_dir / HELD_WORKER).exists() or HOLD_AT - 1 not in _registered_steps(run_dir):
        assert time.monotonic() < deadline, cluster.logs(sid)[-4000:]
        time.sleep(0.2)
    first = _placements(run_dir)
    assert sorted(p["rank"] for p in first) == [0, 1]
    spread = {p["rank"]: p["labels"]["node"] for p in first}
    assert sorted(spread.values()) == ["n1", "n2"], spread  # placement checked: one worker a node
    held = json.loads((run_dir / HELD_WORKER).read_text())
    victim = spread[0]
    assert held["pid"] in cluster.state().pids(victim)  # the held worker is rank 0's, on the node killed
    killed = cluster.local("kill-node", victim)
    t_kill = time.time()
    assert killed.returncode == 0, killed.stderr
    assert not cluster.state().pids(victim)  # every process of the node is gone
    added = cluster.local("add-node", "n3")  # the replacement the run waits for (2 nodes besides the head)
    assert added.returncode == 0, added.stdout + added.stderr
    t_added = time.time()
    deadline = time.monotonic() + 120
    while cluster.nodes()[victim]["state"] != "DEAD":
        assert time.monotonic() < deadline, "Ray never marked the killed node dead"
        time.sleep(0.5)
    t_dead = time.time()
    cluster.wait(sid)

    # where it ran: n1 + n2, then the survivor + n3, resumed from step 4
    after = [p for p in _placements(run_dir) if p["time"] > t_kill]
    assert sorted(p["rank"] for p in after) == [0, 1] and {p["start_step"] for p in after} == {HOLD_AT - 1}
    survivor = ({"n1", "n2"} - {victim}).pop()
    assert {p["labels"]["node"] for p in after} == {survivor, "n3"}
    # the samples and losses of every step, each rank: the reference's; steps 5.. ran twice on rank 0
    for rank in (0, 1):
        ref, got = _last_per_step(_log(ref_dir, rank)), _last_per_step(_log(run_dir, rank))
        assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
        assert [(s, got[s]["ids"], got[s]["loss"]) for s in ref] == [(s, ref[s]["ids"], ref[s]["loss"]) for s in ref]
    steps0 = [x["step"] for x in _log(run_dir, 0)]
    assert steps0 == [*range(1, HOLD_AT + 1), *range(HOLD_AT, STEPS + 1)], steps0
    a, b = load_file(str(ref_dir / "final" / "model.safetensors")), load_file(str(run_dir / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    resumed = next(x["time"] for x in _log(run_dir, 0)[HOLD_AT:])
    print(f"\n[multinode] node {victim} killed: Ray marked it dead after {t_dead - t_kill:.1f} s, replacement n3 "
          f"up after {t_added - t_kill:.1f} s, step {HOLD_AT} re-run {resumed - t_kill:.1f} s after the kill, "
          f"on {survivor} + n3")


# ------------------------------------------------------------------------------------------------ serving
SERVE_CONFIG = ROOT / "serve_apps" / "config.yaml"
ANSWER_STEPS = 300  # long enough to be in flight at a kill


class App:
    def __init__(self, cluster: Client, url: str, where: dict[str, str]):
        self.cluster, self.url, self.where = cluster, url, where

    def replicas(self, deployment: str) -> list[dict]:
        """Serve's running replicas of ``deployment``, each with the name of its node."""
        apps = self.cluster.api("/api/serve/applications/")["applications"]
        by_id = {n["node_id"]: k for k, n in self.cluster.nodes().items()}
        reps = apps["deepomni"]["deployments"][deployment]["replicas"] if "deepomni" in apps else []
        return [{**r, "node": by_id.get(r["node_id"])} for r in reps if r["state"] == "RUNNING"]

    def clients(self, steps: int = ANSWER_STEPS):
        from benchmarks.serve_faults import Clients
        from tests.test_serve import speech_wav

        return Clients.for_speech(self.url, speech_wav(), steps)


def _serve_config(cluster: Client, checkpoint: str, where: dict[str, str]) -> dict:
    """serve_apps/config.yaml on the cluster: the Ingress on the head, the SpeechEncoder and the Vocoder on
    ``where["speech"]``, the Backbone on ``where["backbone"]``, each else on any other worker node (Ray's
    fallback), one Backbone replica a node, scaling up at 2 answers a replica."""
    import yaml

    config = yaml.safe_load(SERVE_CONFIG.read_text())
    config["http_options"]["port"] = cluster.ports.serve
    app = config["applications"][0]
    app["args"].update(checkpoint=checkpoint, max_steps=24, max_steps_limit=400)
    for d in app["deployments"]:
        opts = d["ray_actor_options"]
        if d["name"] == "Ingress":
            opts["label_selector"] = {"node": "head"}
        elif d["name"] == "Backbone":
            opts["label_selector"] = {"node": where["backbone"]}
            opts["fallback_strategy"] = [{"label_selector": {"node": "!head"}}]
            d["max_replicas_per_node"] = 1
            d["autoscaling_config"].update(min_replicas=1, max_replicas=2, target_ongoing_requests=2,
                                           upscale_delay_s=1, downscale_delay_s=600)
        else:
            opts["label_selector"] = {"node": where["speech"]}
            opts["fallback_strategy"] = [{"label_selector": {"node": "!head"}}]
    return config


@pytest.fixture(scope="module")
def app(cluster, tmp_path_factory):
    import requests
    import yaml

    from tests.test_serve import readable_checkpoint

    tmp = tmp_path_factory.mktemp("serve")
    workers = sorted(k for k, n in cluster.nodes().items() if k != "head" and n["state"] == "ALIVE")
    where = {"backbone": workers[0], "speech": workers[1]}
    config = tmp / "serve.yaml"
    config.write_text(yaml.safe_dump(_serve_config(cluster, readable_checkpoint(tmp / "ckpt"), where)))
    t0 = time.monotonic()
    dashboard = f"http://127.0.0.1:{cluster.ports.dashboard}"
    r = subprocess.run(["serve", "deploy", "--address", dashboard, str(config)], cwd=ROOT, env=cluster.job_env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    url = f"http://127.0.0.1:{cluster.ports.serve}"
    a = App(cluster, url, where)
    deadline = time.monotonic() + 300
    while True:
        apps = cluster.api("/api/serve/applications/")["applications"]
        status = apps.get("deepomni", {}).get("status")
        if status == "RUNNING":
            try:
                if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
        assert status != "DEPLOY_FAILED" and time.monotonic() < deadline, apps.get("deepomni", {}).get("message")
        time.sleep(1)
    print(f"\n[multinode] Serve app up in {time.monotonic() - t0:.1f} s")
    yield a
    subprocess.run(["serve", "shutdown", "--address", dashboard, "-y"], cwd=ROOT, env=cluster.job_env, capture_output=True, timeout=120)


async def _answers(app: App, surfaces, steps: int) -> list:
    """One answer on each of ``surfaces``, one after another."""
    from benchmarks.serve_faults import Answer

    c = app.clients(steps)
    try:
        return [await c.run(Answer(s)) for s in surfaces]
    finally:
        await c.close()


def test_serving_across_nodes(app):
    """Each deployment on its node; every surface answers (a spoken question goes from the Ingress on the
    head to the SpeechEncoder on one node, the Backbone on another, the Vocoder beside the encoder)."""
    from benchmarks.serve_faults import SURFACES

    placed = {d: sorted(r["node"] for r in app.replicas(d)) for d in ("Ingress", "SpeechEncoder", "Backbone", "Vocoder")}
    assert placed == {"Ingress": ["head"], "SpeechEncoder": [app.where["speech"]],
                      "Backbone": [app.where["backbone"]], "Vocoder": [app.where["speech"]]}, placed
    answers = asyncio.run(_answers(app, SURFACES, 24))
    assert [(a.surface, a.outcome) for a in answers] == [(s, "finished") for s in SURFACES], \
        [(a.surface, a.outcome, a.detail) for a in answers]
    assert all(a.chunks for a in answers)


def test_backbone_node_lost(app):
    """The node of the only Backbone replica is SIGKILLed whole under 4 streaming answers (one per surface):
    each ends with its surface's clean ``unavailable`` error (or finishes), within 5 s as the goal (10 s bound
    on a loaded CI machine), none hangs or is cut silently; a new answer succeeds with the Backbone replaced
    on another node (the goal: 15 s)."""
    from benchmarks.serve_faults import Kill, one_kill

    cluster, victim = app.cluster, app.where["backbone"]

    def kill() -> Kill:
        before = {r["replica_id"] for r in app.replicas("Backbone")}
        return Kill(f"kill-node {victim}", lambda: cluster.local("kill-node", victim),
                    lambda: any(r["replica_id"] not in before for r in app.replicas("Backbone")))

    async def run() -> dict:
        c = app.clients()
        try:
            args = argparse.Namespace(answers=4, kill_after=0.3, bound=60.0, poll=0.25)
            return await one_kill(c, "Backbone", args, cluster.ports.metrics, kill=kill)
        finally:
            await c.close()

    r = asyncio.run(run())
    print(f"\n[multinode] Backbone node {victim} killed: {r['error']} error, {r['finished']} finished, "
          f"{r['dropped']} dropped, {r['hung']} hung; errors after {r['end_s']['error']} s; replica replaced after "
          f"{r['replica_replaced_s']} s, a new answer after {r['recovered_s']} s (first chunk "
          f"{r['recovered_first_chunk_s']} s)")
    assert r["in_flight"] == r["answers"] == 4, r
    assert r["hung"] == 0 and r["dropped"] == 0, r["details"]
    assert r["error"] + r["finished"] == 4 and r["error"] >= 1, r
    assert max(r["end_s"]["error"]) <= 10.0, r["end_s"]
    assert all("unavailable" in d for d in r["details"]), r["details"]
    assert r["recovered_s"] is not None and r["recovered_s"] <= 60.0, r
    after = app.replicas("Backbone")
    assert len(after) == 1 and after[0]["node"] not in (victim, "head"), after


def test_autoscaling_adds_a_replica_on_another_node(app):
    """Under load (6 long answers at once, 2 a replica wanted) Serve adds a Backbone replica, on another node
    (one replica a node): a replacement node is added first, as an autoscaler would."""
    from benchmarks.serve_faults import Answer

    cluster = app.cluster
    added = cluster.local("add-node")  # the lost node's replacement
    assert added.returncode == 0, added.stdout + added.stderr
    first = app.replicas("Backbone")
    assert len(first) == 1

    async def load() -> tuple[list, float | None]:
        c = app.clients()
        t0 = time.monotonic()
        tasks = [asyncio.create_task(c.run(Answer("dialogue"))) for _ in range(6)]
        scaled = None
        try:
            while time.monotonic() - t0 < 90 and scaled is None:
                if len(await asyncio.to_thread(app.replicas, "Backbone")) == 2:
                    scaled = time.monotonic() - t0
                await asyncio.sleep(0.5)
            return await asyncio.gather(*tasks), scaled
        finally:
            await c.close()

    answers, scaled = asyncio.run(load())
    replicas = app.replicas("Backbone")
    print(f"\n[multinode] a second Backbone replica after {scaled} s of load, on "
          f"{sorted(r['node'] for r in replicas)}; answers {[a.outcome for a in answers]}")
    assert scaled is not None and len(replicas) == 2
    assert len({r["node"] for r in replicas}) == 2 and "head" not in {r["node"] for r in replicas}
    assert all(a.outcome == "finished" for a in answers), [(a.outcome, a.detail) for a in answers]


PARTITION_S = 30.0


def test_partition_of_a_node(app):
    """The link of the node hosting the SpeechEncoder and the Vocoder (and a Backbone replica) is cut for 30 s
    under 4 streaming answers, then restored. Measured: when each in-flight answer ended and how, when a new
    answer first succeeded, when Ray marked the node dead (if it did), when its replicas were replaced, what
    the node did after the link came back (its raylet exits: Ray counted it dead), and the node restarted.
    Required: no answer hangs or is cut silently, new answers succeed again."""
    from benchmarks.serve_faults import SURFACES, Answer

    cluster = app.cluster
    victim = app.replicas("SpeechEncoder")[0]["node"]
    node_id = cluster.nodes()[victim]["node_id"]
    before = {d: {r["replica_id"]: r["node"] for r in app.replicas(d)} for d in ("SpeechEncoder", "Vocoder", "Backbone")}
    on_victim = {d: [i for i, n in reps.items() if n == victim] for d, reps in before.items()}
    seen: dict[str, float] = {}  # first time each event was observed, seconds after the cut

    def watch(t_cut: float, stop: threading.Event) -> None:
        while not stop.is_set():
            now = time.monotonic() - t_cut
            try:
                state = next((n["state"] for n in local_cluster.ray_nodes(cluster.state(), "token")
                              if n["node_id"] == node_id), None)
                seen.setdefault(f"ray: node {state}", now)
                for d, ids in on_victim.items():
                    if ids and any(r["replica_id"] not in before[d] for r in app.replicas(d)):
                        seen.setdefault(f"{d} replaced", now)
            except (OSError, ValueError, KeyError):
                pass
            stop.wait(0.5)

    async def run() -> tuple[list, list]:
        c = app.clients()
        answers = [Answer(SURFACES[i % len(SURFACES)]) for i in range(4)]
        tasks = [asyncio.create_task(c.run(a)) for a in answers]
        t0 = time.monotonic()
        while not all(a.first is not None or a.ended is not None for a in answers) and time.monotonic() - t0 < 60:
            await asyncio.sleep(0.05)
        await asyncio.to_thread(cluster.local, "cut", victim)
        t_cut = time.monotonic()
        stop = threading.Event()
        watcher = threading.Thread(target=watch, args=(t_cut, stop), daemon=True)
        watcher.start()
        probes = []
        healed = False
        try:
            while time.monotonic() - t_cut < 150:
                if not healed and time.monotonic() - t_cut >= PARTITION_S:
                    await asyncio.to_thread(cluster.local, "heal", victim)
                    seen["link restored"], healed = time.monotonic() - t_cut, True
                p = Answer("dialogue")
                p.started = time.monotonic()
                try:
                    await asyncio.wait_for(c.run_probe(p), 10)
                except asyncio.TimeoutError:
                    p.end("hung", "no end within 10 s")
                probes.append((round(p.started - t_cut, 1), round(p.ended - t_cut, 1), p.outcome))
                if p.outcome == "finished" and healed and all(t.done() for t in tasks):
                    break
                if p.outcome == "finished" and all(t.done() for t in tasks):
                    await asyncio.sleep(max(0.0, PARTITION_S - (time.monotonic() - t_cut)))  # to the heal
                    continue
                await asyncio.sleep(0.5)
            done, pending = await asyncio.wait(tasks, timeout=max(0.0, 150 - (time.monotonic() - t_cut)))
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if not healed:
                await asyncio.to_thread(cluster.local, "heal", victim)
                seen["link restored"], healed = time.monotonic() - t_cut, True
            # with its link back, the node learns that Ray counted it dead: its raylet exits; then it is
            # started again (a new Ray node at the same address and label), as an operator or autoscaler would
            deadline = time.monotonic() + 60
            while "raylet" in _names(cluster.state().pids(victim)) and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
            if "raylet" not in _names(cluster.state().pids(victim)):
                seen["its raylet exited"] = time.monotonic() - t_cut
            restarted = await asyncio.to_thread(cluster.local, "restart-node", victim)
            assert restarted.returncode == 0, restarted.stdout + restarted.stderr
            seen["restarted as a new Ray node"] = time.monotonic() - t_cut
            p = Answer("dialogue")
            await asyncio.wait_for(c.run_probe(p), 60)
            probes.append((round(p.started - t_cut, 1), round(p.ended - t_cut, 1), p.outcome))
        finally:
            stop.set()
            watcher.join(timeout=5)
            await c.close()
        ends = [(a.surface, a.outcome, round(a.ended - t_cut, 1) if a.ended else None, a.detail[:80]) for a in answers]
        return ends, probes

    ends, probes = asyncio.run(run())
    now = cluster.nodes()[victim]
    first_ok = next((p[1] for p in probes if p[2] == "finished"), None)
    print(f"\n[multinode] partition of {victim} ({PARTITION_S:.0f} s; on it: "
          f"{ {d: len(v) for d, v in on_victim.items()} }): in-flight answers {ends}; first new answer "
          f"{first_ok} s after the cut; events {sorted(seen.items(), key=lambda kv: kv[1])}; "
          f"probes {probes}")
    assert all(o in ("finished", "error") for _, o, _, _ in ends), ends  # never hung, never cut silently
    assert all("unavailable" in d for _, o, _, d in ends if o == "error"), ends
    assert first_ok is not None, probes
    assert probes[-1][2] == "finished", probes  # and answers still succeed at the end
    assert "its raylet exited" in seen, seen  # Ray does not take a node back that it counted dead
    assert now["state"] == "ALIVE" and now["node_id"] != node_id  # the node, restarted, is a new Ray node


def _names(pids: list[int]) -> set[str]:
    import psutil

    out = set()
    for pid in pids:
        try:
            out.add(psutil.Process(pid).name())
        except psutil.Error:
            pass
    return out
