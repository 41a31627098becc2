"""The frozen Whisper encoder: built from the config, or loaded from a local transformers directory."""

import pytest
import torch

from deepomni.config import SpeechEncoderConfig
from deepomni.model.speech import SpeechInput, build_whisper_encoder, whisper_config


def _small(**kw):
    return SpeechEncoderConfig(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                               max_source_positions=100, **kw)


@pytest.mark.parametrize("kind", ["WhisperModel", "WhisperForConditionalGeneration"])
def test_loads_encoder_from_local_checkpoint(tmp_path, kind):
    import transformers

    torch.manual_seed(0)
    ref = getattr(transformers, kind)(whisper_config(_small())).eval()
    ref.save_pretrained(tmp_path)
    enc = build_whisper_encoder(_small(path=str(tmp_path)))
    mel = torch.randn(1, 80, 200)
    ref_enc = ref.get_encoder() if hasattr(ref, "get_encoder") else ref.model.encoder
    torch.testing.assert_close(enc(mel).last_hidden_state, ref_enc(mel).last_hidden_state)
    assert not any(p.requires_grad for p in enc.parameters())


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises((FileNotFoundError, OSError)):
        build_whisper_encoder(_small(path=str(tmp_path / "nope")))


def test_short_input_is_padded_and_trimmed_to_its_frames():
    torch.manual_seed(0)
    s = SpeechInput(_small(downsample=2), hidden_size=16)
    out = s(torch.randn(2, 80, 120), [120, 37])
    # 120 mel frames -> 60 encoder frames -> 30 positions; 37 -> 19 -> 10 (downsample 2, last one padded)
    assert [o.shape for o in out] == [torch.Size([30, 16]), torch.Size([10, 16])]


# ---------------------------------------------------------------------------- positions="ctc"
def test_ctc_segments_are_one_run_per_character_heard():
    from deepomni.model.speech import ctc_segments

    best = [0, 5, 5, 0, 0, 7, 5, 5, 0]  # blank, "c c", blank blank, "e", "c c", blank -> 3 characters
    logits_TV = torch.nn.functional.one_hot(torch.tensor(best), 9).float()
    assert ctc_segments(logits_TV) == [(1, 3), (5, 6), (6, 8)]
    # silence: no character heard -> one segment over every frame, so the utterance still fills a position
    assert ctc_segments(torch.nn.functional.one_hot(torch.zeros(4, dtype=torch.long), 9).float()) == [(0, 4)]


def test_ctc_positions_are_the_segments_and_stored_ones_are_used():
    torch.manual_seed(0)
    s = SpeechInput(_small(positions="ctc"), hidden_size=16)
    assert [n for n, _ in s.named_parameters() if "ctc" in n] == ["encoder.ctc_head.weight", "encoder.ctc_head.bias"]
    mel = torch.randn(2, 80, 120)
    segs = s.segments(mel, [120, 37])
    live = s(mel, [120, 37])
    assert [o.shape[0] for o in live] == [len(g) for g in segs]
    torch.testing.assert_close(s(mel, [120, 37], segs)[0], live[0])  # stored segments = the live cut
    stored = [[(0, 3), (3, 10)], None]  # what data preparation kept wins; None cuts it now
    assert [o.shape[0] for o in s(mel, [120, 37], stored)] == [2, len(segs[1])]
    with pytest.raises(ValueError, match="segments reach frame"):
        s(mel, [120, 37], [[(0, 61)], None])  # 120 mel frames are 60 encoder frames


def test_ctc_projector_starts_as_the_typed_characters():
    """After init_projector_from_text, a heard character (one-hot posterior) embeds at an AUDIO position exactly
    as the same character typed: alignment starts where a cascade through the CTC transcript would be."""
    from dataclasses import replace

    from deepomni.config import load_preset
    from deepomni.model.channels import CodecSpecial, TextSpecial
    from deepomni.model.model import DeepOmniModel
    from deepomni.model.speech import CTC_VOCAB
    from deepomni.text import ByteTokenizer

    cfg = load_preset("tiny")
    cfg = cfg.replace(speech_encoder=replace(cfg.speech_encoder, positions="ctc"))
    model = DeepOmniModel(cfg).init_weights(seed=0)
    model.init_projector_from_text(ByteTokenizer())
    chars = "k9 a'"
    post_SV = torch.nn.functional.one_hot(torch.tensor([CTC_VOCAB.index(c) for c in chars]), len(CTC_VOCAB)).float()
    frames_SE = torch.randn(len(chars), cfg.speech_encoder.d_model)  # the zeroed MLP output ignores them
    audio = model.speech.projector(frames_SE, post_SV)
    L, pad = model.layout, model.layout.num_channels - 1
    heard = torch.tensor([[L.text(TextSpecial.AUDIO)] + [L.codec(CodecSpecial.PAD)] * pad] * len(chars))
    typed = torch.tensor([[ord(c)] + [L.codec(CodecSpecial.PAD)] * pad for c in chars])
    torch.testing.assert_close(model.embed_inputs(heard.unsqueeze(0), [audio]), model.embed_inputs(typed.unsqueeze(0)))


def test_ctc_positions_need_the_encoders_ctc_head(tmp_path):
    import transformers

    transformers.WhisperModel(whisper_config(_small())).save_pretrained(tmp_path)  # a plain Whisper: no CTC head
    with pytest.raises(FileNotFoundError, match="ctc_head.safetensors"):
        build_whisper_encoder(_small(path=str(tmp_path), positions="ctc"))


def test_utterances_batched_by_length_encode_as_alone():
    """window="utterance": a batch of different lengths (padded to each bucket's longest, the padding masked)
    gives every utterance the frames it gets encoded alone at its own length."""
    from deepomni.config import load_preset
    from deepomni.model.speech import SpeechInput, length_buckets

    cfg = load_preset("tiny").speech_encoder
    assert cfg.window == "utterance"
    torch.manual_seed(0)
    speech = SpeechInput(cfg, 64).eval()
    lens = [37, 200, 151, 80, 199, 3, 64, 120]
    mel_BMT = torch.randn(len(lens), cfg.num_mel_bins, 800)
    with torch.no_grad():
        batched = speech.encode(mel_BMT, lens)
        alone = [speech.encode(mel_BMT[b : b + 1], [n])[0] for b, n in enumerate(lens)]
    for b, n in enumerate(lens):
        assert batched[b].shape[0] == (n + 1) // 2
        torch.testing.assert_close(batched[b], alone[b], rtol=1e-4, atol=1e-5)
    buckets = length_buckets([(n + 1) // 2 for n in lens])
    assert sorted(i for b in buckets for i in b) == list(range(len(lens))) and 1 < len(buckets) < len(lens)
    assert length_buckets([50] * 16) == [list(range(16))]  # equal lengths: one batch
