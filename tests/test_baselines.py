"""The paper's comparison as stages: MoExtend (experts added for speech, the originals frozen), LoRA (peft
adapters on attention and experts, merged into every checkpoint) and the preference stage (DPO on pairs), on
the 24-item corpus. The MoExtend stage itself runs in tests/test_recipe_pipeline.py (its checks there)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from safetensors.torch import load_file

from deepomni.checkpoint import load_model, save_model
from deepomni.config import load_preset
from deepomni.model.extend import copied_experts, extend_experts
from deepomni.model.lora import apply_lora
from deepomni.model.model import DeepOmniModel
from deepomni.model.modality import moe_layers
from deepomni.train.config import TrainConfig
from deepomni.train.stages import BASELINES, MODELS, get_stage, set_trainable

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def _fit(corpus, tmp_path, **kw):
    from deepomni.train.loop import fit

    cfg = TrainConfig.from_dict(dict(data=str(corpus), storage_path=str(tmp_path / "runs"), batch_size=2,
                                     cpus_per_worker=1.0, log_every=1, seed=0, **kw))
    result = fit(cfg, progress=False)
    assert result.error is None, result.error
    return result


@pytest.fixture
def init(tmp_path):
    model = DeepOmniModel(load_preset("tiny")).init_weights(seed=0)
    return save_model(model, tmp_path / "init")


# ------------------------------------------------------------------------------------ no Ray needed
def test_baselines_start_from_the_aligned_model_compute_matched():
    for name in ("moextend", "lora"):
        (step,) = BASELINES[name]
        assert step.init == "s1_align" and step.steps_of == ("s2_speech_experts", "s2_text_experts", "s3_joint")
        assert MODELS[name] == step.run
    pairs, dpo = BASELINES["dpo"]
    assert pairs.pairs and pairs.init == "s3_joint" and dpo.preference == pairs.run and dpo.init == "s3_joint"


def test_extend_experts_copies_and_adds_router_rows(tiny_model):
    E = tiny_model.cfg.n_routed_experts
    model, assignment = extend_experts(tiny_model, 4, seed=1)
    assert model.cfg.n_routed_experts == E + 4 and copied_experts(E, 4) == [3, 7, 11, 15]
    old, new = tiny_model.state_dict(), model.state_dict()
    for layer in moe_layers(model):
        assert assignment.speech[layer] == [16, 17, 18, 19]
        for w in ("gate_up_proj", "down_proj"):
            k = f"layers.{layer}.mlp.experts.{w}"
            assert torch.equal(new[k][:E], old[k]) and torch.equal(new[k][E:], old[k][[3, 7, 11, 15]])
        k = f"layers.{layer}.mlp.gate.weight"
        assert torch.equal(new[k][:E], old[k]) and new[k][E:].std() > 0
    assert all(torch.equal(new[k], v) for k, v in old.items() if ".mlp.experts." not in k and ".mlp.gate." not in k)
    with pytest.raises(ValueError, match="n_new"):
        copied_experts(E, E + 1)


def test_lora_merged_model_computes_what_the_adapted_one_does(tiny_cfg):
    model = DeepOmniModel(tiny_cfg).init_weights(seed=0)
    lora = apply_lora(model, rank=4, alpha=8, seed=0)
    set_trainable(model, get_stage("lora"))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n or n == "embed.weight" for n in trained)
    assert any(".mlp.experts." in n for n in trained) and any(".self_attn." in n for n in trained)
    assert not any(n.startswith("speech.") for n in trained)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.05)  # a trained adapter (B starts at zero)
    tokens = torch.randint(0, 40, (2, 10, model.layout.num_channels))
    merged = DeepOmniModel(tiny_cfg)
    merged.load_state_dict(lora.merged_state_dict())  # our own names: an ordinary checkpoint
    model.eval()
    with torch.no_grad():
        a, b = model(tokens, labels_BLC=tokens).loss, merged.eval()(tokens, labels_BLC=tokens).loss
    base = DeepOmniModel(tiny_cfg).init_weights(seed=0).eval()
    with torch.no_grad():
        c = base(tokens, labels_BLC=tokens).loss
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, c, atol=1e-3)


# ------------------------------------------------------------------------------------ Ray Train
def test_lora_stage_writes_a_merged_low_rank_update_and_resumes(corpus, tmp_path, init, ray_local):
    kw = dict(stage="lora", run_name="lora", init=str(init), lr=1e-2, lora_rank=2, lora_alpha=4,
              checkpoint_every=1)
    _fit(corpus, tmp_path, max_steps=2, **kw)
    final = tmp_path / "runs" / "lora" / "final"
    before, after = load_file(str(init / "model.safetensors")), load_file(str(final / "model.safetensors"))
    assert set(after) == set(before)  # merged: the checkpoint has the model's own tensors only
    k = "layers.1.self_attn.o_proj.weight"
    delta = after[k] - before[k]
    assert delta.abs().max() > 0 and torch.linalg.matrix_rank(delta, atol=1e-6) <= 2  # a rank-2 update
    k = "layers.1.mlp.experts.down_proj"
    assert not torch.equal(before[k], after[k])
    for k in before:
        if ".shared_experts." in k or "norm" in k or k.startswith("speech.") or ".mlp.gate." in k:
            assert torch.equal(before[k], after[k]), k
    r = _fit(corpus, tmp_path, max_steps=3, **kw)  # continues from step 2: adapters and base loaded back
    assert r.metrics["start_step"] == 2 and r.metrics["step"] == 3


def _reference_pairs(corpus, init, out):
    """Preference pairs without sampling: the reference spoken answer preferred to one with shifted codes,
    scored by ``init`` (the frozen reference), written as ``deepomni pairs`` writes them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from deepomni.model.generate import Generation
    from deepomni.text import load_tokenizer
    from deepomni.train import evaluate as ev
    from deepomni.train import preference as pf
    from deepomni.data.tokenized import read_rows

    model, _ = load_model(init)
    tok = load_tokenizer("bytes")
    pairs = []
    for row in pf.speech_out_rows(read_rows(corpus, "train"), 6):
        codes_KF = ev.reference_codes(row)
        text = tok.encode(row["answer_text"])
        good, bad = Generation(text, list(codes_KF.T)), Generation(text, list(((codes_KF + 5) % 64).T))
        pair = pf.pair_row(row, model.layout, tok, good, bad, chosen_wer=0.0, rejected_wer=1.0, chosen_heard="",
                           rejected_heard="")
        chosen, rejected = pf.split_pair(pair)
        pair["ref_chosen_logps"], pair["ref_rejected_logps"] = (pf.reference_logps(model, chosen),
                                                                pf.reference_logps(model, rejected))
        pairs.append(pair)
    out.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(pairs, schema=pf.pairs_schema()), out / "pairs.parquet")
    return pairs


