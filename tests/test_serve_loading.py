"""Each serving deployment loads only its part of the checkpoint (deepomni.checkpoint.load_part): the
SpeechEncoder the speech input, the Backbone the LLM without it; from a sharded and a single-file checkpoint,
and from the random preset's cached checkpoint. The deployment classes are constructed as Serve constructs
them (``func_or_class``), without Ray."""

import pytest
import torch

from deepomni.checkpoint import save_model
from deepomni.serve.config import AppConfig


def _names(module) -> dict[str, int]:
    return {n: p.numel() for n, p in module.named_parameters()}


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_deployments_load_only_their_part(tmp_path, tiny_model, layout, monkeypatch):
    from serve_apps.backbone import Backbone
    from serve_apps.encoder import SpeechEncoder

    monkeypatch.setenv("DEEPOMNI_CACHE", str(tmp_path / "cache"))
    ckpt = save_model(tiny_model, tmp_path / "ck", max_shard_bytes=2**30 if layout == "single" else 2**18)
    assert (ckpt / "model.safetensors.index.json").is_file() == (layout == "sharded")
    cfg = AppConfig(checkpoint=str(ckpt), device="cpu", max_rows=4, kept_contexts=2)
    whole = _names(tiny_model)
    encoder = SpeechEncoder.func_or_class(cfg)
    backbone = Backbone.func_or_class(cfg, None)
    assert _names(encoder.encoding.speech) == {n.removeprefix("speech."): k for n, k in whole.items() if n.startswith("speech.")}
    assert _names(backbone.model) == {n: k for n, k in whole.items() if not n.startswith("speech.")}
    assert sum(_names(encoder.encoding.speech).values()) + sum(_names(backbone.model).values()) == sum(whole.values())
    got, want = encoder.encoding.speech.state_dict(), tiny_model.speech.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_random_preset_is_one_cached_checkpoint(tmp_path, monkeypatch):
    """Without a checkpoint, the replicas load their parts of the seeded random preset, written once to the
    cache: the same weights the whole model built in one process has."""
    from deepomni.model.model import DeepOmniModel
    from serve_apps.loading import load_serving_model, random_checkpoint

    monkeypatch.setenv("DEEPOMNI_CACHE", str(tmp_path / "cache"))
    cfg = AppConfig(preset="tiny", device="cpu", seed=3)
    path = random_checkpoint(cfg)
    assert random_checkpoint(cfg) == path and path.parent == tmp_path / "cache" / "serve"
    torch.manual_seed(3)
    ref = DeepOmniModel(cfg.model_config()).init_weights(seed=3).state_dict()
    speech = load_serving_model(cfg, "speech").state_dict()
    backbone = load_serving_model(cfg, "backbone").state_dict()
    assert all(torch.equal(speech[k], ref["speech." + k]) for k in speech)
    assert all(torch.equal(backbone[k], ref[k]) for k in backbone)
    assert len(speech) + len(backbone) == len(ref)
