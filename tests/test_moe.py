"""The MoE layer (``deepomni.model.moe``): parity with transformers' DeepseekV2Moe, grouped matmul vs loop,
the router, the balance loss, and the modality masks (routing mask and gradient mask)."""

import pytest
import torch
from transformers import DeepseekV2Config
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

from deepomni.config import load_preset
import deepomni.model.expert_ffn as expert_ffn_module
from deepomni.model.expert_ffn import expert_ffn
from deepomni.model.moe import MoE, Routing, balance_loss, combine, dispatch, permute_tokens

D, E, F, K, SHARED = 32, 8, 16, 2, 2


def _cfg(**kw):
    base = dict(hidden_size=D, n_routed_experts=E, moe_intermediate_size=F, num_experts_per_tok=K,
                n_shared_experts=SHARED, norm_topk_prob=False, routed_scaling_factor=1.0)
    return load_preset("tiny").replace(**{**base, **kw})


def _init(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():  # MoE creates its weights with torch.empty
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return module


def _x(B=2, L=12, seed=1) -> torch.Tensor:
    return torch.randn(B, L, D, generator=torch.Generator().manual_seed(seed))


def _capture_routing(moe: MoE) -> list[Routing]:
    """The router's output of every later forward of ``moe`` (a forward hook: the layer keeps none)."""
    seen: list[Routing] = []
    moe.gate.register_forward_hook(lambda _mod, _inp, routing: seen.append(routing))
    return seen


def _fwd_bwd(model, x, grad):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = model(x)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(grad)
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


# --------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_matches_transformers_deepseek_v2_moe(scale):
    hf_cfg = DeepseekV2Config(hidden_size=D, n_routed_experts=E, moe_intermediate_size=F, num_experts_per_tok=K,
                              n_shared_experts=SHARED, topk_method="greedy", routed_scaling_factor=scale,
                              experts_implementation="eager")
    theirs = _init(DeepseekV2Moe(hf_cfg))
    ours = MoE(_cfg(routed_scaling_factor=scale))
    ours.load_state_dict(theirs.state_dict(), strict=True)  # same names and shapes as transformers
    x = _x()
    grad = torch.randn_like(x)
    out_o, gx_o, gw_o = _fwd_bwd(ours, x, grad)
    out_t, gx_t, gw_t = _fwd_bwd(theirs, x, grad)
    assert (out_o - out_t).abs().max() <= 1e-4
    assert (gx_o - gx_t).abs().max() <= 1e-4
    assert gw_o.keys() == gw_t.keys()
    for name in gw_t:
        assert (gw_o[name] - gw_t[name]).abs().max() <= 1e-4, name


@pytest.mark.parametrize("chunk_rows", [None, 5])  # None: one grouped matmul; 5: chunks of ~5 rows on CPU
@pytest.mark.parametrize("masked", [False, True])
def test_grouped_mm_equals_loop(masked, chunk_rows, monkeypatch):
    if chunk_rows is not None:
        monkeypatch.setattr(expert_ffn_module, "CPU_CHUNK_ROWS", chunk_rows)
    grouped = _init(MoE(_cfg(moe_impl="grouped_mm"))).train()
    loop = MoE(_cfg(moe_impl="loop")).train()
    loop.load_state_dict(grouped.state_dict())
    if masked:  # some experts get no tokens at all: empty blocks in both paths
        mask = torch.tensor([True, False, True, True, False, False, True, False])
        grouped.set_expert_masks(mask, None)
        loop.set_expert_masks(mask, None)
    x = _x()
    grad = torch.randn_like(x)
    out_g, gx_g, gw_g = _fwd_bwd(grouped, x, grad)
    out_l, gx_l, gw_l = _fwd_bwd(loop, x, grad)
    torch.testing.assert_close(out_g, out_l, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx_g, gx_l, atol=1e-5, rtol=1e-5)
    for name in gw_g:
        torch.testing.assert_close(gw_g[name], gw_l[name], atol=1e-5, rtol=1e-5, msg=name)
    if masked:
        assert (gw_g["experts.gate_up_proj"][~mask] == 0).all()


def test_combine_unweighted_equals_folded_weights():
    """The expert-parallel path (``combine`` weighting the outputs) equals the layer's fused path (weights
    folded into the expert activation), and ``permute_tokens`` is ``x_TD[token_N]`` with its gradient."""
    moe = _init(MoE(_cfg()))
    x_TD = _x().reshape(-1, D)
    routing = moe.gate(x_TD)
    d = dispatch(routing.experts_TK, E)
    w_N = routing.weights_TK.reshape(-1)[d.order_N]
    gu, dn = moe.experts.gate_up_proj, moe.experts.down_proj

    xa = x_TD.clone().requires_grad_()
    xb = x_TD.clone().requires_grad_()
    a = combine(expert_ffn(xa[d.token_N], d.counts_E, gu, dn, "grouped_mm"), d, routing.weights_TK)
    b = combine(expert_ffn(permute_tokens(xb, d), d.counts_E, gu, dn, "grouped_mm", w_N), d, routing.weights_TK,
                weighted=True)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    g = torch.randn_like(a)
    grads_a = torch.autograd.grad(a, (xa, moe.gate.weight, gu, dn), g, retain_graph=True)  # shared router graph
    grads_b = torch.autograd.grad(b, (xb, moe.gate.weight, gu, dn), g)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, atol=1e-6, rtol=1e-5)
    # every token appears k times, once per chosen expert, and the blocks are sorted by expert
    assert torch.equal(torch.bincount(d.token_N, minlength=x_TD.shape[0]), torch.full((x_TD.shape[0],), K))
    assert torch.equal(routing.experts_TK.reshape(-1)[d.order_N], torch.sort(routing.experts_TK.reshape(-1))[0])


