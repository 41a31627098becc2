"""Serve faults: SIGKILL one replica of each deployment while answers stream, on 127.0.0.1.

    python -m benchmarks.serve_faults                         # 16 answers, Backbone, Vocoder, SpeechEncoder, Ingress
    python -m benchmarks.serve_faults --answers 4 --kill Backbone,Vocoder    # a quick check
    python -m benchmarks.serve_faults --spare 2                 # min_replicas 2 everywhere: a spare answers

Starts the Serve app in this process as ``benchmarks/soak.py`` does (``benchmarks.harness.serve_app``:
``serve_apps/config.yaml``'s deployments, Ray Serve's high-throughput mode, an embedded local Ray on
127.0.0.1; the tiny preset's random weights with a printable-text head, the app's cached built-in codec;
the clients of ``benchmarks.surfaces``). Then, for each deployment
of ``--kill`` in turn:

1. ``--answers`` concurrent streaming answers to a spoken question (``--answer-steps`` decoding steps, long
   enough to be in flight at the kill), spread over the surfaces: ``POST /v1/dialogue`` (SSE),
   ``WS /v1/dialogue/ws``, streamed ``POST /v1/chat/completions`` (audio out) and ``WS /v1/realtime``;
2. once every answer has streamed something and ``--kill-after`` seconds more have passed, SIGKILL the
   process of one replica of the deployment (found by its Ray process title ``ray::ServeReplica:deepomni:
   <Deployment>`` among this script's own descendants: only processes this script started);
3. each in-flight answer's outcome: ``error`` (the surface's clean error: an SSE ``error`` event, a WebSocket
   ``error`` message, an OpenAI error chunk, a Realtime ``error`` + ``response.done`` failed), ``finished``
   (its normal end), ``dropped`` (the connection broke without either: all that is possible when the
   Ingress itself dies) or ``hung`` (nothing by ``--bound`` seconds after the kill); and the time from the
   kill to its end;
4. from the kill on, a new short answer (the spoken question on ``POST /v1/dialogue``: every deployment,
   ``PROBE_STEPS`` decoding steps) is tried again and again (``--poll`` seconds apart, each waiting up to
   ``--bound``): the time from the kill to the first that succeeds (its end; and its first chunk); and when
   a new replica process of the deployment appeared. The app gets ``max_rows`` for the answers and the
   probe (``2 * --answers + 4``: a speech answer takes 2 rows), so that a probe does not wait for rows
   behind answers that go on (the SpeechEncoder's kill);
5. ``ray_deepomni_rejected_requests_total{reason="unavailable"}`` (the failures the ingress counted, every
   endpoint) before and after, from Ray's metrics endpoint.

Prints a table and saves ``benchmarks/results/serve_faults[_spare<N>].json`` (the command, the machine, every answer's
outcome and time); the last line is ``faults_hung=<n> recover_max_s=<x>``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.harness import RESULTS, command, machine, parser, readable_checkpoint, save_result, serve_app
from benchmarks.soak import app_args
from benchmarks.surfaces import Refused, Surfaces

DEPLOYMENTS = ("Backbone", "Vocoder", "SpeechEncoder", "Ingress")
SURFACES = ("dialogue", "dialogue_ws", "chat", "realtime")  # the answers cycle through them
PROBE_STEPS = 8  # decoding steps of a recovery probe's answer (a few audio chunks)
APP = "deepomni"


# -------------------------------------------------------------------------------------------- answers
@dataclass
class Answer:
    """One in-flight answer as its client saw it; times are ``time.monotonic()``."""

    surface: str
    started: float = 0.0
    first: float | None = None  # first answer content (text or audio) received
    ended: float | None = None
    outcome: str = "running"  # finished | error | dropped | hung
    detail: str = ""  # the error's reason / message, or what broke
    chunks: int = 0

    def got(self) -> None:
        self.chunks += 1
        if self.first is None:
            self.first = time.monotonic()

    def end(self, outcome: str, detail: str = "") -> None:
        if self.ended is None:
            self.ended, self.outcome, self.detail = time.monotonic(), outcome, detail[:200]


class Clients(Surfaces):
    """The surfaces' clients (:mod:`benchmarks.surfaces`) as this benchmark runs them: long timeouts, a new
    connection a request, 200 ms microphone chunks; :meth:`run` runs one answer into an :class:`Answer` (its
    chunks counted) and never raises: what went wrong is the answer's outcome."""

    CALLS = {"dialogue": lambda c, a: c.dialogue_wav(on_chunk=a.got),
             "dialogue_ws": lambda c, a: c.dialogue_ws(on_chunk=a.got, turns=1),
             "chat": lambda c, a: c.chat_audio(on_chunk=a.got),
             "realtime": lambda c, a: c.realtime(on_chunk=a.got)}

    def __init__(self, url: str, wav: bytes, pcm24: bytes, steps: int):
        super().__init__(url, wav, pcm24, steps, timeout=120, connect_timeout=10, open_timeout=30, keepalive=0,
                         chunk_ms=200)

    async def run(self, a: Answer, steps: int | None = None) -> Answer:
        """One answer of ``a.surface`` into ``a``; ``steps``: a ``POST /v1/dialogue`` answer of that many
        decoding steps instead."""
        a.started = time.monotonic()
        try:
            if steps is not None:
                await self.dialogue_wav(on_chunk=a.got, steps=steps)
            else:
                await self.CALLS[a.surface](self, a)
            a.end("finished")
        except Refused as e:  # the surface's clean error, or (a proxy's page, a cut stream) a broken answer
            if e.kind == "error":
                a.end("error", _error_detail(e.body))
            else:
                a.end("error" if e.kind == "status" and _clean_json_error(e.body) else "dropped",
                      f"{e.status} {e.body}")
        except asyncio.CancelledError:
            a.end("hung", "no end within the bound")
        except Exception as e:  # noqa: BLE001 - a broken connection (the Ingress died) is an outcome here
            a.end("dropped", f"{type(e).__name__}: {e}")
        return a

    async def run_probe(self, a: Answer) -> Answer:
        """The recovery probe: the spoken question on ``POST /v1/dialogue`` (encoder, backbone, vocoder), a
        short spoken answer (``PROBE_STEPS``)."""
        return await self.run(a, PROBE_STEPS)


