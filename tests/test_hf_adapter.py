"""HF DeepSeek-V2 <-> DeepOmni adapter: import (both expert layouts, shards, legacy config), logit parity with
transformers' DeepseekV2ForCausalLM, export that transformers loads, strict errors on a checkpoint's tensors.
The config mapping alone: tests/test_hf_config.py.

Every checkpoint is a tiny random DeepseekV2ForCausalLM built and saved locally (no hub access). Weights
are re-drawn at non-trivial scales (norm gains around 1, decisive router) so parity checks have teeth.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

from deepomni.config import ModelConfig, load_preset
from deepomni.model.channels import ChannelEmbedding, CodecSpecial, TextSpecial, VocabLayout
from deepomni.model.hf import export_hf, import_hf
from deepomni.model.model import DeepOmniModel

VOCAB = 512
TOL = 1e-4
YARN = {  # DeepSeek-V2-Lite's YaRN, original context scaled down from 4096 to 64
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 40.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}
VARIANTS = {
    "plain-untied": dict(q_lora_rank=None, tie_word_embeddings=False),
    "qlora-tied-yarn": dict(q_lora_rank=24, tie_word_embeddings=True, rope_parameters=YARN),
    "yarn-mscale-1": dict(rope_parameters={**YARN, "mscale": 1.0, "mscale_all_dim": 1.0}),
    # mscale != mscale_all_dim: YaRN's attention factor != 1, so cos/sin are scaled too
    "yarn-attention-factor": dict(rope_parameters={**YARN, "mscale": 1.0}),
}


def hf_config(**kw) -> DeepseekV2Config:
    args = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=2, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, max_position_embeddings=2560, tie_word_embeddings=False,
    )
    args.update(kw)
    cfg = DeepseekV2Config(**args)
    cfg._attn_implementation = "eager"  # the reference: eager attention, independent of our SDPA path
    return cfg


@torch.no_grad()
def random_hf_model(seed: int = 0, **kw) -> DeepseekV2ForCausalLM:
    torch.manual_seed(seed)
    model = DeepseekV2ForCausalLM(hf_config(**kw)).eval()
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1 + 0.2 * torch.randn_like(p))
        elif "embed_tokens" in name or "lm_head" in name:
            p.normal_(0, 0.5)
        elif name.endswith("mlp.gate.weight"):
            p.normal_(0, 0.5)  # decisive routing: no near-ties for float noise to flip
        else:
            p.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """One saved checkpoint (hub layout: per-expert keys) per variant: name -> (hf model, dir)."""
    out = {}
    for name, kw in VARIANTS.items():
        model = random_hf_model(**kw)
        d = tmp_path_factory.mktemp(name)
        model.save_pretrained(d)
        out[name] = (model, d)
    return out


def ids_BL(seed: int = 1, B: int = 2, L: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, L), generator=torch.Generator().manual_seed(seed))


def text_tokens(model: DeepOmniModel, ids: torch.Tensor) -> torch.Tensor:
    """Text-only ``tokens_BLC``: the ids on the text channel, PAD on every codec channel."""
    C = model.layout.num_channels
    tokens = torch.full((*ids.shape, C), model.layout.codec(CodecSpecial.PAD), dtype=torch.long)
    tokens[..., 0] = ids
    return tokens


@torch.no_grad()
def hf_logits(model, ids=None, inputs_embeds=None) -> torch.Tensor:
    return model(input_ids=ids, inputs_embeds=inputs_embeds).logits


@torch.no_grad()
def our_text_logits(model: DeepOmniModel, tokens: torch.Tensor) -> torch.Tensor:
    return model(tokens, channels=[0]).logits[0][..., :VOCAB]


@torch.no_grad()
def our_text_logits_from_text_embeddings(model: DeepOmniModel, ids: torch.Tensor) -> torch.Tensor:
    """Our forward with the input embedding replaced by the text rows alone (no channel mean): the backbone
    exactly as a text-only model sees it, whatever K."""
    return model(None, inputs_embeds_BLD=model.embed.weight[ids], channels=[0]).logits[0][..., :VOCAB]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_import_matches_transformers_logits(ckpts, variant):
    hf, d = ckpts[variant]
    model = import_hf(d, base=ModelConfig(num_codec_channels=0)).eval()  # one channel: embedding = text row
    assert model.cfg.q_lora_rank == hf.config.q_lora_rank
    assert model.cfg.tie_word_embeddings == hf.config.tie_word_embeddings
    ids = ids_BL()
    ref = hf_logits(hf, ids)
    assert ref.std() > 0.5  # non-trivial logits
    assert max_diff(our_text_logits(model, ids[..., None]), ref) < TOL


def test_yarn_settings_are_imported_and_matter(ckpts):
    hf, d = ckpts["yarn-mscale-1"]
    base = ModelConfig(num_codec_channels=0)
    model = import_hf(d, base=base).eval()
    expect = {k: v for k, v in YARN.items() if k not in ("rope_type", "rope_theta")}
    assert model.cfg.rope_scaling == {"type": "yarn", **expect, "mscale": 1.0, "mscale_all_dim": 1.0}
    ids = ids_BL()
    ref = hf_logits(hf, ids)
    assert max_diff(our_text_logits(model, ids[..., None]), ref) < TOL
    # the same weights with other rope settings miss the reference: the parity tests do check the rope
    for wrong in (None, {"type": "yarn", **expect}):  # plain RoPE; mscale 0.707 instead of 1.0
        other = import_hf(d, base=base, rope_scaling=wrong).eval()
        assert max_diff(our_text_logits(other, ids[..., None]), ref) > 1e-2
    # the variants exercise both YaRN corrections: softmax scale (mscale_all_dim) and cos/sin scale
    assert model.rotary.softmax_scale > 1.5 * model.cfg.qk_head_dim**-0.5
    assert import_hf(ckpts["yarn-attention-factor"][1], base=base).rotary.cos_sin_scale > 1.05


@pytest.mark.parametrize("variant", ["plain-untied", "qlora-tied-yarn"])
@pytest.mark.parametrize("k", [3, 7])
def test_parity_with_codec_channels(ckpts, variant, k):
    """An imported text LLM is itself at step 0 whatever K: a text-only position (codec channels PAD, which
    contribute nothing) gives transformers' own logits from the same ids."""
    hf, d = ckpts[variant]
    model = import_hf(d, base=ModelConfig(num_codec_channels=k, codebook_size=32)).eval()
    ids = ids_BL()
    ref = hf_logits(hf, ids)
    tokens = text_tokens(model, ids)
    with torch.no_grad():
        out = model(tokens)
        emb = model.embed_inputs(tokens)
    assert torch.equal(emb, model.embed.weight[ids])  # the text row alone
    assert max_diff(out.logits[0][..., :VOCAB], ref) < TOL
    assert [lg.shape[-1] for lg in out.logits] == [VOCAB + 64] + [32 + 64] * k