# --------------------------------------------------------------------------------------- router
def test_router_softmax_greedy_topk():
    moe = _init(MoE(_cfg()))
    x_TD = _x().reshape(-1, D)
    r = moe.gate(x_TD)
    expected = torch.softmax(x_TD @ moe.gate.weight.T, dim=-1)
    torch.testing.assert_close(r.scores_TE, expected)
    torch.testing.assert_close(r.scores_TE.sum(-1), torch.ones(x_TD.shape[0]))
    top_w, top_e = torch.topk(expected, K, dim=-1)
    assert torch.equal(r.experts_TK.sort(-1).values, top_e.sort(-1).values)  # greedy: the k best, any order
    # no renormalisation, scale 1: the weights are the chosen experts' scores
    torch.testing.assert_close(r.weights_TK, r.scores_TE.gather(1, r.experts_TK))
    torch.testing.assert_close(r.weights_TK.sort(-1).values, top_w.sort(-1).values)


def test_router_scaling_and_renormalisation():
    x_TD = _x().reshape(-1, D)
    plain = _init(MoE(_cfg()))
    scaled = MoE(_cfg(routed_scaling_factor=2.5))
    normed = MoE(_cfg(norm_topk_prob=True, routed_scaling_factor=3.0))
    scaled.load_state_dict(plain.state_dict())
    normed.load_state_dict(plain.state_dict())
    rp, rs, rn = plain.gate(x_TD), scaled.gate(x_TD), normed.gate(x_TD)
    assert torch.equal(rp.experts_TK, rs.experts_TK) and torch.equal(rp.experts_TK, rn.experts_TK)
    torch.testing.assert_close(rs.weights_TK, 2.5 * rp.weights_TK)
    assert (rp.weights_TK.sum(-1) < 0.999).all()  # without renormalisation the k weights sum below 1
    torch.testing.assert_close(rn.weights_TK.sum(-1), torch.full((x_TD.shape[0],), 3.0))
    torch.testing.assert_close(rn.weights_TK, 3.0 * rp.weights_TK / rp.weights_TK.sum(-1, keepdim=True))


# ---------------------------------------------------------------------------------- balance loss
def _hand_balance_loss(experts, scores, batch, k, alpha, num_allowed):
    """alpha * mean_b sum_j f_j P_j, f_j = E'/(k*L) * count_j, P_j = mean_t score_j, with plain loops."""
    T, num_e = len(scores), len(scores[0])
    L = T // batch
    total = 0.0
    for b in range(batch):
        rows = range(b * L, (b + 1) * L)
        seq = 0.0
        for j in range(num_e):
            count = sum(experts[t].count(j) for t in rows)
            f = num_allowed / (k * L) * count
            P = sum(scores[t][j] for t in rows) / L
            seq += f * P
        total += seq
    return alpha * total / batch


