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

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.cluster import CAN, ROOT, Client
from tests.helpers.net import clean_env
from tests.helpers.train import last_per_step, registered_steps, sample_log

pytestmark = [
    pytest.mark.skipif(not CAN and not os.environ.get("CI"), reason="needs root and iproute2 (network namespaces)"),
    pytest.mark.timeout(900),
]
STEPS, EVERY, HOLD_AT = 8, 2, 5  # a checkpoint every 2 steps; rank 0 holds after step 5: resume from step 4


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
    """Every tokenized row, the files in name order (partition by partition), each file's rows in its order."""
    base = data_dir / "tokenized"
    files = sorted(str(f) for f in base.rglob("*.parquet"))
    return pads.dataset(files, format="parquet", partitioning="hive", partition_base_dir=str(base)).to_table().to_pylist()


def test_data_prepare_across_nodes_equals_one_node(data, tmp_path):
    """The rows the cluster wrote equal those of ``deepomni data prepare`` on one node (an embedded Ray), in
    the same order."""
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
    from deepomni.train.fault_injection import HELD_WORKER

    storage = tmp_path / "runs"  # the nodes' shared storage (this machine's file system)
    # the reference: both workers on node n1
    _train(cluster, data, storage, "one_node", "--placement", "STRICT_PACK", "--worker-labels", '{"node": "n1"}')
    ref_dir = storage / "one_node"
    assert {p["labels"]["node"] for p in _placements(ref_dir)} == {"n1"}

    # one worker a node, never the head: rank 0 holds after step 5, its node is killed, n3 replaces it
    run_dir = storage / "two_nodes"
    sid = _train(cluster, data, storage, "two_nodes", "--placement", "STRICT_SPREAD", "--worker-labels",
                 '{"node": "!head"}', "--max-failures", "1", "--inject-fault", json.dumps({"at_step": HOLD_AT, "mode": "hold"}),
                 wait=False)
    deadline = time.monotonic() + 300
    while not (run_dir / HELD_WORKER).exists() or HOLD_AT - 1 not in registered_steps(run_dir):
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
        ref, got = last_per_step(sample_log(ref_dir, rank)), last_per_step(sample_log(run_dir, rank))
        assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
        assert [(s, got[s]["ids"], got[s]["loss"]) for s in ref] == [(s, ref[s]["ids"], ref[s]["loss"]) for s in ref]
    steps0 = [x["step"] for x in sample_log(run_dir, 0)]
    assert steps0 == [*range(1, HOLD_AT + 1), *range(HOLD_AT, STEPS + 1)], steps0
    a, b = load_file(str(ref_dir / "final" / "model.safetensors")), load_file(str(run_dir / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    resumed = next(x["time"] for x in sample_log(run_dir, 0)[HOLD_AT:])
    print(f"\n[multinode] node {victim} killed: Ray marked it dead after {t_dead - t_kill:.1f} s, replacement n3 "
          f"up after {t_added - t_kill:.1f} s, step {HOLD_AT} re-run {resumed - t_kill:.1f} s after the kill, "
          f"on {survivor} + n3")