def _error_detail(body: str) -> str:
    """``reason: message`` of an in-band error, in whichever surface's shape (ours: ``reason``; OpenAI's and
    Realtime's: ``error.code``)."""
    try:
        d = json.loads(body)
    except ValueError:
        return body
    e = d.get("error") if isinstance(d.get("error"), dict) else d
    return f"{e.get('reason') or e.get('code')}: {e.get('message')}"


def _clean_json_error(body: str) -> bool:
    """A refusal in our JSON or OpenAI's (not a proxy's plain-text page)."""
    try:
        return isinstance(json.loads(body).get("error"), dict)
    except (ValueError, AttributeError):
        return False


# -------------------------------------------------------------------------------------------- processes
def replica_pids(deployment: str) -> list[int]:
    """Pids of the replicas of ``deployment`` among this process's descendants (the embedded Ray it started),
    by Ray's process title ``ray::ServeReplica:<app>:<Deployment>[.<method>]``."""
    import psutil

    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            title = p.cmdline()
        except psutil.Error:
            continue
        if title and title[0].startswith("ray::"):
            cls = " ".join(title).split()[0].removeprefix("ray::").split(".")[0]
            if cls == f"ServeReplica:{APP}:{deployment}":
                out.append(p.pid)
    return sorted(out)


def unavailable_count(port: int) -> float:
    """``ray_deepomni_rejected_requests_total{reason="unavailable"}``, summed over endpoints and replicas."""
    import requests

    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("ray_deepomni_rejected_requests_total{") and 'reason="unavailable"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