def test_balance_loss_matches_hand_computation():
    experts = [[0, 1], [0, 2], [3, 0], [1, 2], [2, 3], [2, 1]]  # T = 6 (2 sequences of 3), k = 2, E = 4
    scores = [[0.4, 0.3, 0.2, 0.1], [0.5, 0.1, 0.3, 0.1], [0.3, 0.1, 0.2, 0.4],
              [0.1, 0.4, 0.4, 0.1], [0.1, 0.1, 0.5, 0.3], [0.2, 0.3, 0.4, 0.1]]
    routing = Routing(torch.zeros(6, 2), torch.tensor(experts), torch.tensor(scores))
    got = balance_loss(routing, batch=2, alpha=0.01, num_allowed=4)
    want = _hand_balance_loss(experts, scores, batch=2, k=2, alpha=0.01, num_allowed=4)
    assert got.item() == pytest.approx(want, rel=1e-6)
    # sequence 0 by hand: counts (3,1,1,1), f = 4/6 * counts, P = (0.4, 1/6, 7/30, 0.2)
    seq0 = 4 / 6 * (3 * 0.4 + 1 / 6 + 7 / 30 + 0.2)
    seq1 = 4 / 6 * (0 * 0.4 / 3 + 2 * 0.8 / 3 + 3 * 1.3 / 3 + 1 * 0.5 / 3)
    assert got.item() == pytest.approx(0.01 * (seq0 + seq1) / 2, rel=1e-6)


def test_layer_balance_loss_in_training_only():
    moe = _init(MoE(_cfg(aux_loss_alpha=0.05))).train()
    seen = _capture_routing(moe)
    x = _x()
    _, aux = moe(x)
    r = seen[-1]
    want = _hand_balance_loss(r.experts_TK.tolist(), r.scores_TE.tolist(), batch=2, k=K, alpha=0.05, num_allowed=E)
    assert aux.item() == pytest.approx(want, rel=1e-5)
    moe.eval()
    assert moe(x)[1].item() == 0.0


# ------------------------------------------------------------------------------------ modality masks
def test_routing_mask_never_selects_masked_experts():
    moe = _init(MoE(_cfg())).train()
    mask = torch.tensor([False, True, True, False, True, False, False, True])
    moe.set_expert_masks(mask, mask)
    seen = _capture_routing(moe)
    moe(_x())
    r = seen[-1]
    assert mask[r.experts_TK].all()
    assert (r.scores_TE[:, ~mask] == 0).all()
    torch.testing.assert_close(r.scores_TE.sum(-1), torch.ones(r.scores_TE.shape[0]))
    moe.set_expert_masks(None, None)
    moe(_x())
    assert (~mask[seen[-1].experts_TK]).any()  # unmasked, the same input does use the other experts


def test_set_expert_masks_validation():
    moe = MoE(_cfg())
    with pytest.raises(ValueError):
        moe.set_expert_masks(torch.ones(E), None)  # not bool
    with pytest.raises(ValueError):
        moe.set_expert_masks(None, torch.ones(E + 1, dtype=torch.bool))
    with pytest.raises(ValueError):
        moe.set_expert_masks(torch.tensor([True] + [False] * (E - 1)), None)  # fewer than top-k allowed


@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
def test_gradient_mask_zeroes_frozen_experts(impl):
    moe = _init(MoE(_cfg(moe_impl=impl))).train()
    trainable = torch.tensor([True, False, True, False, False, True, True, False])
    x = _x()
    grad = torch.randn_like(x)

    _, _, free = _fwd_bwd(moe, x, grad)  # no mask: every expert (routed to) gets gradient
    frozen = ~trainable
    names = ("experts.gate_up_proj", "experts.down_proj", "gate.weight")
    for name in names:
        assert (free[name][frozen].flatten(1).abs().sum(-1) > 0).all(), name

    moe.set_expert_masks(None, trainable)  # all experts routable, only some trainable
    _, _, masked = _fwd_bwd(moe, x, grad)
    for name in names:
        assert (masked[name][frozen] == 0).all(), name
        torch.testing.assert_close(masked[name][trainable], free[name][trainable])
