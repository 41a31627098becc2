"""Decoding speed: our continuous-batching engine against transformers' ``generate`` on the same weights.

    python -m benchmarks.decode                 # hidden 512, 6 layers, 16 experts top-4; batch 1 and 16
    python -m benchmarks.decode --device cuda --dtype bfloat16 --batches 1 16 64

Text-only greedy decoding of ``--new-tokens`` tokens after ``--prompt-len``-token prompts, batch 1 and 16:
``transformers.DeepseekV2ForCausalLM.generate`` (greedy, no early stop) on our model exported with
``deepomni.model.hf.export_hf``, against :class:`deepomni.serve.engine.BatchEngine` (sessions submitted
together, stepped until idle; each step also computes the codec channels' logits, as it does serving) on the
model itself, as it serves by default and, on a CPU, also with its weights prepacked for oneDNN
(``ours_prepacked``, :mod:`deepomni.model.prepack`). All run in this process on the same weights, alternating ``--repeats``
times; the figures are medians. Also the engine's median step time per batch size, and, from one more run of each under
``torch.profiler``, the time per generated token spent inside matmul kernels (``aten::mm``, ``bmm``,
``_grouped_mm``, fused attention, ...). Both read the same weights, so ours can at best run at the speed of
its matmuls alone. The profiler slows a run (its many small ops more than its matmuls), so the matmul time
is taken as the profiled run's matmul *share* of its wall times the unprofiled time per token: a lower
estimate of the matmul time, hence an upper one of ``ceiling_ratio`` = transformers' time per token / our
matmul time per token, the most that removing all per-step overhead could reach with these kernels (at
these sizes a step is bound by reading cold weights from memory, about 1 MB per matmul). Saves
``benchmarks/results/decode[_<device>].json``; the last line is the speed ratio (ours / transformers) and
its ceiling at each batch size.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import RESULTS, command, machine, parser, save_result

from deepomni.config import load_preset
from deepomni.model.generate import GenerationConfig
from deepomni.model.model import DeepOmniModel
from deepomni.model.prepack import Prepacked
from deepomni.model.prompt import user_turn
from deepomni.serve.engine import BatchEngine, Request

SIZES = dict(hidden_size=512, num_hidden_layers=6, n_routed_experts=16, num_experts_per_tok=4,
             moe_intermediate_size=256, intermediate_size=1024, num_attention_heads=8, kv_lora_rank=128,
             qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


PACKED = Prepacked()  # the packed CPU weights, made once for every run (a serving replica packs once too)


def ours(model: DeepOmniModel, prompts: list[torch.Tensor], new_tokens: int, device: torch.device,
         prepack: bool = False) -> dict:
    engine = BatchEngine(model, max_rows=max(2, len(prompts)), max_len=prompts[0].shape[0] + new_tokens + 2,
                         prepack=PACKED if prepack and device.type == "cpu" else False)
    gen = GenerationConfig(max_steps=new_tokens, speech=False)
    for p in prompts:
        engine.submit(Request(p, None, gen))
    tokens, steps = 0, []
    sync(device)
    t0 = time.perf_counter()
    while not engine.idle:
        ts = time.perf_counter()
        tokens += sum(ev.kind == "text" for _, ev in engine.step())
        sync(device)
        steps.append(time.perf_counter() - ts)
    wall = time.perf_counter() - t0
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "decode_step_ms": 1e3 * statistics.median(steps[1:] or steps)}


def theirs(hf, prompts_BL: torch.Tensor, new_tokens: int, device: torch.device) -> dict:
    sync(device)
    t0 = time.perf_counter()
    out = hf.generate(prompts_BL, attention_mask=torch.ones_like(prompts_BL), max_new_tokens=new_tokens,
                      min_new_tokens=new_tokens, do_sample=False, num_beams=1, pad_token_id=0)
    sync(device)
    wall = time.perf_counter() - t0
    tokens = (out.shape[1] - prompts_BL.shape[1]) * out.shape[0]
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


# the kernels that do the arithmetic; everything else in a step is overhead (dispatch, small ops, Python)
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm", "aten::mv",
              "mkldnn::_linear_pointwise", "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_flash_attention_forward",
              "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_cudnn_attention")


def matmul_ms_per_token(run, device: torch.device) -> dict:
    """Run ``run()`` (returns a result with ``tokens``) under the profiler: the self time of the matmul
    kernels per generated token (device time on CUDA, CPU time otherwise) and their share of the wall."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        res = run()
        wall = time.perf_counter() - t0
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    us = sum(getattr(e, attr) for e in prof.key_averages() if e.key in MATMUL_OPS)
    return {"matmul_ms_per_token": us / 1e3 / res["tokens"], "matmul_share_of_profiled_wall": us / 1e6 / wall}