# -------------------------------------------------------------------------------------------- one kill
async def until_recovered(clients: Clients, t_kill: float, poll: float, bound: float) -> dict:
    """New short answers, one after another (``poll`` s apart), until one succeeds: when, and the failures before."""
    tries, failures = [], {}
    while time.monotonic() - t_kill < bound:
        a = Answer("dialogue")
        try:
            await asyncio.wait_for(clients.run_probe(a), max(1.0, bound - (time.monotonic() - t_kill)))
        except asyncio.TimeoutError:
            a.end("hung", "no end within the bound")
        tries.append((round(a.started - t_kill, 3), round(a.ended - t_kill, 3), a.outcome))
        if a.outcome == "finished":
            return {"recovered_s": round(a.ended - t_kill, 3), "recovered_first_chunk_s": round(a.first - t_kill, 3),
                    "tries": tries, "failed_tries": failures}
        key = f"{a.outcome}: {re.sub(r'[0-9]+', 'N', a.detail)[:100]}"
        failures[key] = failures.get(key, 0) + 1
        await asyncio.sleep(poll)
    return {"recovered_s": None, "recovered_first_chunk_s": None, "tries": tries, "failed_tries": failures}


@dataclass
class Kill:
    """What :func:`one_kill` kills: ``what`` says it, ``do()`` kills, ``replaced()`` says whether a new replica
    of the deployment is there (blocking calls: run in a thread)."""

    what: str
    do: Callable[[], None]
    replaced: Callable[[], bool]


def replica_kill(deployment: str) -> Kill:
    """SIGKILL the process of one replica of ``deployment`` (among this process's descendants)."""
    pids = replica_pids(deployment)
    if not pids:
        raise RuntimeError(f"no replica process of {deployment} found")
    return Kill(f"SIGKILL pid {pids[0]}", lambda: os.kill(pids[0], signal.SIGKILL),
                lambda: any(p not in pids for p in replica_pids(deployment)))


async def watch_replacement(kill: Kill, t_kill: float, bound: float) -> float | None:
    """Seconds from the kill until a new replica of the deployment is there."""
    while time.monotonic() - t_kill < bound:
        if await asyncio.to_thread(kill.replaced):
            return round(time.monotonic() - t_kill, 3)
        await asyncio.sleep(0.1)
    return None


async def one_kill(clients: Clients, deployment: str, args, metrics_port: int,
                   kill: Callable[[], Kill] | None = None) -> dict:
    """Answers in flight, then ``kill()`` (default: :func:`replica_kill` of ``deployment``): what each answer
    became, when the app answered again, when a new replica was there."""
    before = await asyncio.to_thread(unavailable_count, metrics_port)
    answers = [Answer(SURFACES[i % len(SURFACES)]) for i in range(args.answers)]
    tasks = [asyncio.create_task(clients.run(a)) for a in answers]
    t0 = time.monotonic()
    while time.monotonic() - t0 < args.bound and not all(a.first is not None or a.ended is not None for a in answers):
        await asyncio.sleep(0.05)
    streaming = sum(a.first is not None and a.ended is None for a in answers)
    await asyncio.sleep(args.kill_after)
    victim = await asyncio.to_thread(kill or (lambda: replica_kill(deployment)))
    in_flight = [a for a in answers if a.ended is None]
    t_kill = time.monotonic()  # (a node's kill takes a moment: its answers may end while it runs)
    await asyncio.to_thread(victim.do)
    print(f"[faults] {deployment}: {victim.what} with {len(in_flight)} of {len(answers)} answers in flight "
          f"({streaming} streamed before)", flush=True)
    replaced = asyncio.create_task(watch_replacement(victim, t_kill, args.bound))
    recovery = await until_recovered(clients, t_kill, args.poll, args.bound)
    done, pending = await asyncio.wait(tasks, timeout=max(0.0, args.bound - (time.monotonic() - t_kill)))
    for t in pending:  # a hang: bounded here, counted as such
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    replaced_s = await replaced
    # the counter reaches /metrics within RAY_metrics_report_interval_ms (1 s here): wait for it to settle
    after, deadline = before, time.monotonic() + 6
    while time.monotonic() < deadline:
        await asyncio.sleep(1.5)
        now = await asyncio.to_thread(unavailable_count, metrics_port)
        if now == after and now != before:
            break
        after = now
    ends = {o: [round(a.ended - t_kill, 3) for a in in_flight if a.outcome == o]
            for o in ("error", "finished", "dropped", "hung")}
    details = {}
    for a in in_flight:
        if a.outcome != "finished":
            key = f"{a.surface} {a.outcome}: {re.sub(r'(pid|id|_)[0-9a-f]{6,}|[0-9]+', 'N', a.detail)[:110]}"
            details[key] = details.get(key, 0) + 1
    return {"deployment": deployment, "killed": victim.what, "answers": len(answers), "in_flight": len(in_flight),
            **{o: len(v) for o, v in ends.items()},
            "end_max_s": {o: max(v) if v else None for o, v in ends.items()},
            "end_s": ends, "by_surface": {s: {o: sum(a.outcome == o for a in in_flight if a.surface == s)
                                              for o in ("error", "finished", "dropped", "hung")} for s in SURFACES},
            "details": details, **recovery, "replica_replaced_s": replaced_s,
            "unavailable_metric_before": before, "unavailable_metric_after": after}


