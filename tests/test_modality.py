"""Modality experts: artifact, selection rule, routing modes, frozen experts under AdamW."""

import pytest
import torch

from deepomni.model.model import DeepOmniModel
from deepomni.model.modality import (ExpertAssignment, assign_from_load, moe_layers, param_groups,
                                     set_routing_mode)


def _assignment(model, n_speech=6):
    layers = sorted(moe_layers(model))
    E = model.cfg.n_routed_experts
    return ExpertAssignment(E, {l: list(range(l % 3, l % 3 + n_speech)) for l in layers})


def test_artifact_roundtrip_and_errors(tmp_path, tiny_cfg):
    model = DeepOmniModel(tiny_cfg, with_speech_input=False)
    a = _assignment(model)
    a.save(tmp_path / "experts.json")
    b = ExpertAssignment.load(tmp_path / "experts.json")
    assert b == a
    assert sorted(b.text(1) + b.speech[1]) == list(range(tiny_cfg.n_routed_experts))
    (tmp_path / "bad.json").write_text('{"num_experts": 4, "layers": {"1": {"speech": [0, 9]}}}')
    with pytest.raises(ValueError, match="distinct ids"):
        ExpertAssignment.load(tmp_path / "bad.json")
    (tmp_path / "junk.json").write_text('{"x": 1}')
    with pytest.raises(ValueError, match="not an expert-assignment"):
        ExpertAssignment.load(tmp_path / "junk.json")
    with pytest.raises(ValueError, match="MoE layers"):
        set_routing_mode(model, "speech", ExpertAssignment(a.num_experts, {1: [0, 1, 2, 3]}))


def test_assign_from_load_takes_speech_heavy_experts():
    rho_a = torch.tensor([[0.5, 0.1, 0.3, 0.1], [0.1, 0.1, 0.1, 0.7]])
    rho_t = torch.tensor([[0.9, 0.0, 0.1, 0.0], [0.25, 0.25, 0.25, 0.25]])
    a = assign_from_load(rho_a, rho_t, n_speech=2, layer_ids=[1, 2])
    # layer 1 scores: .05, .1, .27, .1 -> expert 2 then a tie of 1/3 (topk takes either); layer 2: expert 3 first
    assert 2 in a.speech[1] and 0 not in a.speech[1]
    assert 3 in a.speech[2]
    assert all(len(v) == 2 for v in a.speech.values())


def test_difference_score_weighs_the_text_load():
    """Shares near 1/E (E = 16 here: the first 4 experts shown), as a load-balanced router measures them: the
    paper's rho_A * (1 - rho_T) ranks by speech load alone (expert 0: most speech, and most text too);
    rho_A - rho_T takes the expert whose speech load exceeds its text load most (expert 1)."""
    rho_a = torch.tensor([[0.09, 0.08, 0.05, 0.04]])
    rho_t = torch.tensor([[0.12, 0.03, 0.06, 0.06]])
    assert assign_from_load(rho_a, rho_t, 1, [1]).speech[1] == [0]
    assert assign_from_load(rho_a, rho_t, 1, [1], score="difference").speech[1] == [1]
    with pytest.raises(ValueError, match="unknown assignment score"):
        assign_from_load(rho_a, rho_t, 1, [1], score="ratio")


@pytest.mark.parametrize("mode", ["speech", "text"])
def test_routing_mode_masks_router_and_freezes_other_experts(tiny_cfg, mode):
    torch.manual_seed(0)
    model = DeepOmniModel(tiny_cfg, with_speech_input=False).init_weights(0).train()
    a = _assignment(model)
    set_routing_mode(model, mode, a)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(param_groups(model, weight_decay=0.1), lr=1e-2)
    C = model.layout.num_channels
    routing = {}  # layer -> the router's output of the last forward (forward hooks: the layer keeps none)
    for idx, moe in moe_layers(model).items():
        moe.gate.register_forward_hook(lambda _m, _i, r, idx=idx: routing.__setitem__(idx, r))
    for step in range(3):
        tok = torch.randint(0, 80, (2, 8, C))
        out = model(tok, labels_BLC=tok)
        for idx, moe in moe_layers(model).items():
            allowed = set(a.experts(idx, mode))
            assert set(routing[idx].experts_TK.unique().tolist()) <= allowed
            outside = [e for e in range(moe.num_experts) if e not in allowed]
            assert (routing[idx].scores_TE[:, outside] == 0).all()
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    after = model.state_dict()
    for idx, moe in moe_layers(model).items():
        allowed = a.experts(idx, mode)
        frozen = [e for e in range(moe.num_experts) if e not in allowed]
        for name in ("experts.gate_up_proj", "experts.down_proj", "gate.weight"):
            key = f"layers.{idx}.mlp.{name}"
            assert torch.equal(after[key][frozen], before[key][frozen]), key  # bit-identical
            assert not torch.equal(after[key][allowed], before[key][allowed]), key  # trained
        shared = f"layers.{idx}.mlp.shared_experts.gate_proj.weight"
        assert not torch.equal(after[shared], before[shared])  # shared experts train in every stage
    set_routing_mode(model, "all")
    assert all(m.routing_mask_E is None and m.trainable_E is None for m in moe_layers(model).values())


def test_mask_needs_at_least_top_k_experts(tiny_cfg):
    model = DeepOmniModel(tiny_cfg, with_speech_input=False)
    small = _assignment(model, n_speech=tiny_cfg.num_experts_per_tok - 1)
    with pytest.raises(ValueError, match="fewer than top-k"):
        set_routing_mode(model, "speech", small)
    with pytest.raises(ValueError, match="needs an expert assignment"):
        set_routing_mode(model, "text")
    with pytest.raises(ValueError, match="unknown routing mode"):
        set_routing_mode(model, "vision", small)


def test_gradient_mask_survives_meta_materialisation(tiny_cfg):
    """Models built on the meta device and materialised later (large checkpoints, FSDP) keep the mask."""
    with torch.device("meta"):
        model = DeepOmniModel(tiny_cfg, with_speech_input=False)
    model.to_empty(device="cpu")
    model.init_weights(0).train()
    a = _assignment(model)
    set_routing_mode(model, "text", a)
    tok = torch.randint(0, 80, (2, 8, model.layout.num_channels))
    model(tok, labels_BLC=tok).loss.backward()
    for idx, moe in moe_layers(model).items():
        frozen = a.speech[idx]
        assert (moe.experts.gate_up_proj.grad[frozen] == 0).all() and (moe.gate.weight.grad[frozen] == 0).all()
        assert moe.experts.down_proj.grad[a.text(idx)].abs().sum() > 0
