"""The GPU run's ``training`` section: a ``train_layers``-layer slice of the preset at full width and vocabulary in
bf16 with fp32 master weights and torch AdamW (no DeepSpeed): step time, tokens/s, peak memory; and the memory
plan of the whole model on 8 GPUs with ZeRO-2 and expert parallelism 8, from the meta-device model (formula in
the JSON).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from benchmarks.gpu.common import Context, gib, load_cfg, med, peak_memory, random_tokens, sync, timed_ms


def memory_plan(cfg, world: int = 8, ep: int = 8, gpu_gib: float | None = None) -> dict:
    """Per-GPU memory of the model states for training the whole model, from the meta-device model."""
    from deepomni.model.model import DeepOmniModel
    from deepomni.model.moe import MoE, RoutedExperts

    with torch.device("meta"):
        model = DeepOmniModel(cfg, with_speech_input=True)
    cats = {"routed_experts": 0, "speech_encoder_frozen": 0, "embedding_and_head": 0, "attention": 0,
            "dense_mlp": 0, "shared_experts": 0, "routers": 0, "norms": 0, "speech_projector": 0}
    moe_names = {n for n, m in model.named_modules() if isinstance(m, MoE)}
    expert_ids = {id(p) for m in model.modules() if isinstance(m, RoutedExperts) for p in m.parameters()}
    for name, p in model.named_parameters():
        n = p.numel()
        mod = name.rsplit(".", 2)[0]
        if id(p) in expert_ids:
            cats["routed_experts"] += n
        elif name.startswith("speech.encoder."):
            cats["speech_encoder_frozen"] += n
        elif name.startswith("speech."):
            cats["speech_projector"] += n
        elif name.startswith("embed."):
            cats["embedding_and_head"] += n
        elif ".self_attn." in name and "norm" not in name:
            cats["attention"] += n
        elif ".shared_experts." in name:
            cats["shared_experts"] += n
        elif name.endswith(".gate.weight") and mod in moe_names:
            cats["routers"] += n
        elif ".mlp." in name:
            cats["dense_mlp"] += n
        else:
            cats["norms"] += n
    experts, encoder = cats["routed_experts"], cats["speech_encoder_frozen"]
    replicated = sum(cats.values()) - experts - encoder
    dp, dp_exp = world, world // ep  # ZeRO's data-parallel group: all ranks; experts': ranks holding the same shard

    def plan(shard_rep: int, shard_exp: int) -> dict:
        local_exp = experts / ep
        w = 2 * (replicated + local_exp + encoder)
        g = 2 * (replicated / shard_rep + local_exp / shard_exp)
        o = 12 * (replicated / shard_rep + local_exp / shard_exp)
        out = {"bf16_weights_gib": gib(w), "bf16_grads_gib": gib(g), "fp32_master_and_adam_gib": gib(o),
               "total_states_gib": gib(w + g + o)}
        if gpu_gib:
            out["left_for_activations_and_buffers_gib"] = gpu_gib - out["total_states_gib"]
        return out

    return {
        "world": world, "expert_parallel": ep, "zero_stage": 2,
        "parameters": {**cats, "replicated_trainable": replicated, "total": sum(cats.values())},
        "formula": ("per GPU bytes = 2 (bf16 weights) x (R + X/EP + E_frozen) + (2 (bf16 grads) + 4 (fp32 master) + "
                    "4 + 4 (Adam m, v)) x (R/DP + (X/EP)/DP_x); R = replicated trainable parameters (everything "
                    "but the routed experts and the frozen speech encoder), X = routed experts (sharded EP ways), "
                    "E_frozen = speech encoder (bf16 weights only, no grads or optimizer state), DP = world = "
                    f"{dp} (ZeRO-2 shards grads and optimizer states of R over all ranks), DP_x = world / EP = "
                    f"{dp_exp} (ranks holding the same expert shard). Model states only: activations, "
                    "communication buckets (DeepSpeed default reduce/allgather buckets 5e8 elements) and the "
                    "allocator's fragmentation come on top."),
        "per_gpu": plan(dp, dp_exp),
        "per_gpu_without_zero": plan(1, 1),  # expert parallelism alone (deepomni.train.engine's EP engine today)
        "gpu_memory_gib": gpu_gib,
    }


def section_training(ctx: Context) -> dict:
    from deepomni.model.model import DeepOmniModel, count_parameters

    size, dev = ctx.size, ctx.device
    full = load_cfg(ctx.preset)
    cfg = full.replace(num_hidden_layers=size.train_layers,
                       first_k_dense_replace=min(full.first_k_dense_replace, size.train_layers - 1))
    gpu_gib = gib(torch.cuda.get_device_properties(dev).total_memory) if ctx.cuda else None
    res: dict[str, Any] = {"memory_plan": memory_plan(full, gpu_gib=gpu_gib)}

    model = DeepOmniModel.random(cfg, device=dev, dtype=torch.bfloat16, seed=ctx.seed,
                                 with_speech_input=False).train()
    params = [p for p in model.parameters() if p.requires_grad]
    master = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
    opt = torch.optim.AdamW(master, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, fused=ctx.cuda)
    B, L = size.train_batch, size.train_seq
    tok = random_tokens(cfg, model.layout, B, L, torch.Generator().manual_seed(ctx.seed + 4)).to(dev)
    losses: list[float] = []

    def step() -> None:
        out = model(tok, labels_BLC=tok)
        out.loss.backward()
        for p, m in zip(params, master):
            m.grad = p.grad.float()
            p.grad = None
        torch.nn.utils.clip_grad_norm_(master, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, m in zip(params, master):
                p.copy_(m)
        losses.append(float(out.loss.detach()))

    for _ in range(size.train_warmup):
        step()
    if ctx.cuda:
        sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    times = timed_ms(step, dev, size.train_steps, 0)
    ms = med(times)
    n_params = sum(p.numel() for p in params)
    counts = count_parameters(cfg)
    attn_flops = 3 * 2 * B * cfg.num_attention_heads * L * L * (cfg.qk_head_dim + cfg.v_head_dim) / 2 \
        * cfg.num_hidden_layers  # causal: half the score matrix; fwd + bwd = 3x fwd
    flops = 6 * counts["active"] * B * L + attn_flops
    states = 16 * n_params  # bf16 weights + bf16 grads + fp32 master + Adam m, v
    res.update({
        "slice": {"layers": cfg.num_hidden_layers, "moe_layers": cfg.num_moe_layers, "hidden": cfg.hidden_size,
                  "vocab_rows": model.embed.weight.shape[0], "parameters": n_params,
                  "active_parameters": counts["active"], "batch": B, "seq": L, "tokens": B * L},
        "precision": "bf16 weights and activations, fp32 master weights, torch AdamW (fused on CUDA), grad clip 1.0",
        "step_ms": ms, "min_ms": min(times), "steps": size.train_steps, "warmup": size.train_warmup,
        "tokens_per_s": B * L / ms * 1e3,
        "model_tflops_per_s": flops / (ms * 1e-3) / 1e12,
        "model_flops_formula": "6 x active parameters x tokens + causal attention scores and values (fwd + bwd)",
        "losses": losses, "loss_finite": all(math.isfinite(x) for x in losses),
        "model_states_gib": gib(states),
        **peak_memory(dev),
    })
    if ctx.cuda:
        res["peak_minus_states_gib"] = res["peak_memory_gib"] - res["model_states_gib"]
    res["passed"] = res["loss_finite"]
    del opt, master, params, model
    return res