async def run_all(url: str, args, samples16, metrics_port: int) -> list[dict]:
    clients = Clients.for_speech(url, samples16, args.answer_steps)
    try:
        warm = [await clients.run(Answer(s)) for s in SURFACES]  # every surface once: code paths warm
        bad = [(a.surface, a.outcome, a.detail) for a in warm if a.outcome != "finished"]
        print(f"[faults] one answer per surface: {'all finished' if not bad else bad}", flush=True)
        out = []
        for dep in args.kill:
            out.append(await one_kill(clients, dep, args, metrics_port))
            r = out[-1]
            print(f"[faults] {dep}: {r['error']} error, {r['finished']} finished, {r['dropped']} dropped, "
                  f"{r['hung']} hung; recovered in {r['recovered_s']} s", flush=True)
            await asyncio.sleep(args.settle)  # the new replica settles (its first calls) before the next round
        return out
    finally:
        await clients.close()


# -------------------------------------------------------------------------------------------- main
def spare_config(directory: Path, n: int) -> Path:
    """``serve_apps/config.yaml`` with every deployment's ``min_replicas`` at least ``n``."""
    import yaml

    from serve_apps.app import CONFIG_YAML

    doc = yaml.safe_load(CONFIG_YAML.read_text())
    for d in doc["applications"][0]["deployments"]:
        a = d["autoscaling_config"]
        a["min_replicas"] = max(n, a["min_replicas"])
        a["max_replicas"] = max(a["min_replicas"], a["max_replicas"])
    path = directory / "serve_spare.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def table(rows: list[dict]) -> None:
    f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    print(f"\n{'killed':14s} {'in flight':>9s} {'error':>6s} {'done':>5s} {'drop':>5s} {'hung':>5s} "
          f"{'err end max':>11s} {'end max':>8s} {'replaced':>8s} {'new 1st':>7s} {'new ok':>7s} {'metric +':>8s}"
          "   (s after the kill)")
    for r in rows:
        ends = [v for v in r["end_max_s"].values() if v is not None]
        print(f"{r['deployment']:14s} {r['in_flight']:9d} {r['error']:6d} {r['finished']:5d} {r['dropped']:5d} "
              f"{r['hung']:5d} {f(r['end_max_s']['error']):>11s} {f(max(ends) if ends else None):>8s} "
              f"{f(r['replica_replaced_s']):>8s} {f(r['recovered_first_chunk_s']):>7s} {f(r['recovered_s']):>7s} "
              f"{r['unavailable_metric_after'] - r['unavailable_metric_before']:8.0f}")
    for r in rows:
        for k, n in r["details"].items():
            print(f"  {r['deployment']}: {n}x {k}")
        if r["failed_tries"]:
            print(f"  {r['deployment']}: new answers before the first success: {r['failed_tries']}")


