"""The GPU run's ``serving`` section: the preset's model (random weights, bf16; the tiny preset with 7 codec
channels) with SNAC's architecture as the vocoder (random weights; tiny: a narrow SNAC), in-process as
``benchmarks.serve_latency`` measures it (its ``InProcess`` and ``measure``: the code that serves, the Backbone
deployment's answer loop ``deepomni.serve.answer_loop.AnswerLoop`` and the Vocoder deployment's
``deepomni.serve.vocoder.CodecVocoder``; the spoken question is random log-mel features of ``mel_frames``
frames through the speech encoder, so neither espeak nor an audio library is needed): time to first audio
p50 / p99 for 1 and ``serve_sessions`` concurrent sessions, the concurrency gain; then the decode step time at
1, 16 and 64 rows (``BatchEngine.step`` with text-only sessions, one row each; with speech sessions, two rows
each; and the model's forward alone over a ``SlotKVCache``); and one MLA layer's time at the decode shape
(``attn_batch`` rows, one new query each over ``attn_cache`` positions), ``kv_b_proj`` absorbed (what decoding
uses) and expanded. Goal: first audio under 250 ms for one session.
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.gpu.common import Context, load_cfg, med, peak_memory, timed_ms

TTFA_GOAL_MS = 250.0


def random_speech_encoder(model, mel_frames: int) -> Callable[[list[bytes]], list[torch.Tensor]]:
    """The spoken questions of one batch as ``mel_frames`` frames of random log-mel features (seeded) through
    the model's speech encoder + projector: no audio to decode, so neither espeak nor an audio library."""
    enc, device, dtype = model.cfg.speech_encoder, model.embed.weight.device, model.embed.weight.dtype

    @torch.no_grad()
    def encode_many(wavs_bytes: list[bytes]) -> list[torch.Tensor]:
        n = len(wavs_bytes)
        mel = torch.randn(n, enc.num_mel_bins, mel_frames, generator=torch.Generator().manual_seed(0))
        return model.speech(mel.to(device, dtype), [mel_frames] * n)

    return encode_many


def random_speech_pipeline(model, codec, answer_steps: int, max_rows: int, mel_frames: int):
    """``benchmarks.serve_latency``'s in-process pipeline (its ``InProcess``: batched speech encoding -> the
    Backbone deployment's answer loop, :class:`deepomni.serve.answer_loop.AnswerLoop` -> the Vocoder
    deployment's batched codec decoding, in this process; TTFA per answer), each spoken question being
    :func:`random_speech_encoder`'s random log-mel features instead of a decoded WAV."""
    from benchmarks.serve_latency import InProcess

    return InProcess(model, codec, answer_steps, max_rows, encode_many=random_speech_encoder(model, mel_frames))


def _engine_ladder(ctx: Context, engine, prompt, audio_ND, counts: tuple[int, ...], speech: bool) -> dict:
    """``BatchEngine.step`` with ``counts[0]``, then ``counts[1]``, ... live sessions (each rung adds the
    missing ones, admitted by a first untimed step), the median of the timed steps at each; then all leave."""
    from deepomni.model.generate import GenerationConfig
    from deepomni.serve.engine import Request

    size = ctx.size
    gen = GenerationConfig(max_steps=engine.max_len, speech=speech, seed=0)
    sids: list[int] = []
    out = {}
    for n in counts:
        new = [engine.submit(Request(prompt, audio_ND, gen)) for _ in range(n - len(sids))]
        sids += new
        waiting = set(new)
        for _ in range(64):  # untimed: until every new session is prefilled (one step, or a few if chunked)
            waiting -= {sid for sid, ev in engine.step() if ev.kind == "prefill"}
            if not waiting:
                break
        rows: list[int] = []

        def step():
            engine.step()
            rows.append(engine.cache.n)

        times = timed_ms(step, ctx.device, size.step_iters, size.step_warmup)
        ms, timed_rows = med(times), rows[size.step_warmup:]
        mean_rows = statistics.mean(timed_rows)
        out[str(n)] = {"sessions": n, "rows_mean": mean_rows, "step_ms": ms, "min_ms": min(times),
                       "tokens_per_s": mean_rows / ms * 1e3}
    for sid in sids:
        engine.cancel(sid)
    engine.step()  # drops them
    return out


