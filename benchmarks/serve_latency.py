"""Spoken-dialogue latency: time to first audio (TTFA) and real-time factor, Serve vs in-process.

    python -m benchmarks.serve_latency                    # tiny preset, CPU: in-process and Serve, 1 and 16 sessions
    python -m benchmarks.serve_latency --only inprocess --preset deepseek-v2-lite --device cuda --codec snac-random

One run measures, on the same model, codec and spoken question (espeak-ng speech, else a synthetic tone):

* ``inprocess``: the pipeline with no Serve: log-mel -> speech encoder + projector (the utterances that
  arrive while a batch is encoded go together in the next one, as in the Serve app) -> the Backbone
  deployment's own answer loop (:class:`deepomni.serve.answer_loop.AnswerLoop`: the app's prompts,
  continuous batching in :class:`deepomni.serve.engine.BatchEngine` stepped in a worker thread, the codec
  frames of all sessions in batched vocoder calls) -> the Vocoder deployment's streaming codec decoder
  (:class:`deepomni.serve.vocoder.CodecVocoder`), all in this process (the reference: what the split
  costs is the difference);
* ``serve``: the Serve app (``serve_apps``) on 127.0.0.1, ``POST /v1/dialogue`` with the WAV, reading the
  server-sent events (its deployments split the same components across replicas);
* ``openai``: the same app through ``POST /v1/chat/completions`` (streamed, ``input_audio`` in, pcm16
  audio out at 24 kHz), in the same alternating 1-session rounds: what the compatibility layer adds to
  TTFA is the paired median difference against ``serve``.

And, in-process, **the prefill of turn 10** of a spoken conversation (9 spoken questions and their
answers before it): with the engine keeping the conversation's context (only turn 10 runs) against
re-prefilling the whole history (an engine that keeps nothing), medians of ``--repeats`` first steps.

Both sides run at once; their 1-session rounds alternate (``--repeats`` pairs), so the drift of a shared
machine hits both alike. For 1 and N (default 16) concurrent sessions, and N sessions run one after another: TTFA = request sent
-> first audio samples received (p50, p99), RTF = answer time / answer audio seconds (per session), and
aggregate throughput = answer audio seconds / wall seconds. Answers are bounded by ``--answer-steps``
decoding steps (the random model rarely ends earlier); both sides load the same saved weights and codec,
and RTF and throughput are per audio second, so answers of different lengths compare fairly. Saves
``benchmarks/results/serve_latency[_<preset>_<device>].json``; the last line is ``ttfa_p50_ms=<figure>``
(the Serve figure for 1 session when Serve ran, else the in-process one).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import machine, parser, percentile, save_result, serve_app


# ------------------------------------------------------------------------------------------ inputs
def question_wav(seconds: float = 2.0) -> tuple[bytes, np.ndarray]:
    """A spoken question as WAV bytes (espeak-ng when present, else a 16 kHz tone sweep) and its samples."""
    import shutil
    import subprocess

    wav = None
    if shutil.which("espeak-ng"):
        out = subprocess.run(["espeak-ng", "--stdout", "-v", "en-us", "What is the capital of France, please?"],
                             capture_output=True, check=True).stdout
        import soundfile as sf

        data, sr = sf.read(io.BytesIO(out), dtype="float32")
        if sr != 16000:
            import soxr

            data = soxr.resample(data, sr, 16000)
        wav = data.astype(np.float32)
    if wav is None:
        t = np.arange(int(seconds * 16000)) / 16000
        wav = (0.3 * np.sin(2 * np.pi * (200 + 150 * t) * t)).astype(np.float32)
    buf = io.BytesIO()
    import soundfile as sf

    sf.write(buf, wav, 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue(), wav


# ------------------------------------------------------------------------------------- in-process
@dataclass
class Answer:
    ttfa_s: float | None = None
    total_s: float = 0.0
    audio_s: float = 0.0
    submitted_s: float | None = None  # in-process: speech encoded and handed to the answer loop
    end: object = None  # in-process: the answer loop's AnswerEnd (its text ids, steps, frames)


def wav_encoder(model) -> Callable[[list[bytes]], list[torch.Tensor]]:
    """WAVs -> the SpeechEncoder deployment's own encoding (``serve_apps.encoder.SpeechEncoding``: log-mel,
    the model's speech encoder + projector), one batch for the utterances that arrived together (as the
    deployment does: ``serve_apps.batching.CallBatcher``)."""
    from serve_apps.encoder import SpeechEncoding

    encoding = SpeechEncoding(model.speech, model.embed.weight.device)

    def encode_many(wavs_bytes: list[bytes]) -> list[torch.Tensor]:
        out = encoding.encode_many([(w, None) for w in wavs_bytes])
        bad = [r.message for r in out if not hasattr(r, "audio_ND")]
        if bad:
            raise ValueError(f"the question's audio was refused: {bad[0]}")
        return [torch.from_numpy(r.audio_ND) for r in out]

    return encode_many


class InProcess:
    """The app's answer path in this process, no Serve: batched speech encoding (``encode_many``, default
    :func:`wav_encoder`; the utterances that arrive while a batch is encoded go together in the next one) ->
    the Backbone deployment's own answer loop (:class:`deepomni.serve.answer_loop.AnswerLoop`, with the app's
    settings and ``max_rows`` rows) -> the Vocoder deployment's decoding
    (:class:`deepomni.serve.vocoder.CodecVocoder`) called in this process."""

    def __init__(self, model, codec, answer_steps: int, max_rows: int,
                 encode_many: Callable[[list[bytes]], list[torch.Tensor]] | None = None):
        from deepomni.serve.answer_loop import AnswerLoop
        from deepomni.serve.config import AppConfig
        from deepomni.serve.vocoder import CodecVocoder
        from serve_apps.batching import CallBatcher

        self.codec, self.answer_steps = codec, answer_steps
        self.loop = AnswerLoop.from_config(model, AppConfig(max_rows=max_rows, max_steps=answer_steps),
                                           vocoder=CodecVocoder(codec))
        self.loop.warm_up()  # as the Backbone replica does when it starts
        self.encode_many = encode_many or wav_encoder(model)
        self.encode = CallBatcher(self.encode_many, max_batch=max_rows)

    async def answer(self, wav_bytes: bytes) -> Answer:
        from deepomni.serve.messages import Conversation, GenerateOptions

        t0 = time.perf_counter()
        audio_ND = await self.encode(wav_bytes)
        ans, samples = Answer(submitted_s=time.perf_counter() - t0), 0
        conv = Conversation.single(audio_ND=audio_ND.float().cpu().numpy())  # as the SpeechEncoder returns it
        async for chunk in self.loop.generate(conv, GenerateOptions(max_steps=self.answer_steps, seed=0)):
            if chunk.error is not None:
                raise RuntimeError(f"in-process answer failed: {chunk.error.reason}: {chunk.error.message}")
            n = 0 if chunk.pcm is None else len(chunk.pcm)
            if n and ans.ttfa_s is None:
                ans.ttfa_s = time.perf_counter() - t0
            samples += n
            ans.end = chunk.end or ans.end
        ans.total_s = time.perf_counter() - t0
        ans.audio_s = samples / self.codec.sample_rate
        return ans


# ------------------------------------------------------------------------------------------ serve
class ServeClient:
    """POST /v1/dialogue with the WAV; reads the SSE stream (docs/serving.md)."""

    def __init__(self, url: str):
        self.url = url

    async def answer(self, wav_bytes: bytes) -> Answer:
        import httpx

        ans, samples, rate = Answer(), 0, None
        t0 = time.perf_counter()
        async with httpx.AsyncClient(timeout=600) as client:
            async with client.stream("POST", f"{self.url}/v1/dialogue", content=wav_bytes,
                                     headers={"content-type": "audio/wav"}) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
                event = None
                async for line in r.aiter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:") and event == "audio":
                        msg = json.loads(line[5:])
                        n = len(msg.get("pcm_b64", msg.get("audio_b64", ""))) * 3 // 4 // 2
                        rate = msg.get("sample_rate", rate)
                        if n and ans.ttfa_s is None:
                            ans.ttfa_s = time.perf_counter() - t0
                        samples += n
        ans.total_s = time.perf_counter() - t0
        ans.audio_s = samples / (rate or 16000)
        return ans


class OpenAIChatClient:
    """POST /v1/chat/completions, streamed, the WAV as ``input_audio``, audio out (pcm16 at 24 kHz)."""

    def __init__(self, url: str):
        self.url = url

    async def answer(self, wav_bytes: bytes) -> Answer:
        import base64

        import httpx

        body = {"model": "deepomni", "stream": True, "modalities": ["text", "audio"],
                "audio": {"voice": "alloy", "format": "pcm16"},
                "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {
                    "data": base64.b64encode(wav_bytes).decode(), "format": "wav"}}]}]}
        ans, samples = Answer(), 0
        t0 = time.perf_counter()
        async with httpx.AsyncClient(timeout=600) as client:
            async with client.stream("POST", f"{self.url}/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    for choice in json.loads(line[6:]).get("choices", []):
                        data = (choice["delta"].get("audio") or {}).get("data")
                        if data:
                            n = len(data) * 3 // 4 // 2
                            if ans.ttfa_s is None:
                                ans.ttfa_s = time.perf_counter() - t0
                            samples += n
        ans.total_s = time.perf_counter() - t0
        ans.audio_s = samples / 24000
        return ans


def prefill_turn10(model, audio_ND: torch.Tensor, answer_steps: int, repeats: int) -> dict:
    """Prefill + first token of turn 10 of a spoken conversation, with the context kept
    vs re-prefilled; the history's answers are the model's own (text answers of ``answer_steps``)."""
    from deepomni.data.sequences import INSTRUCTIONS
    from deepomni.model.generate import GenerationConfig
    from deepomni.model.prompt import Turn, conversation
    from deepomni.serve.engine import BatchEngine, Request
    from deepomni.text import load_tokenizer

    system = load_tokenizer("bytes", model.cfg.text_vocab_size).encode(INSTRUCTIONS["spoken_qa"])
    lay, n = model.layout, audio_ND.shape[0]
    kept, cold = BatchEngine(model, max_rows=4), BatchEngine(model, max_rows=4, prefix_entries=0)
    turns: list[Turn] = []

    def request(keep: bool, steps: int) -> "Request":
        audio = audio_ND.repeat(sum(t.role == "user" for t in turns), 1)
        return Request(conversation(lay, turns, system), audio, GenerationConfig(max_steps=steps, speech=False),
                       keep=keep)

    for _ in range(9):  # turns 1-9, each answered and kept
        turns.append(Turn("user", audio_positions=n))
        kept.submit(request(True, answer_steps))
        text = []
        while not kept.idle:
            text += [ev.text_id for s, ev in kept.step() if ev.kind == "text"]
        turns.append(Turn("assistant", tuple(text)))
    turns.append(Turn("user", audio_positions=n))

    def first_step(engine) -> tuple[float, int]:
        """Steps until the prompt is prefilled and the first token picked (a long prompt takes several
        steps of ``prefill_chunk`` positions)."""
        sid = engine.submit(request(False, 4))
        t0 = time.perf_counter()
        prefill = None
        while prefill is None:
            prefill = next((ev for _, ev in engine.step() if ev.kind == "prefill"), None)
        dt = time.perf_counter() - t0
        engine.cancel(sid)
        engine.step()
        return dt, prefill.cached_tokens

    times: dict[str, list] = {"kept": [], "reprefill": []}
    cached: dict[str, int] = {}
    for _ in range(repeats):  # alternating, so drift hits both alike
        for name, engine in (("kept", kept), ("reprefill", cold)):
            dt, cached[name] = first_step(engine)
            times[name].append(dt * 1e3)
    if cached["reprefill"] != 0 or cached["kept"] == 0:
        raise RuntimeError(f"turn 10 should hit the kept context and miss without it: {cached}")
    prompt = request(False, 4).prompt_LC.shape[0]
    out = {"prompt_positions": prompt, "cached_positions": cached["kept"], "kept_ms": statistics.median(times["kept"]),
           "reprefill_ms": statistics.median(times["reprefill"]), "repeats": repeats}
    out["speedup"] = out["reprefill_ms"] / out["kept_ms"]
    return out


# ------------------------------------------------------------------------------------- measuring
async def sessions(target, wav_bytes: bytes, n: int, concurrent: bool) -> dict:
    t0 = time.perf_counter()
    if concurrent:
        answers = await asyncio.gather(*(target.answer(wav_bytes) for _ in range(n)))
    else:
        answers = [await target.answer(wav_bytes) for _ in range(n)]
    wall = time.perf_counter() - t0
    ttfa = [a.ttfa_s * 1e3 for a in answers if a.ttfa_s is not None]
    audio = sum(a.audio_s for a in answers)
    submitted = [a.submitted_s * 1e3 for a in answers if a.submitted_s is not None]
    return {"sessions": n, "concurrent": concurrent, "ttfa_p50_ms": percentile(ttfa, 50),
            "ttfa_p99_ms": percentile(ttfa, 99), "submitted_p50_ms": percentile(submitted, 50),
            "submitted_p99_ms": percentile(submitted, 99),
            "rtf_mean": statistics.mean(a.total_s / a.audio_s for a in answers if a.audio_s) if audio else None,
            "audio_seconds": audio, "wall_s": wall, "throughput_audio_s_per_s": audio / wall}


async def measure(targets: dict, wav_bytes: bytes, n: int, repeats: int) -> dict:
    """Every side's figures. The 1-session rounds alternate between the sides (paired), so that the
    drift of a shared machine hits both alike; then each side's N concurrent and N sequential rounds
    (not for ``openai``: only its TTFA against ``serve`` is asked)."""
    for name, target in targets.items():
        # warm-up: first-use costs (allocations, connections) and, for Serve, the replicas that autoscaling
        # starts under concurrent load, so that the measured rounds see a settled deployment
        await target.answer(wav_bytes)
        if name != "openai":
            await sessions(target, wav_bytes, n, True)
    single: dict[str, list] = {name: [] for name in targets}
    for _ in range(repeats):
        for name, target in targets.items():
            single[name].append(await sessions(target, wav_bytes, 1, True))
    out = {}
    for name, target in targets.items():
        ttfa = sorted(r["ttfa_p50_ms"] for r in single[name])
        one = {**single[name][0], "ttfa_p50_ms": statistics.median(ttfa), "ttfa_p99_ms": ttfa[-1],
               "rtf_mean": statistics.median(r["rtf_mean"] for r in single[name]), "repeats": repeats}
        if name == "openai":
            out[name] = {"1_session": one}
            continue
        many = await sessions(target, wav_bytes, n, True)
        seq = await sessions(target, wav_bytes, n, False)
        out[name] = {"1_session": one, f"{n}_concurrent": many, f"{n}_sequential": seq,
                     "concurrency_gain": many["throughput_audio_s_per_s"] / seq["throughput_audio_s_per_s"]}
    def paired(a: str, b: str) -> float:
        return statistics.median(y["ttfa_p50_ms"] - x["ttfa_p50_ms"] for x, y in zip(single[a], single[b]))

    if "inprocess" in single and "serve" in single:
        out["serve_overhead_ttfa_ms_paired_median"] = paired("inprocess", "serve")
    if "openai" in single:
        out["openai_overhead_ttfa_ms_paired_median"] = paired("serve", "openai")
    return out


def build_model(args):
    from deepomni.config import load_preset
    from deepomni.model.model import DeepOmniModel

    dtype = getattr(torch, args.dtype) if args.dtype else None
    cfg = load_preset(args.preset)
    model = DeepOmniModel.random(cfg, device=args.device, dtype=dtype, seed=0).eval()
    return model, cfg


def default_codec(cfg) -> str:
    from serve_apps.loading import default_codec_spec  # the Serve app's default built-in codec

    return default_codec_spec(cfg)


def build_codec(spec: str, device: str):
    if spec == "snac-random":  # SNAC's architecture with random weights: a realistic decoder cost
        from deepomni.codec.snac import SnacCodec

        return SnacCodec.random(device=device)
    from deepomni.codec import load_codec

    return load_codec(spec)


def report(name: str, r: dict) -> None:
    if name == "openai":
        v = r["1_session"]
        print(f"  {name:9s} 1_session       ttfa p50 {v['ttfa_p50_ms']:8.1f} ms  p99 {v['ttfa_p99_ms']:8.1f} ms")
        return
    for k, v in r.items():
        if isinstance(v, dict) and "ttfa_p50_ms" in v:
            enc = "" if v.get("submitted_p50_ms") is None else (
                f"  (encoded+submitted p50 {v['submitted_p50_ms']:.0f} / p99 {v['submitted_p99_ms']:.0f} ms)")
            print(f"  {name:9s} {k:15s} ttfa p50 {v['ttfa_p50_ms']:8.1f} ms  p99 {v['ttfa_p99_ms']:8.1f} ms  "
                  f"rtf {v['rtf_mean']:.3f}  throughput {v['throughput_audio_s_per_s']:.2f} audio s/s{enc}")
    print(f"  {name:9s} concurrency gain ({[k for k in r if k.endswith('concurrent')][0]} vs sequential): "
          f"{r['concurrency_gain']:.2f}x")


def main() -> None:
    ap = parser("serve_latency", __doc__)
    ap.add_argument("--only", choices=("inprocess", "serve"), help="run one side only")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: the preset's float32)")
    ap.add_argument("--codec", default=None, help="codec spec, or snac-random; default: the app's built-in codec")
    ap.add_argument("--sessions", type=int, default=16)
    ap.add_argument("--answer-steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=15, help="single-session runs behind the 1-session figures")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    wav_bytes, wav = question_wav()
    out = {"preset": args.preset, "device": args.device, "dtype": args.dtype or "float32",
           "question_seconds": len(wav) / 16000, "answer_steps": args.answer_steps, "sessions": args.sessions,
           "machine": machine()}
    if args.device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name()

    import tempfile

    from deepomni.checkpoint import load_model, save_model

    t0 = time.perf_counter()
    model, cfg = build_model(args)
    ckpt = str(save_model(model, Path(tempfile.mkdtemp(prefix="deepomni-bench-")) / "model")) \
        if args.only != "inprocess" else None
    codec_spec = args.codec or default_codec(cfg)
    targets = {}
    if args.only != "serve":
        if ckpt:  # exactly the weights the Serve replicas load
            model = load_model(ckpt, device=args.device)[0].eval()
        codec = build_codec(codec_spec, args.device)
        print(f"[inprocess] model {args.preset} on {args.device} built in {time.perf_counter() - t0:.0f} s", flush=True)
        targets["inprocess"] = InProcess(model, codec, args.answer_steps, max_rows=32)  # as the app's Backbone
        question_ND = targets["inprocess"].encode_many([wav_bytes])[0]
        out["prefill_turn10"] = prefill_turn10(model, question_ND, 24, args.repeats)
        p = out["prefill_turn10"]
        print(f"[inprocess] turn 10 of a spoken conversation ({p['prompt_positions']} positions, "
              f"{p['cached_positions']} kept): first step {p['kept_ms']:.1f} ms with the context kept, "
              f"{p['reprefill_ms']:.1f} ms re-prefilling the history ({p['speedup']:.1f}x)", flush=True)
    del model
    with contextlib.ExitStack() as stack:
        if args.only != "inprocess":  # the Serve app (config.yaml's deployments), same checkpoint and codec
            url, out["ray_serve_env"] = stack.enter_context(serve_app({
                "checkpoint": ckpt, "codec": codec_spec, "max_steps": args.answer_steps,
                "torch_threads": args.threads or 1}))
            print(f"[serve] Ray Serve mode: {out['ray_serve_env'] or 'Ray defaults'}", flush=True)
            targets["serve"], targets["openai"] = ServeClient(url), OpenAIChatClient(url)
        out.update(asyncio.run(measure(targets, wav_bytes, args.sessions, args.repeats)))
    for name in targets:
        report(name, out[name])
    if "serve" in out and "inprocess" in out:
        out["serve_overhead_ttfa_ms"] = out["serve"]["1_session"]["ttfa_p50_ms"] - out["inprocess"]["1_session"]["ttfa_p50_ms"]
        print(f"Serve split adds {out['serve_overhead_ttfa_ms']:.1f} ms to TTFA p50 (1 session; median of the "
              f"paired differences {out['serve_overhead_ttfa_ms_paired_median']:.1f} ms)")
    if "openai" in out:
        out["openai_overhead_ttfa_ms"] = out["openai"]["1_session"]["ttfa_p50_ms"] - out["serve"]["1_session"]["ttfa_p50_ms"]
        print(f"OpenAI chat completions add {out['openai_overhead_ttfa_ms']:.1f} ms to TTFA p50 against /v1/dialogue "
              f"(median of the paired differences {out['openai_overhead_ttfa_ms_paired_median']:.1f} ms)")
    suffix = "" if (args.preset, args.device) == ("tiny", "cpu") else f"_{args.preset}_{args.device.split(':')[0]}"
    save_result(f"serve_latency{suffix}", out)
    side = out.get("serve") or out["inprocess"]
    print(f"ttfa_p50_ms={side['1_session']['ttfa_p50_ms']:.1f}")


if __name__ == "__main__":
    main()
