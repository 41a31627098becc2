"""The Serve app across several Ray nodes on this machine (issue 25; the cluster: tests/test_multinode.py): the
app deployed to a 3-node cluster (``cluster/local.sh start --nodes 3``) with each deployment on its node, and
what only a cluster has.

* serving across nodes: the Ingress on the head, the SpeechEncoder and the Vocoder on one worker node, the
  Backbone on another; every surface answers.
* the Backbone's node lost (SIGKILLed whole) under streaming answers: each ends with its surface's clean
  ``unavailable`` error (or finishes), none hangs; a new answer succeeds with the Backbone replaced on another node.
* autoscaling: under load Serve adds a Backbone replica on another node (a replacement node added first).
* a node partitioned for 30 s under streaming answers, then restored: no answer hangs or is cut silently, new
  answers succeed again; the node, restarted, is a new Ray node.

Needs root (network namespaces) and iproute2: skipped without them, except on CI."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import threading
import time

import pytest

from tests.helpers.cluster import CAN, ROOT, Client, local_cluster

pytestmark = [
    pytest.mark.skipif(not CAN and not os.environ.get("CI"), reason="needs root and iproute2 (network namespaces)"),
    pytest.mark.timeout(900),
]
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
        from tests.helpers.serve import speech_wav

        return Clients.for_speech(self.url, speech_wav(), steps)


def _serve_config(cluster: Client, checkpoint: str, where: dict[str, str]) -> dict:
    """serve_apps/config.yaml on the cluster: the Ingress on the head, the SpeechEncoder and the Vocoder on
    ``where["speech"]``, the Backbone on ``where["backbone"]``, each else on any other worker node (Ray's
    fallback), one Backbone replica a node, scaling up at 2 answers a replica (the load averaged over 5 s)."""
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
                                           look_back_period_s=5, upscale_delay_s=1, downscale_delay_s=600)
        else:
            opts["label_selector"] = {"node": where["speech"]}
            opts["fallback_strategy"] = [{"label_selector": {"node": "!head"}}]
    return config


@pytest.fixture(scope="module")
def app(cluster, tmp_path_factory):
    import requests
    import yaml

    from benchmarks.harness import readable_checkpoint

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
    """Under sustained load (6 long answers in flight at once, each followed by another, 2 a replica wanted)
    Serve adds a Backbone replica, on another node (one replica a node): a replacement node is added first, as
    an autoscaler would. The load lasts until the replica runs (90 s at most): an answer takes a few seconds,
    and Serve's handles push their load every 10 s, so one burst of answers may end before Serve sees it."""
    from benchmarks.serve_faults import Answer

    cluster = app.cluster
    added = cluster.local("add-node")  # the lost node's replacement
    assert added.returncode == 0, added.stdout + added.stderr
    first = app.replicas("Backbone")
    assert len(first) == 1

    async def load() -> tuple[list, float | None]:
        c = app.clients()
        t0 = time.monotonic()
        scaled: list[float] = []

        async def one_after_another() -> list:
            answers = []
            while not scaled and time.monotonic() - t0 < 90:
                answers.append(await c.run(Answer("dialogue")))
            return answers

        tasks = [asyncio.create_task(one_after_another()) for _ in range(6)]
        try:
            while time.monotonic() - t0 < 90 and not scaled:
                if len(await asyncio.to_thread(app.replicas, "Backbone")) == 2:
                    scaled.append(time.monotonic() - t0)
                await asyncio.sleep(0.5)
            return [a for answers in await asyncio.gather(*tasks) for a in answers], (scaled or [None])[0]
        finally:
            await c.close()

    answers, scaled = asyncio.run(load())
    replicas = app.replicas("Backbone")
    print(f"\n[multinode] a second Backbone replica after {scaled} s of load, on "
          f"{sorted(r['node'] for r in replicas)}; {len(answers)} answers, "
          f"{sum(a.outcome == 'finished' for a in answers)} finished")
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
