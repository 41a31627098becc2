"""Soak: many concurrent clients mixing every endpoint of the Serve app for a while, on 127.0.0.1.

    python -m benchmarks.soak                              # 50 clients, 60 s, tiny preset, CPU
    python -m benchmarks.soak --clients 8 --seconds 15     # a quick check

Starts the Serve app in this process as ``benchmarks/serve_latency.py`` does (``serve_apps/config.yaml``'s
deployments and autoscaling, Ray Serve's high-throughput mode, an embedded local Ray on 127.0.0.1; the
tiny preset's random weights with a printable-text head, as the tests use them, so that conversations
read their earlier answers back from the kept context; the app's cached built-in codec), with
short answers (``--answer-steps`` decoding steps) so that the soak makes many requests. Then ``--clients``
clients each loop, for ``--warmup`` seconds (not counted: autoscaling and the replicas' allocators settle)
and then ``--seconds`` seconds (counted): pick an endpoint from a fixed mix (seeded, ``--seed``), run it
to its end, repeat. The mix (docs/serving.md):

* ``dialogue_wav``: ``POST /v1/dialogue`` with the spoken WAV, server-sent events;
* ``dialogue_text``: the same with a written question (JSON), spoken answer;
* ``dialogue_ws``: ``WS /v1/dialogue/ws``, two turns (spoken, then written), the second with the first in
  context (its ``cached_tokens`` are counted);
* ``chat_audio``: ``POST /v1/chat/completions`` streamed, ``input_audio`` in, pcm16 audio out;
* ``chat_text``: ``POST /v1/chat/completions`` not streamed, text in and out;
* ``transcriptions``: ``POST /v1/audio/transcriptions`` (multipart WAV);
* ``speech``: ``POST /v1/audio/speech``, ``wav`` (streamed as generated; its answers run to the app's
  ``max_steps_limit``, ``--steps-limit``, as the request sets no length);
* ``realtime``: ``WS /v1/realtime`` (GA events): ``session.update`` (no VAD), one audio turn appended and
  committed, ``response.create``, until ``response.done``;
* ``healthz``: ``GET /healthz``, now and then.

Every request has a deadline (``--timeout``); after ``--seconds`` no request starts and the ones in
flight finish (each within its deadline). Per endpoint: requests, answers (complete, well-formed), 4xx,
5xx, in-band errors (inside a started stream or WebSocket session), of both those that are ``overloaded``
(the app's deliberate refusal, 503 + Retry-After or its in-band form, docs/serving.md "Overload"; clients
here do not retry), timeouts, connection errors; and time to first audio (TTFA: request sent -> first
audio bytes received; the WebSocket's first turn from its start, Realtime's from the commit) of the
audio-out endpoints, overall p50/p99. Each Ray process of the app (Serve
replicas, the proxy, the controller; HAProxy when it runs) has its resident memory (RSS) read every
``--sample-every`` seconds: at the start of the counted part, at its end, and the growth (the maximum over
the processes there from start to end: a replica that autoscaling adds is shown, growing from its start).
Saves ``benchmarks/results/soak.json`` (the command, the machine, every figure and RSS sample); the last
line is ``soak_5xx=<n> rss_growth_max_pct=<x>``, where ``n`` counts HTTP 5xx plus in-band server errors
and refusals (overloaded ones included).
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.harness import RESULTS, command, machine, parser, percentile, readable_checkpoint, save_result, serve_app
from benchmarks.surfaces import Refused, Surfaces

# endpoint -> weight in the mix (healthz: now and then)
MIX = {"dialogue_wav": 2, "dialogue_text": 1, "dialogue_ws": 1, "chat_audio": 2, "chat_text": 1,
       "transcriptions": 1, "speech": 1, "realtime": 1, "healthz": 0.5}
AUDIO_OUT = ("dialogue_wav", "dialogue_text", "dialogue_ws", "chat_audio", "speech", "realtime")


def _overloaded(text: str) -> bool:
    return "overloaded" in text or "backpressure" in text


@dataclass
class Stats:
    requests: int = 0
    answers: int = 0
    http_4xx: int = 0
    http_5xx: int = 0
    overloaded: int = 0  # of the 5xx: the app's (or Serve's) deliberate refusal, 503 + Retry-After
    inband_errors: int = 0  # an error inside a started stream / WebSocket session
    inband_5xx: int = 0  # of those, the server's faults or overload (internal_error, server_error, overloaded)
    timeouts: int = 0
    conn_errors: int = 0
    other_errors: int = 0
    ttfa_ms: list = field(default_factory=list)
    latency_ms: list = field(default_factory=list)  # whole request, answers only
    cached_tokens: list = field(default_factory=list)  # dialogue_ws second turns
    errors: dict = field(default_factory=dict)  # first messages of each kind, with counts

    def note(self, kind: str, msg: str) -> None:
        msg = re.sub(r'"event_id": "[^"]*", ', "", msg)  # one line per kind of error, not per event or wait
        msg = re.sub(r'(try again in |"retry_after_s": ?)\d+', r"\1N", msg)
        key = f"{kind}: {msg[:160]}"
        if key in self.errors or len(self.errors) < 8:
            self.errors[key] = self.errors.get(key, 0) + 1


async def one(clients: Surfaces, name: str, rng: random.Random, st: Stats, timeout: float) -> None:
    import httpx
    import websockets

    st.requests += 1
    t0 = time.perf_counter()
    try:
        ttfa = await asyncio.wait_for(getattr(clients, name)(rng), timeout)
        if isinstance(ttfa, tuple):  # dialogue_ws: (ttfa, cached tokens of its second turn)
            ttfa, cached = ttfa
            st.cached_tokens.append(cached)
    except Refused as e:
        if e.inband:
            st.inband_errors += 1
            if _overloaded(e.body):
                st.overloaded += 1
            if _overloaded(e.body) or "internal_error" in e.body or "server_error" in e.body:
                st.inband_5xx += 1
            st.note("in-band", e.body)
        elif e.status >= 500:
            st.http_5xx += 1
            st.overloaded += _overloaded(e.body)
            st.note(str(e.status), e.body)
        else:
            st.http_4xx += 1
            st.note(str(e.status), e.body)
        return
    except (asyncio.TimeoutError, httpx.TimeoutException) as e:
        st.timeouts += 1
        st.note("timeout", f"{type(e).__name__} after {time.perf_counter() - t0:.1f} s")
        return
    except (httpx.TransportError, websockets.exceptions.WebSocketException, OSError) as e:
        # a refused WebSocket handshake: the status of the HTTP answer Serve gave instead
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status is not None and status >= 500:
            st.http_5xx += 1
            body = getattr(e.response, "body", b"") or b""
            st.overloaded += _overloaded(body.decode(errors="replace"))
            st.note(str(status), f"handshake: {body[:160]!r}")
        elif status is not None:
            st.http_4xx += 1
            st.note(str(status), "handshake")
        else:
            st.conn_errors += 1
            st.note("connection", f"{type(e).__name__}: {e}")
        return
    except Exception as e:  # noqa: BLE001 - a client-side surprise (malformed answer): counted, shown
        st.other_errors += 1
        st.note("other", f"{type(e).__name__}: {e}")
        return
    st.answers += 1
    st.latency_ms.append((time.perf_counter() - t0) * 1e3)
    if ttfa is not None:
        st.ttfa_ms.append(ttfa * 1e3)
    elif name in AUDIO_OUT:
        st.note("no audio", "answer complete without audio bytes")


async def client_loop(i: int, clients: Surfaces, seed: int, t_end: float, stats: dict, timeout: float,
                      counting: asyncio.Event) -> None:
    rng = random.Random(seed * 100_003 + i)
    names, weights = list(MIX), list(MIX.values())
    await asyncio.sleep(rng.random())  # spread the starts over a second
    while time.monotonic() < t_end:
        name = rng.choices(names, weights)[0]
        st = stats["counted" if counting.is_set() else "warmup"].setdefault(name, Stats())
        await one(clients, name, rng, st, timeout)


# --------------------------------------------------------------------------------------------- memory
LOOKUP: dict = {}  # how the processes were found (the state API, else the process titles), for the record
SERVE_CLASSES = ("ServeReplica:", "ProxyActor", "HAProxyManager", "ServeController")


def app_processes() -> dict[str, int]:
    """name -> pid of the app's Ray processes (all on this machine, all started by this script): Serve replicas,
    proxy, controller, and HAProxy (a child of the proxy manager) when it runs."""
    import psutil

    procs: dict[str, int] = {}
    # The state API answers through the dashboard, which the embedded Ray does not run (deepomni.ray_env):
    # asked without an address it would reach whatever listens on 127.0.0.1:8265, e.g. another local Ray.
    # So only our own Ray's dashboard, when there is one; else Ray's process titles, in this process's tree.
    from ray._private import worker

    dashboard = getattr(getattr(worker, "_global_node", None), "webui_url", None)
    if dashboard and LOOKUP.get("method", "list_actors").endswith("list_actors"):
        try:
            from ray.util.state import list_actors

            for a in list_actors(address=f"http://{dashboard}", filters=[("state", "=", "ALIVE")], limit=1000,
                                 raise_on_missing_output=False):
                cls = a.class_name or ""
                if cls.startswith(SERVE_CLASSES) and a.pid:
                    procs[f"{cls.removeprefix('ServeReplica:deepomni:')}#pid{a.pid}"] = a.pid
            LOOKUP["method"] = "ray.util.state.list_actors"
        except Exception as e:  # noqa: BLE001 - then the titles, below
            LOOKUP["method"] = f"process titles (state API: {type(e).__name__}: {str(e)[:120]})"
    LOOKUP.setdefault("method", "process titles ray::<class> (no dashboard: no state API)")
    mine = psutil.Process().children(recursive=True)  # everything this script started: the embedded Ray
    for p in mine:
        try:
            title = p.cmdline()
            name = p.name()
        except psutil.Error:
            continue
        if name == "haproxy":
            procs[f"haproxy#pid{p.pid}"] = p.pid
        elif title and title[0].startswith("ray::"):
            cls = " ".join(title).split()[0].removeprefix("ray::").split(".")[0]  # ray::<class>.<method now>
            if cls.startswith(SERVE_CLASSES) and p.pid not in procs.values():
                procs[f"{cls.removeprefix('ServeReplica:deepomni:')}#pid{p.pid}"] = p.pid
    return procs


def rss_mb(pids: dict[str, int]) -> dict[str, float]:
    import psutil

    out = {}
    for name, pid in pids.items():
        try:
            out[name] = psutil.Process(pid).memory_info().rss / 2 ** 20
        except psutil.Error:
            pass
    return out


async def sample_memory(samples: list, every: float, stop: asyncio.Event, t_ref: float) -> None:
    """Every process's RSS every ``every`` seconds (processes looked up each time: autoscaling adds some)."""
    while True:
        pids = await asyncio.to_thread(app_processes)
        samples.append((time.monotonic() - t_ref, await asyncio.to_thread(rss_mb, pids), pids))
        try:
            await asyncio.wait_for(stop.wait(), every)
            return
        except asyncio.TimeoutError:
            pass


