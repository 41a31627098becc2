"""Model math: channels, delay pattern, loss, speech input, presets, incremental decoding."""

import json

import pytest
import torch

from deepomni.config import ModelConfig, list_presets, load_preset
from deepomni.model.attention import KVCache
from deepomni.model.channels import IGNORE, CodecSpecial, TextSpecial, VocabLayout, channel_loss, delay_codes
from deepomni.model.generate import GenerationConfig, generate, stream
from deepomni.model.model import DeepOmniModel, count_parameters
from deepomni.model.prompt import user_turn
from deepomni.model.speech import num_audio_positions
from tests.helpers.codes import undo_delay


# ----------------------------------------------------------------------------------------- config
def test_presets_roundtrip_and_validation(tmp_path):
    assert {"tiny", "deepseek-v2-lite"} <= set(list_presets())
    cfg = load_preset("tiny")
    p = tmp_path / "c.json"
    p.write_text(json.dumps(cfg.to_dict()))
    assert load_preset(str(p)) == cfg
    with pytest.raises(ValueError, match="unknown model preset"):
        load_preset("nope")
    with pytest.raises(ValueError, match="ModelConfig: hidden: unknown field"):
        ModelConfig.from_dict({"hidden": 3})
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        cfg.replace(num_experts_per_tok=cfg.n_routed_experts + 1)


def test_deepseek_v2_lite_parameter_counts():
    n = count_parameters(load_preset("deepseek-v2-lite"))
    # DeepSeek-V2-Lite as released: 15.7B total, 2.4B active
    assert abs(n["backbone_total"] / 1e9 - 15.7) < 0.05
    assert 2.4 <= n["backbone_active"] / 1e9 < 2.5
    # ours adds the codec blocks to the (tied) table
    assert n["total"] > n["backbone_total"] - 0.25e9


# --------------------------------------------------------------------------------------- channels
def test_vocab_layout():
    lay = VocabLayout(text_vocab_size=100, codebook_size=10, num_codec_channels=3, num_special=64)
    assert lay.channel_size(0) == 164 and lay.channel_size(2) == 74
    assert [lay.channel_offset(c) for c in range(4)] == [0, 164, 238, 312]
    assert lay.total_size == 386
    assert lay.text(TextSpecial.EOT) == 104 and lay.codec(CodecSpecial.EOS) == 11


def test_embedding_is_mean_of_channels_and_audio_replaces_codecs(tiny_model):
    lay, emb = tiny_model.layout, tiny_model.embed
    tok = torch.tensor([[[5] + [3] * lay.num_codec_channels, [lay.text(TextSpecial.AUDIO)] + [7] * lay.num_codec_channels]])
    x = emb(tok)
    rows = [emb.weight[lay.channel_offset(c) + tok[0, 0, c]] for c in range(lay.num_channels)]
    torch.testing.assert_close(x[0, 0], torch.stack(rows).mean(0))
    audio = torch.randn(1, 2, emb.weight.shape[1])
    mask = torch.tensor([[False, True]])
    y = emb(tok, audio, mask)
    torch.testing.assert_close(y[0, 0], x[0, 0])  # untouched where no audio
    K = lay.num_codec_channels
    torch.testing.assert_close(y[0, 1], (emb.weight[lay.text(TextSpecial.AUDIO)] + K * audio[0, 1]) / (K + 1))


def test_per_channel_logits_are_slices_of_tied_head(tiny_model):
    h = torch.randn(1, 2, tiny_model.cfg.hidden_size)
    logits = tiny_model.embed.logits(h)
    full = h @ tiny_model.embed.weight.T
    lay = tiny_model.layout
    for c, lg in enumerate(logits):
        assert lg.shape[-1] == lay.channel_size(c)
        torch.testing.assert_close(lg, full[..., lay.channel_offset(c): lay.channel_offset(c) + lay.channel_size(c)])


def test_delay_pattern_build_and_undo():
    codes = torch.arange(12).view(3, 4)
    d = delay_codes(codes, pad=-1, eos=-2)
    assert d.shape == (3, 4 + 3 + 1)
    assert d[0].tolist() == [-1, 0, 1, 2, 3, -2, -1, -1]
    assert d[2].tolist() == [-1, -1, -1, 8, 9, 10, 11, -2]
    torch.testing.assert_close(undo_delay(d), codes)
    batched = torch.stack([codes, codes + 100])
    torch.testing.assert_close(undo_delay(delay_codes(batched, pad=0)), batched)
    with pytest.raises(ValueError):
        undo_delay(torch.zeros(5, 3, dtype=torch.long))


