"""Expert parallelism over 2 CPU processes (gloo) matches the single-process MoE, forward and backward.

Every process builds the same seeded MoE layer (``tiny`` preset), computes the single-process reference on
*every* rank's local batch, then shards the experts with ``apply_expert_parallel`` and runs its own local
batch. Rank r must reproduce: its output and balance loss, the gradient of its input, the router and shared
expert gradients of its local loss, and for its expert slice the gradient summed over all ranks' losses
(the experts see every rank's tokens). Failures raise in the child; ``mp.spawn`` re-raises them here.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deepomni.config import load_preset
from deepomni.model.moe import MoE
from deepomni.model.routing_stats import ExpertCounter
from deepomni.parallel.expert_parallel import AllToAllDispatcher, apply_expert_parallel

WORLD = 2
SEED = 1234
B_LOCAL, L = 2, 8  # sequences per rank, sequence length
TOL = dict(atol=1e-5, rtol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build(cfg) -> MoE:
    """The same layer in every process: MoE creates its weights with torch.empty, so init them here."""
    torch.manual_seed(SEED)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.02)
    return moe.train()


def _mask(experts: list[int], E: int) -> torch.Tensor:
    m = torch.zeros(E, dtype=torch.bool)
    m[experts] = True
    return m


def _run(moe: MoE, x_BLD: torch.Tensor, g_BLD: torch.Tensor, routing_mask_E, trainable_E):
    """Forward + backward of ``sum(out * g) + aux``; returns output, aux, input grad and parameter grads."""
    moe.set_expert_masks(routing_mask_E, trainable_E)
    x_BLD = x_BLD.clone().requires_grad_(True)
    out_BLD, aux = moe(x_BLD)
    ((out_BLD * g_BLD).sum() + aux).backward()
    grads = {n: p.grad.clone() for n, p in moe.named_parameters()}
    return out_BLD.detach(), aux.detach(), x_BLD.grad, grads


def _gather_experts(t_XAB: torch.Tensor) -> torch.Tensor:
    """All ranks' expert slices stacked back into the full [E, ...] tensor (rank order = expert order)."""
    parts = [torch.empty_like(t_XAB) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t_XAB.contiguous())
    return torch.cat(parts)