def main(argv: list[str] | None = None) -> dict:
    ap = parser("decode", __doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/decode[_<device>].json)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import DeepseekV2ForCausalLM

    from deepomni.model.hf import export_hf

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cfg = load_preset("tiny").replace(**SIZES, max_position_embeddings=args.prompt_len + args.new_tokens + 8)
    model = DeepOmniModel(cfg, with_speech_input=False).init_weights(seed=0).to(device, dtype).eval()
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model, tmp)
        hf = DeepseekV2ForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()
    g = torch.Generator().manual_seed(0)
    results = {}
    for B in args.batches:
        ids_BL = torch.randint(0, cfg.text_vocab_size, (B, args.prompt_len - 6), generator=g)
        prompts = [user_turn(model.layout, row.tolist()) for row in ids_BL]
        # the same prompt length; text ids only (the export's vocabulary has no turn markers)
        hf_BL = torch.randint(0, cfg.text_vocab_size, (B, prompts[0].shape[0]), generator=g).to(device)
        runs = {"ours": [], "transformers": []} | ({"ours_prepacked": []} if device.type == "cpu" else {})
        with torch.inference_mode():
            ours(model, prompts, 4, device), theirs(hf, hf_BL, 4, device)  # warm-up
            for _ in range(args.repeats):
                runs["ours"].append(ours(model, prompts, args.new_tokens, device))
                runs["transformers"].append(theirs(hf, hf_BL, args.new_tokens, device))
                if "ours_prepacked" in runs:  # the engine on prepacked weights (deepomni.model.prepack)
                    runs["ours_prepacked"].append(ours(model, prompts, args.new_tokens, device, prepack=True))
            mm = {"ours": matmul_ms_per_token(lambda: ours(model, prompts, args.new_tokens, device), device),
                  "transformers": matmul_ms_per_token(lambda: theirs(hf, hf_BL, args.new_tokens, device), device)}
        med = {k: statistics.median(r["tokens_per_s"] for r in v) for k, v in runs.items()}
        for k in mm:  # the matmul share of the profiled run, applied to the unprofiled time per token
            mm[k]["matmul_ms_per_token_unprofiled"] = mm[k]["matmul_share_of_profiled_wall"] * 1e3 / med[k]
        ceiling = 1e3 / med["transformers"] / mm["ours"]["matmul_ms_per_token_unprofiled"]
        step_ms = {k: statistics.median(r["decode_step_ms"] for r in runs[k]) for k in runs if k != "transformers"}
        results[B] = {"tokens_per_s": med, "ratio": med["ours"] / med["transformers"],
                      "ours_decode_step_ms": step_ms["ours"], "decode_step_ms": step_ms,
                      "matmul": mm, "ceiling_ratio": ceiling, "runs": runs}
        if "ours_prepacked" in med:
            results[B]["ratio_prepacked"] = med["ours_prepacked"] / med["transformers"]
        packed = (f" [prepacked weights {med['ours_prepacked']:.1f} tokens/s, step "
                  f"{step_ms['ours_prepacked']:.1f} ms]" if "ours_prepacked" in med else "")
        print(f"batch {B:>3}: ours {med['ours']:8.1f} tokens/s (step {step_ms['ours']:.1f} ms){packed}, "
              f"transformers {med['transformers']:8.1f} tokens/s; per token in matmuls: ours "
              f"{mm['ours']['matmul_ms_per_token_unprofiled']:.2f} ms, transformers "
              f"{mm['transformers']['matmul_ms_per_token_unprofiled']:.2f} ms "
              f"(ceiling ratio {ceiling:.2f}x)", flush=True)
    import transformers

    out = {"command": command("decode", argv), "machine": machine(),
           "threads": torch.get_num_threads(), "dtype": args.dtype, "sizes": SIZES,
           "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "torch": torch.__version__,
           "transformers": transformers.__version__, "batches": results}
    save_result(Path(args.out) if args.out else RESULTS / f"decode{'' if device.type == 'cpu' else '_' + device.type}.json",
                out)
    print("ratio ours/transformers: " + ", ".join(
        f"batch {B} {r['ratio']:.2f}x (ceiling {r['ceiling_ratio']:.2f}x"
        + (f"; prepacked {r['ratio_prepacked']:.2f}x)" if "ratio_prepacked" in r else ")") for B, r in results.items()))
    return out


if __name__ == "__main__":
    main()