def test_channel_loss_mean_of_present_channels():
    torch.manual_seed(0)
    logits = [torch.randn(2, 3, 7), torch.randn(2, 3, 5), torch.randn(2, 3, 5)]
    labels = torch.full((2, 3, 3), IGNORE)
    labels[0, :, 0] = torch.tensor([1, 2, 3])
    labels[1, 1:, 1] = torch.tensor([0, 4])
    loss, per = channel_loss(logits, labels)
    ce0 = torch.nn.functional.cross_entropy(logits[0][0], labels[0, :, 0])
    ce1 = torch.nn.functional.cross_entropy(logits[1][1, 1:], labels[1, 1:, 1])
    torch.testing.assert_close(loss, (ce0 + ce1) / 2)
    assert torch.isnan(per[2])
    with pytest.raises(ValueError, match="no channel"):
        channel_loss(logits, torch.full((2, 3, 3), IGNORE))


def test_training_loss_includes_balance_loss_and_backprops(tiny_cfg):
    torch.manual_seed(0)
    model = DeepOmniModel(tiny_cfg, with_speech_input=False).init_weights(1).train()
    lay = model.layout
    tok = torch.randint(0, 50, (2, 6, lay.num_channels))
    out = model(tok, labels_BLC=tok)
    assert out.aux_loss > 0
    torch.testing.assert_close(out.loss, torch.nanmean(out.channel_losses) + out.aux_loss)
    out.loss.backward()
    assert model.embed.weight.grad.abs().sum() > 0
    assert all(m.experts.gate_up_proj.grad is not None for m in model.moe_layers)


# ------------------------------------------------------------------------------------ speech input
def test_speech_projector_fills_audio_positions(tiny_model):
    lay = tiny_model.layout
    n_mel = 150  # 1.5 s
    n_pos = num_audio_positions(n_mel, tiny_model.cfg.speech_encoder.downsample)
    mel = torch.randn(1, 80, n_mel)
    audio = tiny_model.encode_speech(mel, [n_mel])
    assert audio[0].shape == (n_pos, tiny_model.cfg.hidden_size) and n_pos == 19  # 75 frames / 4
    prompt = user_turn(lay, audio_positions=n_pos).unsqueeze(0)
    out_a = tiny_model(prompt, audio=audio)
    out_b = tiny_model(prompt, audio=[audio[0] * 0])
    assert not torch.allclose(out_a.logits[0], out_b.logits[0])  # the speech really enters the model
    with pytest.raises(ValueError, match="placeholder"):
        tiny_model(prompt, audio=[audio[0][:-1]])


def test_projector_gets_gradient_encoder_frozen(tiny_cfg):
    model = DeepOmniModel(tiny_cfg).init_weights(2).train()
    n = 40
    audio = model.encode_speech(torch.randn(1, 80, n), [n])
    prompt = user_turn(model.layout, audio_positions=audio[0].shape[0]).unsqueeze(0)
    out = model(prompt, audio=audio, labels_BLC=prompt)
    out.loss.backward()
    assert model.speech.projector.linear1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.speech.encoder.parameters())


# --------------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("chunks", [[9, 1, 1, 1], [5, 4, 3]])
def test_incremental_logits_equal_full_forward(tiny_model, chunks):
    torch.manual_seed(0)
    C = tiny_model.layout.num_channels
    tok = torch.randint(0, 60, (2, sum(chunks), C))
    full = tiny_model(tok).logits
    cache, pos = KVCache(len(tiny_model.layers)), 0
    for n in chunks:
        step = tiny_model(tok[:, pos:pos + n], cache=cache).logits
        for c in range(C):
            torch.testing.assert_close(step[c], full[c][:, pos:pos + n], atol=1e-5, rtol=1e-5)
        pos += n
    assert cache.length == pos


def test_absorbed_decoding_equals_expanded_attention(tiny_model, monkeypatch):
    """Decoding steps attend in the latent space (kv_b_proj absorbed); forcing the expanded form must give
    the same logits, and prefill (as many queries as keys) keeps the expanded form."""
    from deepomni.model.attention import MLAttention

    attn = tiny_model.layers[0].self_attn
    assert attn.absorb(1, 200) and attn.absorb(4, 200)
    assert not attn.absorb(50, 50)  # a prefill
    torch.manual_seed(2)
    tok = torch.randint(0, 60, (3, 13, tiny_model.layout.num_channels))

    def steps():
        cache = KVCache(len(tiny_model.layers))
        tiny_model(tok[:, :10], cache=cache)
        return [tiny_model(tok[:, i:i + 1], cache=cache).logits for i in range(10, 13)]

    absorbed = steps()
    monkeypatch.setattr(MLAttention, "absorb", lambda self, L, S: False)
    for a, e in zip(absorbed, steps()):
        for c in range(len(a)):
            torch.testing.assert_close(a[c], e[c], atol=1e-5, rtol=1e-5)


