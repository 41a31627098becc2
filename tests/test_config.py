"""The one config system: every config loads through ``load_config`` (presets, files, overrides), refuses
unknown keys and wrong types with a message naming the field, and every command's flags come from the same
dataclasses."""

from __future__ import annotations

import dataclasses
import json
import typing

import pytest

from deepomni.codec.builtin import BuiltinConfig
from deepomni.config import (ConfigError, DataConfig, ModelConfig, SpeechEncoderConfig, field_comments,
                             list_presets, load_config)
from deepomni.data.synth import SynthConfig
from deepomni.model.generate import GenerationConfig
from deepomni.serve.config import AppConfig
from deepomni.train.config import EncoderPretrainConfig, EvalConfig, ProfileConfig, TrainConfig
from deepomni.train.recipe import PipelineConfig

CONFIGS = [ModelConfig, SpeechEncoderConfig, DataConfig, TrainConfig, ProfileConfig, EvalConfig,
           EncoderPretrainConfig, PipelineConfig, AppConfig, SynthConfig, GenerationConfig, BuiltinConfig]
KINDS = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig, "eval": EvalConfig, "serve": AppConfig}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_ships_presets_that_load(kind):
    names = list_presets(kind)
    assert names, f"no {kind} preset in the package"
    for name in names:
        cfg = load_config(KINDS[kind], name)
        assert isinstance(cfg, KINDS[kind])


def _numeric_field(cls) -> str:
    hints = typing.get_type_hints(cls)
    return next(f.name for f in dataclasses.fields(cls) if hints[f.name] in (int, float))


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_wrong_type_and_unknown_key_are_refused_naming_the_field(cls):
    name = _numeric_field(cls)
    with pytest.raises(ConfigError, match=rf"{cls.__name__}: {name}: .*number|{cls.__name__}: {name}: .*integer"):
        load_config(cls, None, {name: "not-a-number"})
    with pytest.raises(ConfigError, match=rf"{cls.__name__}: bogus_field: unknown field"):
        load_config(cls, None, {"bogus_field": 1})


def test_values_are_converted_from_the_hints():
    cfg = load_config(DataConfig, "tiny", {"max_audio_seconds": "20", "feature_actors": "2"})
    assert cfg.max_audio_seconds == 20.0 and isinstance(cfg.max_audio_seconds, float) and cfg.feature_actors == 2
    t = load_config(TrainConfig, None, {"betas": [0.8, 0.9], "use_gpu": "yes"})
    assert t.betas == (0.8, 0.9) and t.use_gpu is True
    with pytest.raises(ConfigError, match="moe_impl"):
        load_config(ModelConfig, "tiny", {"moe_impl": "fast"})
    with pytest.raises(ConfigError, match=r"speech_encoder\.d_model"):  # nested configs are checked too
        load_config(ModelConfig, "tiny", {"speech_encoder": {"d_model": "wide"}})
    with pytest.raises(ConfigError, match="tasks"):
        load_config(EvalConfig, None, {"tasks": ["text_qa", "poetry"]})


def test_files_presets_and_overrides(tmp_path):
    f = tmp_path / "train.yaml"
    f.write_text("preset: tiny\nbatch_size: 3\nstages:\n  s1_align: {lr: 0.5}\n")
    cfg = TrainConfig.load(str(f), {"stage": "s1_align", "max_steps": 9, "lr": None})
    assert (cfg.batch_size, cfg.lr, cfg.max_steps) == (3, 0.5, 9)  # file, then its stage table, then overrides
    j = tmp_path / "model.json"
    j.write_text(json.dumps({**load_config(ModelConfig, "tiny").to_dict(), "hidden_size": 96}))
    assert load_config(ModelConfig, j).hidden_size == 96
    with pytest.raises(ConfigError, match="unknown model preset 'nope'.*tiny"):
        load_config(ModelConfig, "nope")
    with pytest.raises(FileNotFoundError):
        load_config(ModelConfig, tmp_path / "missing.json")
    with pytest.raises(ConfigError, match=r"stages\.s1_align.*lrr"):
        TrainConfig.load(None, {"stages": {"s1_align": {"lrr": 1}}})
    with pytest.raises(ConfigError, match="num_experts_per_tok"):  # a config's own checks run on load
        load_config(ModelConfig, "tiny", {"num_experts_per_tok": 99})


def test_field_comments_become_flag_help():
    comments = field_comments(TrainConfig)
    assert "resumes" in comments["run_name"] and "ZeRO" in comments["zero_stage"]


# ---------------------------------------------------------------------------------- the command line
COMMANDS = [["train"], ["train-encoder"], ["profile"], ["evaluate"], ["pipeline"], ["data", "prepare"],
            ["export-hf"], ["serve"], ["info"], ["smoke"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=" ".join)
def test_every_command_has_help(cmd, capsys):
    from deepomni.cli import main

    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0 and "usage: deepomni " + " ".join(cmd) in capsys.readouterr().out


@pytest.mark.parametrize("argv,flag", [
    (["train", "--max-steps", "ten"], "--max-steps"),
    (["train", "--use-gpu", "maybe"], "--use-gpu"),
    (["train", "--inject-fault", "{at_step"], "--inject-fault"),
    (["pipeline", "--steps-scale", "half"], "--steps-scale"),
    (["profile", "--checkpoint", "c", "--data", "d", "--out", "o", "--max-items", "x"], "--max-items"),
    (["evaluate", "--checkpoint", "c", "--data", "d", "--out", "o", "--margin", "1.5"], "--margin"),
    (["data", "prepare", "--out", "o", "--max-audio-seconds", "twenty"], "--max-audio-seconds"),
    (["train-encoder", "--data", "d", "--out", "o", "--betas", "0.9"], "--betas"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_a_bad_flag_is_refused_naming_it(argv, flag, capsys):
    from deepomni.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


def test_config_errors_from_values_are_clean(capsys):
    from deepomni.cli import main

    assert main(["train", "--stage", "s9"]) == 2
    assert "TrainConfig: stage: unknown stage 's9'" in capsys.readouterr().err
    assert main(["pipeline", "--baselines", "bogus"]) == 2
    assert "baselines: unknown ['bogus']" in capsys.readouterr().err


def test_flags_cover_every_field_and_parse_to_the_config():
    from tests.helpers.train import parse_train

    cfg = parse_train(["--config", "tiny", "--stage", "s1_align", "--betas", "0.8", "0.9", "--use-gpu",
                       "--sample-log", "false", "--lr", "1e-4"])
    assert (cfg.betas, cfg.use_gpu, cfg.sample_log, cfg.lr) == ((0.8, 0.9), True, False, 1e-4)
    assert cfg.batch_size == TrainConfig.load("tiny", {"stage": "s1_align"}).batch_size != TrainConfig().batch_size