def test_channels_that_speak_are_averaged():
    """Codec channels holding a code count in the mean, PAD ones do not; an all-PAD position is the text
    PAD row; at speech positions the feature fills the K codec slots."""
    layout = VocabLayout(text_vocab_size=10, codebook_size=5, num_codec_channels=2, num_special=4)
    emb = ChannelEmbedding(layout, hidden_size=3)
    torch.nn.init.normal_(emb.weight)
    W, off = emb.weight.detach(), layout.offsets()
    tp, cp = layout.text(TextSpecial.PAD), layout.codec(CodecSpecial.PAD)
    tokens = torch.tensor([[[4, cp, cp], [4, 2, cp], [tp, 1, 3], [tp, cp, cp]]])
    with torch.no_grad():
        x = emb(tokens)[0]
    torch.testing.assert_close(x[0], W[4])
    torch.testing.assert_close(x[1], (W[4] + W[off[1] + 2]) / 2)
    torch.testing.assert_close(x[2], (W[off[1] + 1] + W[off[2] + 3]) / 2)  # text PAD says nothing either
    torch.testing.assert_close(x[3], W[tp])
    audio_tok = torch.tensor([[[layout.text(TextSpecial.AUDIO), cp, cp]]])
    feat = torch.randn(1, 1, 3)
    with torch.no_grad():
        y = emb(audio_tok, feat, torch.tensor([[True]]))[0, 0]
    torch.testing.assert_close(y, (W[layout.text(TextSpecial.AUDIO)] + 2 * feat[0, 0]) / 3)


# --------------------------------------------------------------------------------- layouts, shards
def test_stacked_and_per_expert_layouts_import_the_same(ckpts, tmp_path):
    hf, per_expert = ckpts["plain-untied"]
    hf.save_pretrained(tmp_path, save_original_format=False)  # transformers' in-memory (stacked) layout
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.1.mlp.experts.gate_up_proj" in keys
    assert not any(".experts.0." in k for k in keys)
    with safe_open(str(per_expert / "model.safetensors"), "pt") as f:
        assert "model.layers.1.mlp.experts.0.gate_proj.weight" in set(f.keys())
    a, b = import_hf(per_expert), import_hf(tmp_path)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    torch.testing.assert_close(
        a.layers[1].mlp.experts.gate_up_proj, hf.model.layers[1].mlp.experts.gate_up_proj, rtol=0, atol=0
    )