def test_dpo_stage_prefers_the_chosen_answers(corpus, tmp_path, init, ray_local):
    from deepomni.train import preference as pf

    pairs = _reference_pairs(corpus, init, tmp_path / "pairs")
    r = _fit(corpus, tmp_path, stage="dpo", run_name="dpo", init=str(init), pairs=str(tmp_path / "pairs"),
             max_steps=4, lr=1e-2)
    m = r.metrics
    assert m["step"] == 4 and math.isfinite(m["loss"]) and math.isfinite(m["channel_losses"][0])
    assert m["reward_accuracy"] > 0.5 and m["reward_margin"] > 0  # the last step's batch
    final = tmp_path / "runs" / "dpo" / "final"
    model, _ = load_model(final)
    gained = []
    for p in pairs:  # the implicit reward margin of every pair, after training (0 before: policy == reference)
        chosen, rejected = pf.split_pair(p)
        c, rj = pf.reference_logps(model, chosen), pf.reference_logps(model, rejected)
        gained.append(sum(c) - sum(p["ref_chosen_logps"]) - (sum(rj) - sum(p["ref_rejected_logps"])))
    assert sum(g > 0 for g in gained) >= len(gained) - 1, gained
    before, after = load_file(str(init / "model.safetensors")), load_file(str(final / "model.safetensors"))
    for k in before:  # as S3: routed experts, router and codec rows train, nothing else
        if ".mlp.experts." not in k and ".mlp.gate." not in k and k != "embed.weight":
            assert torch.equal(before[k], after[k]), k
    with pytest.raises(ValueError, match="pairs"):
        TrainConfig.from_dict(dict(stage="dpo"))
