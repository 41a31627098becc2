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