# ---------------------------------------------------------------------------------------------- main
def app_args(checkpoint: str | None, answer_steps: int, steps_limit: int, threads: int | None) -> dict:
    """The app's settings here: short answers, so that the load makes many requests. max_steps_limit bounds
    /v1/audio/speech too, which always decodes up to it (OpenAI's request has no length): the random model
    rarely ends, so without it every speech answer would run 1024 steps."""
    return {"checkpoint": checkpoint, "max_steps": answer_steps, "max_steps_limit": steps_limit,
            "torch_threads": threads or 1}


async def soak(url: str, args, samples16) -> dict:
    clients = Surfaces.for_speech(url, samples16, args.answer_steps, timeout=args.timeout)  # inside the event loop
    try:
        # each endpoint once, one after another: every code path has run before anything is counted
        check: dict[str, Stats] = {}
        rng = random.Random(args.seed)
        for name in MIX:
            await one(clients, name, rng, check.setdefault(name, Stats()), args.timeout)
        bad = {n: s.errors for n, s in check.items() if s.answers != 1}
        print(f"[soak] one request per endpoint: {'all answered' if not bad else bad}", flush=True)

        stats: dict = {"warmup": {}, "counted": {}}
        counting, stop_sampling = asyncio.Event(), asyncio.Event()
        t_ref = time.monotonic()
        t_count, t_end = t_ref + args.warmup, t_ref + args.warmup + args.seconds
        tasks = [asyncio.create_task(client_loop(i, clients, args.seed, t_end, stats, args.timeout, counting))
                 for i in range(args.clients)]
        print(f"[soak] {args.clients} clients: {args.warmup:.0f} s warm-up, then {args.seconds:.0f} s counted",
              flush=True)
        await asyncio.sleep(max(0.0, t_count - time.monotonic()))
        counting.set()
        samples: list = []
        sampler = asyncio.create_task(sample_memory(samples, args.sample_every, stop_sampling, t_count))
        progress = asyncio.create_task(_progress(stats["counted"], t_count, t_end))
        await asyncio.sleep(max(0.0, t_end - time.monotonic()))
        t_stop = time.monotonic()
        print(f"[soak] {args.seconds:.0f} s: no new requests; waiting for those in flight", flush=True)
        done, pending = await asyncio.wait(tasks, timeout=args.timeout + 10)  # each is bounded by its deadline
        for t in pending:  # only if a deadline failed to fire: counted as a hang
            t.cancel()
        drain_s = time.monotonic() - t_stop
        stop_sampling.set()
        await sampler
        progress.cancel()
        pids = await asyncio.to_thread(app_processes)  # the end, after the drain
        samples.append((time.monotonic() - t_count, await asyncio.to_thread(rss_mb, pids), pids))
        health = (await clients.http.get(f"{url}/healthz")).json()
        return {"check": {n: s.answers for n, s in check.items()}, "stats": stats, "samples": samples,
                "drain_s": drain_s, "hung_clients": len(pending), "healthz_end": health}
    finally:
        await clients.close()


