"""HF DeepSeek-V2 configs -> DeepOmni (``config_from_hf``, ``hf_config_dict``): the round trip, DeepSeek-V2-Lite's
``config.json``, unsupported settings as clear errors, and a directory without a checkpoint. No weights: the
adapter's import, parity and export are tests/test_hf_adapter.py."""

from __future__ import annotations

import json

import pytest
from transformers import DeepseekV2Config

from deepomni.config import load_preset
from deepomni.model.hf import config_from_hf, hf_config_dict, import_hf


def test_config_round_trip():
    for cfg in (load_preset("tiny"), load_preset("deepseek-v2-lite").replace(tie_word_embeddings=False)):
        assert config_from_hf(hf_config_dict(cfg), base=cfg) == cfg
        assert config_from_hf(DeepseekV2Config(**hf_config_dict(cfg)), base=cfg) == cfg


# config.json of deepseek-ai/DeepSeek-V2-Lite (auto_map / transformers_version left out)
V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64,
    "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6,
    "num_hidden_layers": 27, "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
    "use_cache": True, "v_head_dim": 128, "vocab_size": 102400,
}


def test_deepseek_v2_lite_config_matches_preset():
    preset = load_preset("deepseek-v2-lite")
    cfg = config_from_hf(V2_LITE, base=preset)
    assert cfg == preset.replace(tie_word_embeddings=False)  # V2-Lite's lm_head is not tied to its embeddings


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(topk_method="group_limited_greedy", n_group=8, topk_group=3), "topk_method"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(attention_bias=True), "attention_bias"),
        (dict(mlp_bias=True), "mlp_bias"),
        (dict(scoring_func="sigmoid"), "scoring_func"),
        (dict(model_type="deepseek_v3"), "model_type"),
        (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "RoPE type"),
        (dict(norm_topk_prob=True, routed_scaling_factor=16.0), "norm_topk_prob"),
    ],
)
def test_unsupported_config_is_a_clear_error(change, field):
    with pytest.raises(ValueError, match=field):
        config_from_hf({**V2_LITE, **change})


def test_norm_topk_prob_warns():
    with pytest.warns(UserWarning, match="norm_topk_prob"):
        assert config_from_hf({**V2_LITE, "norm_topk_prob": True}).norm_topk_prob


def test_unknown_override_is_an_error():
    with pytest.raises(ValueError, match="no_such_field"):
        config_from_hf(V2_LITE, no_such_field=1)


# ------------------------------------------------------------------------------------------ errors
def test_missing_directory_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        import_hf(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps(V2_LITE))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        import_hf(tmp_path)