@torch.no_grad()
def _forward_steps(ctx: Context, model, prompt, audio_ND, rows: int) -> dict:
    """The model's forward alone over ``rows`` rows of a ``SlotKVCache`` (one position per row per call)."""
    from deepomni.model.attention import KVCache, SlotKVCache

    size, dev = ctx.size, ctx.device
    pre = KVCache(len(model.layers))
    model(prompt[None].to(dev), audio=[audio_ND], cache=pre)
    slot = SlotKVCache.for_model(model, rows=rows, max_len=pre.length + size.step_iters + size.step_warmup + 2)
    for _ in range(rows):
        slot.append(pre)
    tok = prompt[-1:].to(dev).expand(rows, 1, -1).contiguous()  # [rows, 1, C]
    times = timed_ms(lambda: model(tok, cache=slot), dev, size.step_iters, size.step_warmup)
    ms = med(times)
    return {"rows": rows, "forward_ms": ms, "min_ms": min(times), "tokens_per_s": rows / ms * 1e3}


@torch.no_grad()
def decode_attention_ms(ctx: Context, model) -> dict:
    """Layer 0's attention at the decode shape (``attn_batch`` rows, one new query each over a cache of
    ``attn_cache`` positions that grows by one per call), absorbed and expanded, in the model's dtype."""
    from deepomni.model.attention import KVCache

    dev, B, S = ctx.device, ctx.size.attn_batch, ctx.size.attn_cache
    attn, rot, dtype = model.layers[0].self_attn, model.rotary, model.embed.weight.dtype
    gen = torch.Generator().manual_seed(ctx.seed + 3)
    x_pre = torch.randn(B, S, model.cfg.hidden_size, generator=gen).to(dev, dtype)
    x1 = torch.randn(B, 1, model.cfg.hidden_size, generator=gen).to(dev, dtype)
    out: dict[str, Any] = {"rows": B, "cached_positions": S, "dtype": str(dtype).removeprefix("torch."),
                           "decode_uses_absorbed": bool(attn.absorb(1, S + 1))}
    for name, absorb in (("absorbed", True), ("expanded", False)):
        cache = KVCache(1)
        attn(x_pre, rot(torch.arange(S, device=dev).expand(B, S)), rot.softmax_scale, cache)

        def call() -> torch.Tensor:
            past = cache.length
            attn.absorb = lambda L_, S_: absorb  # force one form (instance attribute over the method)
            try:
                return attn(x1, rot(torch.arange(past, past + 1, device=dev).expand(B, 1)), rot.softmax_scale, cache)
            finally:
                del attn.absorb

        out[f"{name}_ms"] = med(timed_ms(call, dev, ctx.size.attn_iters, 2))
    return out