async def _progress(counted: dict, t0: float, t_end: float) -> None:
    while True:
        await asyncio.sleep(15)
        n = sum(s.answers for s in counted.values())
        e5 = sum(s.http_5xx for s in counted.values())
        print(f"[soak] {time.monotonic() - t0:5.0f} s: {n} answers, {e5} 5xx", flush=True)


COUNTS = ("requests", "answers", "http_4xx", "http_5xx", "overloaded", "inband_errors", "inband_5xx", "timeouts",
          "conn_errors", "other_errors")


def summarize(res: dict) -> dict:
    counted: dict[str, Stats] = res["stats"]["counted"]
    per = {}
    for name in MIX:
        s = counted.get(name, Stats())
        per[name] = {k: getattr(s, k) for k in COUNTS}
        per[name]["ttfa_p50_ms"], per[name]["ttfa_p99_ms"] = percentile(s.ttfa_ms, 50), percentile(s.ttfa_ms, 99)
        per[name]["latency_p50_ms"], per[name]["latency_p99_ms"] = percentile(s.latency_ms, 50), percentile(s.latency_ms, 99)
        if s.cached_tokens:
            per[name]["second_turn_cached_tokens_min"] = min(s.cached_tokens)
            per[name]["second_turn_cache_hits"] = sum(c > 0 for c in s.cached_tokens)
        per[name]["errors"] = s.errors
    ttfa = [x for s in counted.values() for x in s.ttfa_ms]
    warm = res["stats"]["warmup"]
    total = {k: sum(v[k] for v in per.values()) for k in COUNTS}
    total.update(ttfa_p50_ms=percentile(ttfa, 50), ttfa_p99_ms=percentile(ttfa, 99), ttfa_n=len(ttfa),
                 server_5xx=total["http_5xx"] + total["inband_5xx"])
    # memory: each process's first and last sample of the counted part
    first: dict[str, tuple] = {}
    last: dict[str, tuple] = {}
    for t, rss, _ in res["samples"]:
        for name, mb in rss.items():
            first.setdefault(name, (t, mb))
            last[name] = (t, mb)
    mem = {}
    for name in sorted(first):
        (t0, a), (t1, b) = first[name], last[name]
        mem[name] = {"start_mb": round(a, 1), "end_mb": round(b, 1), "growth_pct": round(100 * (b - a) / a, 2),
                     "first_seen_s": round(t0, 1), "last_seen_s": round(t1, 1),
                     "peak_mb": round(max(r[name] for _, r, _ in res["samples"] if name in r), 1)}
    # the growth goal: processes there from the first sample to the last (autoscaling may add or remove some)
    full = [m["growth_pct"] for n, m in mem.items() if n in res["samples"][0][1] and n in res["samples"][-1][1]]
    return {"per_endpoint": per, "total": total, "memory": mem,
            "rss_growth_max_pct": max(full) if full else None,
            "warmup": {"requests": sum(s.requests for s in warm.values()),
                       "answers": sum(s.answers for s in warm.values()),
                       "http_5xx": sum(s.http_5xx for s in warm.values()),
                       "errors": {n: s.errors for n, s in warm.items() if s.errors}},
            "memory_samples": [{"t_s": round(t, 1), "rss_mb": {k: round(v, 1) for k, v in rss.items()}}
                               for t, rss, _ in res["samples"]],
            "one_request_per_endpoint": res["check"], "drain_s": round(res["drain_s"], 1),
            "hung_clients": res["hung_clients"], "process_lookup": LOOKUP.get("method"),
            "healthz_end": res["healthz_end"]}