def test_sharded_checkpoint(ckpts, tmp_path):
    hf, single = ckpts["qlora-tied-yarn"]
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    a, b = import_hf(single), import_hf(tmp_path)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_legacy_deepseek_config_json(ckpts, tmp_path):
    """DeepSeek-V2-Lite's own config.json style: rope_theta + rope_scaling {"type": "yarn"} and the remote-code
    fields (n_group=1 / topk_group=1 with greedy routing, scoring_func, aux_loss_alpha, ...)."""
    hf, d = ckpts["qlora-tied-yarn"]
    shutil.copy(d / "model.safetensors", tmp_path)
    c = json.loads((d / "config.json").read_text())
    rope = c.pop("rope_parameters")
    c["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    c.update(rope_scaling=rope, n_group=1, topk_group=1, scoring_func="softmax", moe_layer_freq=1,
             aux_loss_alpha=0.01, seq_aux=True, ep_size=1, pretraining_tp=1, torch_dtype="float32")
    (tmp_path / "config.json").write_text(json.dumps(c))
    model = import_hf(tmp_path, base=ModelConfig(num_codec_channels=0)).eval()
    assert model.cfg.rope_scaling["type"] == "yarn" and model.cfg.rope_scaling["mscale_all_dim"] == 0.707
    assert model.cfg.aux_loss_alpha == 0.01
    legacy_hf = DeepseekV2ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = ids_BL()
    assert max_diff(our_text_logits(model, ids[..., None]), hf_logits(legacy_hf, ids)) < TOL
    assert max_diff(hf_logits(legacy_hf, ids), hf_logits(hf, ids)) < TOL