def _check_case(cfg, name: str, routing_masks: list, trainable_E, expect_empty_rank: int | None = None):
    rank, E = dist.get_rank(), cfg.n_routed_experts
    X = E // WORLD
    lo, hi = rank * X, (rank + 1) * X
    torch.manual_seed(SEED + 1)
    x_BLD = torch.randn(WORLD * B_LOCAL, L, cfg.hidden_size)
    g_BLD = torch.randn_like(x_BLD)
    local = [slice(s * B_LOCAL, (s + 1) * B_LOCAL) for s in range(WORLD)]

    # single-process reference on every rank's local batch (each with that rank's routing mask)
    refs = [_run(_build(cfg), x_BLD[local[s]], g_BLD[local[s]], routing_masks[s], trainable_E) for s in range(WORLD)]
    ref_out, ref_aux, ref_dx, ref_grads = refs[rank]
    expert_names = ("experts.gate_up_proj", "experts.down_proj")
    ref_expert_grads = {n: sum(r[3][n] for r in refs) for n in expert_names}  # experts see all ranks' tokens

    ep = _build(cfg)
    full_weights = {n: p.detach().clone() for n, p in ep.named_parameters() if n in expert_names}
    apply_expert_parallel(ep)
    assert isinstance(ep.token_dispatcher, AllToAllDispatcher)
    for n, p in ep.named_parameters():
        if n in expert_names:
            assert p.shape[0] == X, (name, n, p.shape)
            torch.testing.assert_close(p.detach(), full_weights[n][lo:hi], atol=0, rtol=0)
            torch.testing.assert_close(_gather_experts(p.detach()), full_weights[n], atol=0, rtol=0)

    counter = ExpertCounter(ep)
    with counter.count():
        out, aux, dx, grads = _run(ep, x_BLD[local[rank]], g_BLD[local[rank]], routing_masks[rank], trainable_E)
    if expect_empty_rank is not None:  # the case really sends nothing to that rank's experts
        routed_E = counter.take()["all"][0]  # this rank's tokens, per (global) expert
        e_lo = expect_empty_rank * X
        assert int(routed_E.sum()) == x_BLD[local[rank]].shape[0] * L * cfg.num_experts_per_tok, name
        assert not routed_E[e_lo : e_lo + X].any(), name
    counter.close()
    msg = f"{name} rank {rank}"
    torch.testing.assert_close(out, ref_out, **TOL, msg=lambda m: f"{msg} output: {m}")
    torch.testing.assert_close(aux, ref_aux, **TOL, msg=lambda m: f"{msg} aux: {m}")
    torch.testing.assert_close(dx, ref_dx, **TOL, msg=lambda m: f"{msg} input grad: {m}")
    for n, g in grads.items():
        if n in expert_names:
            torch.testing.assert_close(g, ref_expert_grads[n][lo:hi], **TOL, msg=lambda m: f"{msg} {n}: {m}")
            full = _gather_experts(g)
            torch.testing.assert_close(full, ref_expert_grads[n], **TOL, msg=lambda m: f"{msg} gathered {n}: {m}")
            if trainable_E is not None:  # frozen experts: exactly zero gradient
                assert not full[~trainable_E].any(), f"{msg} {n}: frozen experts got gradient"
        else:  # router and shared experts: replicated, gradient of the local loss only
            torch.testing.assert_close(g, ref_grads[n], **TOL, msg=lambda m: f"{msg} {n}: {m}")

    # inference (no autograd graph) goes through the same collectives
    ep.eval()
    ref = _build(cfg).eval()
    ref.set_expert_masks(routing_masks[rank], trainable_E)
    with torch.no_grad():
        torch.testing.assert_close(ep(x_BLD[local[rank]])[0], ref(x_BLD[local[rank]])[0], **TOL)


def _worker(rank: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    # a timeout turns a mismatched collective into an error instead of a hang
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        base = load_preset("tiny")
        E = base.n_routed_experts
        X = E // WORLD
        rank1_experts = _mask(list(range(X, E)), E)  # only rank 1's slice
        speech = _mask([0, 2, 3, 5, 9, 10, 12, 15], E)  # an arbitrary "speech experts" set on both ranks
        trainable = _mask([0, 3, 5, 10, 12, 15], E)  # routed-to experts 2 and 9 frozen
        for impl in ("grouped_mm", "loop"):
            cfg = base.replace(moe_impl=impl)
            _check_case(cfg, f"{impl}/plain", [None, None], None)
            # rank 0 sends all its tokens to rank 1 and gets back only rank 1's share
            _check_case(cfg, f"{impl}/rank0-to-rank1", [rank1_experts, None], None)
            # nobody routes to rank 0: it receives zero rows, its experts still get (zero) gradients
            _check_case(cfg, f"{impl}/rank0-empty", [rank1_experts, rank1_experts], None, expect_empty_rank=0)
            _check_case(cfg, f"{impl}/modality-masks", [speech, speech], trainable)

        bad = MoE(base.replace(n_routed_experts=15))
        try:
            apply_expert_parallel(bad)
        except ValueError as e:
            assert "divisible" in str(e)
        else:
            raise AssertionError("E=15 over 2 ranks must raise ValueError")
        assert bad.token_dispatcher is None and bad.experts.num_experts == 15
    finally:
        dist.destroy_process_group()


def test_expert_parallel_matches_single_process():
    mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD, join=True)


def test_expert_parallel_module_needs_no_ray_or_deepspeed():
    code = (
        "import sys, deepomni.parallel.expert_parallel; "
        "bad = [m for m in ('ray', 'deepspeed') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