def test_cache_select_drops_rows(tiny_model):
    torch.manual_seed(1)
    tok = torch.randint(0, 60, (2, 6, tiny_model.layout.num_channels))
    cache = KVCache(len(tiny_model.layers))
    tiny_model(tok[:, :5], cache=cache)
    cache.select([1])
    inc = tiny_model(tok[1:, 5:], cache=cache).logits[0]
    torch.testing.assert_close(inc[0, -1], tiny_model(tok[1:]).logits[0][0, -1], atol=1e-5, rtol=1e-5)


def test_batch_parallel_generation_follows_the_scheme(tiny_model):
    lay = tiny_model.layout
    K = lay.num_codec_channels
    prompt = user_turn(lay, text_ids=[11, 12, 13])
    cfg = GenerationConfig(max_steps=30, top_k=5, seed=3)
    g1, g2 = generate(tiny_model, prompt, cfg=cfg), generate(tiny_model, prompt, cfg=cfg)
    assert g1.text_ids == g2.text_ids and torch.equal(g1.codes_KF, g2.codes_KF)  # seeded
    assert g1.codes_KF.shape[0] == K and (g1.codes_KF < lay.codebook_size).all()
    # the text item decodes greedily and alone: its tokens equal a plain greedy loop over full forwards
    seq = prompt.clone()
    greedy = []
    for _ in range(len(g1.text_ids)):
        t = int(tiny_model(seq.unsqueeze(0)).logits[0][0, -1].argmax())
        greedy.append(t)
        nxt = torch.full((1, lay.num_channels), lay.codec(CodecSpecial.PAD))
        nxt[0, 0] = t
        seq = torch.cat([seq, nxt])
    assert greedy == g1.text_ids
    # frames stream as they complete, after the K-step delay
    events = list(stream(tiny_model, prompt, cfg=cfg))
    first_frame = next(e.step for e in events if e.kind == "frame")
    assert first_frame == K
    text_only = generate(tiny_model, prompt, cfg=GenerationConfig(max_steps=30, speech=False))
    assert text_only.text_ids == g1.text_ids and text_only.frames == []


def test_generation_stops_when_codec_ends(tiny_model):
    """Force EOS on codec channel 0 by biasing its head row: every channel must end, frames stay aligned."""
    lay = tiny_model.layout
    K = lay.num_codec_channels
    model = DeepOmniModel(tiny_model.cfg, with_speech_input=False)
    model.load_state_dict(tiny_model.state_dict(), strict=False)
    model.eval()
    with torch.no_grad():
        eos_row = lay.channel_offset(1) + lay.codec(CodecSpecial.EOS)
        eot_row = lay.text(TextSpecial.EOT)
        model.embed.weight[eos_row] = model.norm.weight.sign() * 5  # dominates channel 0 once it can end
        model.embed.weight[eot_row] = model.norm.weight.sign() * 5
    g = generate(model, user_turn(lay, text_ids=[1, 2]), cfg=GenerationConfig(max_steps=50, top_k=1000, seed=0))
    # text ends at once; channel 0 may end at step 1 (its first), channel i one step after channel i-1
    assert g.text_ids == [] and g.frames == []
    assert g.steps == K + 1


def test_random_build_on_device_in_dtype(tiny_cfg):
    """``DeepOmniModel.random`` materialises nothing on the host first; on CPU/fp32 it draws the same
    weights as ``init_weights`` with the same seed, and in bf16 it still decodes finite logits."""
    ref = DeepOmniModel(tiny_cfg, with_speech_input=False).init_weights(seed=3)
    fast = DeepOmniModel.random(tiny_cfg, seed=3, with_speech_input=False)
    for (n, a), (_, b) in zip(ref.named_parameters(), fast.named_parameters()):
        assert torch.equal(a, b), n
    half = DeepOmniModel.random(tiny_cfg, dtype=torch.bfloat16, seed=0).eval()
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    enc = [p for n, p in half.named_parameters() if n.startswith("speech.encoder.") and p.dim() > 1]
    assert enc and all(float(p.float().std()) > 0 for p in enc)  # the encoder is initialised too
    tokens = torch.randint(0, 100, (1, 12, tiny_cfg.num_codec_channels + 1))
    assert all(torch.isfinite(l.float()).all() for l in half(tokens).logits)