# ------------------------------------------------------------------------------------------ export
@pytest.mark.parametrize("variant", ["plain-untied", "qlora-tied-yarn"])
def test_export_loads_in_transformers_and_round_trips(ckpts, variant, tmp_path):
    hf, d = ckpts[variant]
    model = import_hf(d, base=ModelConfig(num_codec_channels=3, codebook_size=32)).eval()
    out = export_hf(model, tmp_path / "export")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").shape == (VOCAB, 64)  # specials / codec rows dropped
    assert "model.layers.2.mlp.experts.7.down_proj.weight" in keys  # hub layout
    assert ("lm_head.weight" in keys) == (not model.cfg.tie_word_embeddings)
    exported, info = DeepseekV2ForCausalLM.from_pretrained(
        out, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert exported.config.tie_word_embeddings == model.cfg.tie_word_embeddings
    ids = ids_BL(seed=2)
    ours = our_text_logits_from_text_embeddings(model, ids)
    assert max_diff(hf_logits(exported.eval(), ids), ours) < TOL

    again = import_hf(out, base=model.cfg)
    assert again.cfg == model.cfg
    V = VOCAB
    for (name, a), (name2, b) in zip(model.named_parameters(), again.named_parameters()):
        assert name == name2
        if name in ("embed.weight", "embed.head_weight"):
            assert torch.equal(a[:V], b[:V]), name  # text rows exact; the rest is re-initialised
        else:
            assert torch.equal(a, b), name

    # the stacked layout loads as well
    stacked = export_hf(model, tmp_path / "stacked", expert_layout="stacked")
    exported2 = DeepseekV2ForCausalLM.from_pretrained(stacked, attn_implementation="eager").eval()
    assert max_diff(hf_logits(exported2, ids), ours) < TOL


def test_export_sharded_bf16_keeps_router_fp32(tmp_path):
    cfg = load_preset("tiny").replace(tie_word_embeddings=False)
    model = DeepOmniModel(cfg, with_speech_input=False).init_weights(seed=0)
    out = export_hf(model, tmp_path, dtype=torch.bfloat16, max_shard_bytes=2**18, bos_token_id=7)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted({*index["weight_map"].values()})
    assert len(files) > 1 and files == sorted(p.name for p in out.glob("*.safetensors"))
    tensors = {k: v for f in files for k, v in load_file(str(out / f)).items()}
    assert tensors["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    assert tensors["model.layers.1.self_attn.kv_b_proj.weight"].dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["bos_token_id"] == 7
    back = import_hf(out, base=cfg)
    expect = model.layers[2].mlp.experts.down_proj.bfloat16().float()
    assert torch.equal(back.layers[2].mlp.experts.down_proj, expect)


# ------------------------------------------------------------------------------------------ errors
def _rewrite(src, dst, edit) -> None:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor_is_named(ckpts, tmp_path):
    _, d = ckpts["plain-untied"]
    _rewrite(d, tmp_path / "c", lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(ValueError, match=r"not in the checkpoint[\s\S]*layers\.2\.mlp\.experts\.5\.up_proj"):
        import_hf(tmp_path / "c")
    _rewrite(d, tmp_path / "h", lambda t: t.pop("lm_head.weight"))  # untied model without its head
    with pytest.raises(ValueError, match="lm_head.weight"):
        import_hf(tmp_path / "h")


def test_unexpected_and_duplicate_tensors_are_named(ckpts, tmp_path):
    _, d = ckpts["plain-untied"]

    def extra(t):
        t["model.layers.3.mlp.gate.weight"] = torch.zeros(8, 64)  # a 4th layer the config does not have

    _rewrite(d, tmp_path / "x", extra)
    with pytest.raises(ValueError, match=r"no place in the model[\s\S]*model\.layers\.3\.mlp\.gate\.weight"):
        import_hf(tmp_path / "x")

    def both_layouts(t):
        t["model.layers.1.mlp.experts.down_proj"] = torch.stack(
            [t[f"model.layers.1.mlp.experts.{j}.down_proj.weight"] for j in range(8)]
        )

    _rewrite(d, tmp_path / "dup", both_layouts)
    with pytest.raises(ValueError, match="already filled"):
        import_hf(tmp_path / "dup")


def test_shape_mismatch_is_named(ckpts, tmp_path):
    _, d = ckpts["plain-untied"]
    shutil.copytree(d, tmp_path / "c")
    c = json.loads((tmp_path / "c" / "config.json").read_text())
    c["vocab_size"] = VOCAB + 8
    (tmp_path / "c" / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError, match=r"embed_tokens\.weight: checkpoint \(512, 64\), model \(520, 64\)"):
        import_hf(tmp_path / "c")


# -------------------------------------------------------------------------------- what import builds
def test_new_rows_and_speech(ckpts):
    hf, d = ckpts["plain-untied"]
    base = ModelConfig(num_codec_channels=2, codebook_size=32)
    model = import_hf(d, base=base, with_speech_input=True)
    assert model.speech is not None
    pairs = ((model.embed.weight, hf.model.embed_tokens.weight), (model.embed.head_weight, hf.lm_head.weight))
    for table, src in pairs:
        assert torch.equal(table[:VOCAB], src)
        new = table[VOCAB:]
        assert new.shape[0] == 64 + 2 * (32 + 64) and torch.isfinite(new).all()
        assert torch.cdist(new, new).add(torch.eye(len(new)) * 1e9).min() > 0  # all rows distinct
        # near the mean text row, spread ~10% of the text rows' per-dimension spread
        torch.testing.assert_close(new.mean(0), src.mean(0), atol=0.05, rtol=0)
        assert 0.05 < (new.std(0) / src.std(0)).mean() < 0.2
    again = import_hf(d, base=base)
    assert torch.equal(again.embed.weight, model.embed.weight)  # seeded
    normal = import_hf(d, base=base, new_row_init="normal")
    assert abs(normal.embed.weight[VOCAB:].std().item() - base.initializer_range) < 0.005


def test_dtype_and_moe_gradient_masks(ckpts):
    _, yarn = ckpts["qlora-tied-yarn"]
    model = import_hf(yarn, dtype=torch.bfloat16)
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if name.endswith("mlp.gate.weight") else torch.bfloat16), name
    assert torch.get_default_dtype() == torch.float32  # restored after construction
    fp32 = import_hf(yarn)
    assert model.rotary.inv_freq.dtype == torch.float32
    assert torch.equal(model.rotary.inv_freq, fp32.rotary.inv_freq)
    assert model.rotary.softmax_scale == fp32.rotary.softmax_scale
    kv_b = fp32.layers[0].self_attn.kv_b_proj.weight
    assert torch.equal(model.layers[0].self_attn.kv_b_proj.weight, kv_b.bfloat16())

    _, d = ckpts["plain-untied"]

    # the MoE's gradient-mask hooks (registered on its parameters at construction) still work after import
    model = import_hf(d).train()
    moe = model.layers[1].mlp
    if not hasattr(moe, "set_expert_masks"):
        pytest.skip("MoE has no set_expert_masks")
    trainable = torch.tensor([True, False] * 4)
    moe.set_expert_masks(None, trainable)
    model(text_tokens(model, ids_BL())).logits[0].square().mean().backward()
    for g in (moe.experts.gate_up_proj.grad, moe.experts.down_proj.grad):
        assert g[~trainable].abs().max() == 0 and g[trainable].abs().max() > 0