def table(out: dict) -> None:
    f = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
    print(f"\n{'endpoint':15s} {'req':>5s} {'ans':>5s} {'4xx':>4s} {'5xx':>4s} {'ovl':>4s} {'inb':>4s} {'t/o':>4s} "
          f"{'conn':>4s} {'oth':>4s} {'ttfa p50':>9s} {'ttfa p99':>9s} {'lat p50':>8s} {'lat p99':>8s}  (ms)")
    def row(name: str, v: dict) -> str:
        n = " ".join(f"{v[k]:{w}d}" for k, w in (("requests", 5), ("answers", 5), ("http_4xx", 4), ("http_5xx", 4),
                                                 ("overloaded", 4), ("inband_errors", 4), ("timeouts", 4),
                                                 ("conn_errors", 4), ("other_errors", 4)))
        ms = " ".join(f"{f(v.get(k)):>{w}s}" for k, w in (("ttfa_p50_ms", 9), ("ttfa_p99_ms", 9),
                                                          ("latency_p50_ms", 8), ("latency_p99_ms", 8)))
        return f"{name:15s} {n} {ms}"

    for name, v in out["per_endpoint"].items():
        print(row(name, v))
    print(row("all", out["total"]))
    print("(inb: errors inside a started stream or session; ovl: overloaded refusals, counted in 5xx or inb;\n"
          " soak_5xx below: HTTP 5xx + in-band server errors and refusals)")
    for name, v in out["per_endpoint"].items():
        for msg, n in v["errors"].items():
            print(f"  {name}: {n}x {msg}")
    ws = out["per_endpoint"]["dialogue_ws"]
    if "second_turn_cache_hits" in ws:
        print(f"dialogue_ws: {ws['second_turn_cache_hits']} of {ws['answers']} second turns read the first from the "
              f"Backbone's kept context (cached_tokens > 0)")
    print(f"\n{'process':32s} {'start MB':>9s} {'end MB':>9s} {'peak MB':>9s} {'growth':>8s}  seen (s)")
    for name, m in out["memory"].items():
        print(f"{name:32s} {m['start_mb']:9.1f} {m['end_mb']:9.1f} {m['peak_mb']:9.1f} {m['growth_pct']:7.2f}%  "
              f"{m['first_seen_s']:.0f}-{m['last_seen_s']:.0f}")