def main() -> None:
    ap = parser("serve_faults", __doc__)
    ap.add_argument("--answers", type=int, default=16, help="concurrent streaming answers at each kill")
    ap.add_argument("--answer-steps", type=int, default=160, help="their decoding steps (long enough to be in flight)")
    ap.add_argument("--kill", default=",".join(DEPLOYMENTS), help="deployments, in order, one replica each")
    ap.add_argument("--kill-after", type=float, default=1.0, help="seconds after every answer streamed")
    ap.add_argument("--bound", type=float, default=30.0, help="longest wait for an answer's end / a recovery")
    ap.add_argument("--poll", type=float, default=0.25, help="seconds between new-answer tries after a kill")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds between rounds")
    ap.add_argument("--spare", type=int, default=1,
                    help="min_replicas of every deployment (config.yaml's is 1; 2: a spare replica answers while the "
                         "killed one is replaced)")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/serve_faults[_spare<N>].json")
    args = ap.parse_args()
    args.kill = [d.strip() for d in args.kill.split(",") if d.strip()]
    if not set(args.kill) <= set(DEPLOYMENTS) or not 1 <= args.answers <= 64 or args.bound <= 0:
        ap.error(f"--kill from {DEPLOYMENTS}, --answers 1-64, positive --bound")
    os.environ.pop("DEEPOMNI_API_KEY", None)  # no key on this private app
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")  # the counter reaches /metrics within 1 s

    from benchmarks.serve_latency import question_wav

    _, samples16 = question_wav()
    out = {"command": command("serve_faults"), "args": vars(args), **machine(),
           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "loadavg_start": os.getloadavg()}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="deepomni-faults-") as tmp:
        # the app as the soak starts it; its answers run --answer-steps (max_steps_limit just above), with
        # room for the answers and the probe (max_rows) and, with --spare, more replicas
        serve_config = spare_config(Path(tmp), args.spare) if args.spare > 1 else None
        out["app_args"] = {**app_args(readable_checkpoint(Path(tmp) / "model"), args.answer_steps,
                                      max(64, args.answer_steps), None),
                           "max_rows": max(32, 2 * args.answers + 4),
                           **({"serve_config": str(serve_config)} if serve_config else {})}
        with serve_app(out["app_args"]) as (url, out["ray_serve_env"]):  # stopped after: only what it started
            print(f"[faults] app up at {url} in {time.perf_counter() - t0:.0f} s", flush=True)
            rows, out["deployment_options"], out["serve_status_end"] = measure(url, args, samples16, serve_config)
    out["kills"] = rows
    out["loadavg_end"] = os.getloadavg()
    table(rows)
    save_result(Path(args.out or RESULTS / f"serve_faults{f'_spare{args.spare}' if args.spare > 1 else ''}.json"), out)
    rec = [r["recovered_s"] for r in rows]
    hung = sum(r["hung"] for r in rows)
    print(f"faults_hung={hung} recover_max_s={'nan' if None in rec else f'{max(rec):.2f}'}")


def measure(url: str, args, samples16, serve_config: Path | None) -> tuple[list[dict], dict, dict]:
    """Every kill of ``args.kill`` on the app at ``url``: the rows, the deployments' options, Serve's status
    at the end."""
    import ray
    from ray import serve

    from serve_apps.app import CONFIG_YAML, deployment_options

    options = deployment_options(serve_config or CONFIG_YAML)
    metrics_port = ray._private.worker.global_worker.node.metrics_export_port
    rows = asyncio.run(run_all(url, args, samples16, metrics_port))
    status = {name: str(d.status) for name, d in serve.status().applications[APP].deployments.items()}
    return rows, options, status


if __name__ == "__main__":
    main()