def section_serving(ctx: Context) -> dict:
    from benchmarks.serve_latency import measure
    from deepomni.codec.snac import SNAC_24KHZ, SnacCodec
    from deepomni.model.model import DeepOmniModel
    from deepomni.model.prompt import user_turn
    from deepomni.serve.engine import BatchEngine

    size, dev = ctx.size, ctx.device
    cfg = load_cfg(ctx.preset)
    if size.tiny_codec_channels:
        cfg = cfg.replace(num_codec_channels=7)  # SNAC's 7 codes per frame
    if size.encoder_positions:
        cfg = cfg.replace(speech_encoder=dataclasses.replace(cfg.speech_encoder,
                                                             max_source_positions=size.encoder_positions))
    t0 = time.perf_counter()
    model = DeepOmniModel.random(cfg, device=dev, dtype=torch.bfloat16, seed=ctx.seed).eval()
    codec = SnacCodec.random(config=None if size.snac is None else {**SNAC_24KHZ, **size.snac}, device=dev)
    res: dict[str, Any] = {"preset": ctx.preset, "dtype": "bfloat16", "codec": "snac architecture, random weights",
                           "snac_config": size.snac or "snac_24khz", "build_s": time.perf_counter() - t0,
                           "question_mel_frames": size.mel_frames, "answer_steps": size.answer_steps}
    ctx.log(f"  serving: model and codec built in {res['build_s']:.1f} s")
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats(dev)

    t0 = time.perf_counter()
    target = random_speech_pipeline(model, codec, size.answer_steps, 32, size.mel_frames)  # 32: the app's rows
    audio_ND = target.encode_many([b""])[0]
    res["encoder_ms"] = med(timed_ms(lambda: target.encode_many([b""]), dev, 3, 1))
    res["audio_positions"] = int(audio_ND.shape[0])
    n = size.serve_sessions
    m = asyncio.run(asyncio.wait_for(measure({"inprocess": target}, b"", n, size.serve_repeats),
                                     size.serve_timeout_s))["inprocess"]
    one, many, seq = m["1_session"], m[f"{n}_concurrent"], m[f"{n}_sequential"]
    res["ttfa"] = {
        "1_session": {"p50_ms": one["ttfa_p50_ms"], "p99_ms": one["ttfa_p99_ms"], "rounds": one["repeats"],
                      "rtf": one["rtf_mean"]},
        "concurrent": {"sessions": n, "p50_ms": many["ttfa_p50_ms"], "p99_ms": many["ttfa_p99_ms"],
                       "rtf": many["rtf_mean"], "throughput_audio_s_per_s": many["throughput_audio_s_per_s"]},
        "sequential": {"sessions": n, "p50_ms": seq["ttfa_p50_ms"], "p99_ms": seq["ttfa_p99_ms"],
                       "throughput_audio_s_per_s": seq["throughput_audio_s_per_s"]},
        "concurrency_gain": m["concurrency_gain"],
        "p99_of_concurrent_over_p50_of_one": many["ttfa_p99_ms"] / one["ttfa_p50_ms"],
    }
    res["goal_ttfa_1_session_under_250ms"] = bool(one["ttfa_p50_ms"] < TTFA_GOAL_MS)
    res["ttfa_wall_s"] = time.perf_counter() - t0
    ctx.log(f"  serving: TTFA 1 session p50 {one['ttfa_p50_ms']:.1f} ms; {n} concurrent p50 "
            f"{many['ttfa_p50_ms']:.1f} / p99 {many['ttfa_p99_ms']:.1f} ms")
    del target

    # the decode step at 1, 16, 64 rows
    t0 = time.perf_counter()
    prompt = user_turn(model.layout, audio_positions=audio_ND.shape[0])
    max_rows = max(size.step_rows)
    ladder_steps = len(size.step_rows) * (1 + size.step_iters + size.step_warmup)  # a session's steps (+ slack)
    engine = BatchEngine(model, max_rows=max_rows, max_len=prompt.shape[0] + ladder_steps + 32)
    rungs = tuple(size.step_rows)
    steps: dict[str, Any] = {
        # one row per text-only session; a speech session holds two (speech item + text item) while its text lives
        "text_rows": _engine_ladder(ctx, engine, prompt, audio_ND, rungs, speech=False),
        "speech_sessions": _engine_ladder(ctx, engine, prompt, audio_ND, tuple(max(1, r // 2) for r in rungs),
                                          speech=True),
        "forward_only": {str(r): _forward_steps(ctx, model, prompt, audio_ND, r) for r in rungs},
    }
    for r in rungs:
        ctx.log(f"  serving: {r} rows: engine step {steps['text_rows'][str(r)]['step_ms']:.1f} ms, "
                f"forward {steps['forward_only'][str(r)]['forward_ms']:.1f} ms")
    res["decode_step"] = steps
    res["decode_step_wall_s"] = time.perf_counter() - t0
    del engine
    res["decode_attention"] = decode_attention_ms(ctx, model)
    a = res["decode_attention"]
    ctx.log(f"  serving: decode attention ({a['rows']} rows x {a['cached_positions']} cached): absorbed "
            f"{a['absorbed_ms']:.2f} ms, expanded {a['expanded_ms']:.2f} ms")
    res.update(peak_memory(dev))
    del model, codec
    return res