def main() -> None:
    ap = parser("soak", __doc__)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=60, help="the counted part")
    ap.add_argument("--warmup", type=float, default=10, help="the same load before it, not counted")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint", default="readable",
                    help="readable (default: tiny random weights answering printable text, saved to a temporary "
                         "directory), random (the app's default model), or a checkpoint directory")
    ap.add_argument("--answer-steps", type=int, default=32, help="decoding steps per answer (the app's max_steps)")
    ap.add_argument("--steps-limit", type=int, default=64,
                    help="the app's max_steps_limit: the steps of every /v1/audio/speech answer")
    ap.add_argument("--timeout", type=float, default=60, help="deadline of each request, seconds")
    ap.add_argument("--sample-every", type=float, default=5, help="seconds between RSS samples")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per CPU replica (default 1)")
    ap.add_argument("--out", default=str(RESULTS / "soak.json"))
    args = ap.parse_args()
    if min(args.clients, args.seconds, args.timeout) <= 0 or args.clients > 500 or args.seconds > 3600:
        ap.error("--clients 1-500, --seconds up to 3600, positive --timeout")
    if not 0 < args.answer_steps <= args.steps_limit:
        ap.error("--answer-steps must be positive and at most --steps-limit")
    os.environ.pop("DEEPOMNI_API_KEY", None)  # no key on this private app

    from benchmarks.serve_latency import question_wav

    _, samples16 = question_wav()
    out = {"command": command("soak"), "args": vars(args), **machine(),
           "mix": MIX, "question_seconds": len(samples16) / 16000,
           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "loadavg_start": os.getloadavg()}  # a shared machine: what else ran shows here
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="deepomni-soak-") as tmp:
        checkpoint = {"readable": readable_checkpoint(Path(tmp) / "model") if args.checkpoint == "readable" else None,
                      "random": None}.get(args.checkpoint, args.checkpoint)
        out["app_args"] = app_args(checkpoint, args.answer_steps, args.steps_limit, args.threads)
        with serve_app(out["app_args"]) as (url, out["ray_serve_env"]):  # stopped after: only what it started
            print(f"[soak] app up at {url} in {time.perf_counter() - t0:.0f} s (Ray Serve mode: "
                  f"{out['ray_serve_env'] or 'Ray defaults'})", flush=True)
            res = asyncio.run(soak(url, args, samples16))
    out.update(summarize(res))
    out["loadavg_end"] = os.getloadavg()
    table(out)
    t = out["total"]
    print(f"\nanswers {t['answers']} of {t['requests']} requests in {args.seconds:.0f} s "
          f"({t['answers'] / args.seconds:.1f}/s), 5xx {t['http_5xx']} + in-band {t['inband_5xx']} "
          f"(of them overloaded {t['overloaded']}), "
          f"timeouts {t['timeouts']}, TTFA p50 {t['ttfa_p50_ms'] or 0:.0f} ms p99 {t['ttfa_p99_ms'] or 0:.0f} ms, "
          f"drain {out['drain_s']} s, hung clients {out['hung_clients']}")
    save_result(Path(args.out), out)
    g = out["rss_growth_max_pct"]
    print(f"soak_5xx={t['server_5xx']} rss_growth_max_pct={'nan' if g is None else f'{g:.2f}'}")


if __name__ == "__main__":
    main()
