"""Staged training on Ray Train (CPU): a stage end to end, S2 modality freezing, expert parallelism parity,
resume after a re-run and after a worker failure. A 24-item corpus is prepared once per module."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import torch
from safetensors.torch import load_file

from deepomni.checkpoint import load_model, save_model
from deepomni.config import load_preset
from deepomni.model.model import DeepOmniModel
from deepomni.model.modality import moe_layers
from deepomni.config import read_config_source
from deepomni.train.config import TrainConfig
from deepomni.train.engine import lr_factor
from deepomni.train.profile import random_assignment
from deepomni.train.stages import BASELINES, MODELS, RECIPE, STAGES, all_steps, get_stage, set_trainable

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def _cfg(corpus, tmp_path, **kw) -> TrainConfig:
    base = dict(data=str(corpus), storage_path=str(tmp_path / "runs"), batch_size=2, cpus_per_worker=1.0,
                log_every=1, seed=0)
    base.update(kw)
    return TrainConfig.from_dict(base)


def _fit(cfg, dataset=None):
    from deepomni.train.loop import fit

    result = fit(cfg, dataset)
    assert result.error is None, result.error
    return result


# ------------------------------------------------------------------------------------ no Ray needed
def test_stage_table_matches_paper():
    cfg = load_preset("tiny")
    with torch.device("meta"):
        model = DeepOmniModel(cfg)
    names = [n for n, _ in model.named_parameters()]

    def trainable(stage):
        set_trainable(model, get_stage(stage))
        return {n for n, p in model.named_parameters() if p.requires_grad}

    s1 = trainable("s1_align")
    assert s1 and all(n.startswith(("speech.projector.", "embed.")) for n in s1)
    s2 = trainable("s2_speech_experts")
    assert "layers.1.mlp.gate.weight" in s2 and "layers.1.mlp.experts.gate_up_proj" in s2 and "embed.weight" in s2
    # our departure from the paper (stages.py): nothing the text side reads trains after S1 — not the
    # attention, the shared experts, the dense layer, the norms or the text rows of the embedding
    assert s2 - {"embed.weight"} == {n for n in names if ".mlp.experts." in n or ".mlp.gate." in n}
    assert trainable("s2_text_experts") == s2 - {"embed.weight"}
    assert trainable("s3_joint") == s2
    assert get_stage("s2_speech_experts").codec_rows_only and get_stage("s3_joint").codec_rows_only
    ff = trainable("full_finetune")
    assert not any(n.startswith("speech.encoder.") for n in ff) and len(ff) == sum(
        not n.startswith("speech.encoder.") for n in names)
    assert [STAGES[s].mode for s in ("s1_align", "s2_speech_experts", "s2_text_experts", "s3_joint")] == \
        ["all", "speech", "text", "all"]
    assert [STAGES[s].lr for s in ("s1_align", "s2_speech_experts", "s2_text_experts", "s3_joint")] == \
        [2e-5, 1e-4, 2e-5, 5e-5]
    assert trainable("speech_finetune") == trainable("full_finetune")
    assert set(STAGES["speech_finetune"].tasks) == {"asr", "tts", "spoken_qa"}
    # the paper's own sets (baseline "paper_stages"): S2 all but the speech input and the MoE layers'
    # attention (the dense layer 0 keeps its attention training), the whole embedding table; S3 all but the
    # speech input
    paper_s2 = trainable("s2_speech_experts_paper")
    assert paper_s2 == {n for n in names if not n.startswith("speech.")
                        and not (".self_attn." in n and not n.startswith("layers.0."))}
    assert "layers.0.self_attn.q_proj.weight" in paper_s2 and "layers.1.mlp.shared_experts.up_proj.weight" in paper_s2
    assert not get_stage("s2_speech_experts_paper").codec_rows_only
    assert trainable("s2_text_experts_paper") == paper_s2
    assert trainable("s3_joint_paper") == {n for n in names if not n.startswith("speech.")}
    assert [STAGES[f"{s}_paper"].mode for s in ("s2_speech_experts", "s2_text_experts", "s3_joint")] == \
        ["speech", "text", "all"]


def test_recipe_order_profiles_the_aligned_model():
    """The recipe as data: profiling runs on the model S1 aligned, and every later stage is routed by it;
    baselines start from the same base / aligned model; the full fine-tunes are compute-matched."""
    order = [s.run for s in RECIPE]
    assert order == ["base", "s1_align", "profile", "s2_speech_experts", "s2_text_experts", "s3_joint"]
    profile = next(s for s in RECIPE if s.is_profile)
    assert profile.init == "s1_align" and order.index("profile") == order.index("s1_align") + 1
    assert [s.assignment for s in RECIPE if s.stage in ("s2_speech_experts", "s2_text_experts", "s3_joint")] == \
        ["profile"] * 3
    steps = all_steps()
    runs = [s.run for s in steps]
    for i, s in enumerate(steps):  # every step reads only what an earlier step wrote
        assert s.init is None or s.init in runs[:i], s
        assert s.assignment is None or s.assignment in runs[:i], s
    random_profile = next(s for s in steps if s.random_assignment)
    assert random_profile.init == "s1_align"
    # the ablation: the recipe's stages, in its order, from the same aligned model, under the random assignment
    random_stages = [s for s in BASELINES["random_assignment"] if not s.is_profile]
    assert [s.stage for s in random_stages] == ["s2_speech_experts", "s2_text_experts", "s3_joint"]
    assert {s.assignment for s in random_stages} == {random_profile.run} and random_stages[0].init == "s1_align"
    for name in ("full_finetune", "speech_finetune"):
        (ff,) = BASELINES[name]
        assert ff.init == "base" and set(ff.steps_of) == {"s1_align", "s2_speech_experts", "s2_text_experts", "s3_joint"}
    assert set(MODELS.values()) <= set(runs)
    with pytest.raises(ValueError, match="unknown baseline"):
        all_steps(("qlora",))


def test_config_preset_and_overrides():
    cfg = TrainConfig.load("tiny", {"stage": "s1_align", "max_steps": 7, "lr": None})
    assert cfg.max_steps == 7 and cfg.lr == 2e-3 and cfg.stage == "s1_align"
    with pytest.raises(ValueError):
        TrainConfig.from_dict({"bogus": 1})
    from tests.helpers.train import parse_train

    cli = parse_train(["--config", "tiny", "--stage", "s2_text_experts", "--num-workers", "2", "--ep-size", "2",
                 "--lr", "5e-4", "--init", "ckpt/s1"])
    preset_steps = read_config_source("tiny", "train")["stages"]["s2_text_experts"]["max_steps"]
    assert (cli.stage, cli.num_workers, cli.ep_size, cli.lr, cli.init, cli.max_steps) == \
        ("s2_text_experts", 2, 2, 5e-4, "ckpt/s1", preset_steps)
    # warmup 3% then cosine
    assert lr_factor(0, 100, 0.03) == pytest.approx(1 / 3) and lr_factor(2, 100, 0.03) == 1.0
    assert lr_factor(99, 100, 0.03) < 0.01


def test_s1_trains_only_the_codec_rows_of_the_embedding():
    """S1 (docs/paper.md "Training stages": "extended embeddings"): the text LLM's rows, its specials included, stay bit-identical
    through AdamW steps with weight decay (so text-only answers do not change); the codec blocks learn."""
    from deepomni.model.modality import param_groups

    torch.manual_seed(0)
    model = DeepOmniModel(load_preset("tiny")).init_weights(seed=0)
    set_trainable(model, get_stage("s1_align"))
    before = model.embed.weight.detach().clone()
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
    lay = model.layout
    tokens = torch.randint(0, 200, (2, 16, lay.num_channels))
    for _ in range(2):
        out = model(tokens, labels_BLC=tokens)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.embed.weight.detach()
    V = lay.channel_offset(1)  # text vocabulary + text specials
    assert torch.equal(after[:V], before[:V])
    assert not torch.equal(after[V:], before[V:])
    set_trainable(model, get_stage("full_finetune"))
    assert model.embed.trainable_rows is None  # the baselines train the whole table


# ------------------------------------------------------------------- optimizer state (no Ray needed)
@pytest.fixture
def world_of_one(tmp_path):
    """A one-process gloo group, as a Ray Train worker has (the expert-parallel engine reduces over it)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def _tiny_model():
    torch.manual_seed(0)  # the frozen speech encoder is drawn from the global generator
    return DeepOmniModel(load_preset("tiny")).init_weights(seed=0)


def _ep_engine(model, group, max_steps=8):
    from deepomni.model.modality import param_groups
    from deepomni.train.engine import ExpertParallelEngine

    set_trainable(model.train(), get_stage("full_finetune"))
    cfg = TrainConfig(warmup_ratio=0.25)
    return ExpertParallelEngine(model, param_groups(model, cfg.weight_decay), cfg, max_steps, 1e-2, group, None)


def _train(engine, batches):
    for tokens in batches:
        engine.backward(engine.forward(tokens, labels_BLC=tokens).loss)
        engine.step()


def test_optimizer_state_resumes_bit_identically(tmp_path, world_of_one):
    """Save after 2 steps (weights + per-rank optimizer state), rebuild from the files, 2 more steps: the
    parameters and lr are bit-identical to 4 uninterrupted steps. The state file is plain data
    (``weights_only=True`` loads it)."""
    whole = _tiny_model()
    batches = [torch.randint(0, 200, (2, 12, whole.layout.num_channels)) for _ in range(4)]
    e_whole = _ep_engine(whole, world_of_one)
    _train(e_whole, batches)

    first = _tiny_model()
    e_first = _ep_engine(first, world_of_one)
    _train(e_first, batches[:2])
    d = tmp_path / "ck"
    save_model(first, d / "model")
    e_first.save(d, 2)
    state = torch.load(d / "optim_rank000.pt", weights_only=True)
    assert state["step"] == 2 and set(state["scheduler"]["lr_lambdas"]) == {None}  # lambdas are not pickled
    assert state["optimizer"]["state"]  # Adam moments

    resumed, _ = load_model(d / "model")
    e_resumed = _ep_engine(resumed, world_of_one)
    assert e_resumed.load(d) == 2 and e_resumed.lr == e_first.lr
    _train(e_resumed, batches[2:])
    assert e_resumed.lr == e_whole.lr
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class _RunsCode:
    """Unpickling this calls ``exec``: what a checkpoint from an untrusted place could do."""

    def __reduce__(self):
        return exec, ("import builtins; builtins._deepomni_pwned = True",)


def test_optimizer_state_that_runs_code_is_refused(tmp_path, world_of_one):
    import builtins

    from deepomni.train.engine import safe_checkpoint_engine

    bad = tmp_path / "optim_rank000.pt"
    torch.save({"optimizer": _RunsCode(), "scheduler": {}, "step": 1}, bad)
    torch.load(bad, weights_only=False)  # the payload is real: a plain pickle load runs it
    assert builtins.__dict__.pop("_deepomni_pwned", False)

    engine = _ep_engine(_tiny_model(), world_of_one)
    with pytest.raises(ValueError, match="refused to load"):
        engine.load(tmp_path)
    assert not hasattr(builtins, "_deepomni_pwned")
    with pytest.raises(ValueError, match="refused to load"):  # what DeepSpeed's load_checkpoint reads with
        safe_checkpoint_engine().load(str(bad), map_location="cpu")
    assert not hasattr(builtins, "_deepomni_pwned")


# ----------------------------------------------------------------------------------- Ray Train runs
def test_stage_end_to_end_and_resume(corpus, tmp_path, ray_local):
    cfg = _cfg(corpus, tmp_path, stage="text_pretrain", run_name="base", max_steps=2, checkpoint_every=1, lr=3e-3)
    r = _fit(cfg)
    m = r.metrics
    assert m["step"] == 2 and m["start_step"] == 0
    assert math.isfinite(m["loss"]) and math.isfinite(m["channel_losses"][0])
    assert all(math.isnan(x) for x in m["channel_losses"][1:])  # text-only stage: no codec loss
    assert m["tokens_per_s"] > 0 and "text" in m["expert_load"]
    assert (Path(r.checkpoint.path) / "model" / "model.safetensors").is_file()
    # DeepSpeed's own files (model states, ZeRO partition) load without arbitrary unpickling
    from deepomni.train.engine import deepspeed_safe_globals, load_plain

    ds_files = sorted((Path(r.checkpoint.path) / "ds" / "state").glob("*.pt"))
    assert len(ds_files) == 2
    for f in ds_files:
        assert isinstance(load_plain(f, "cpu", deepspeed_safe_globals()), dict)
    final = tmp_path / "runs" / "base" / "final"
    model, _ = load_model(final)
    assert isinstance(model, DeepOmniModel)

    # the same run name with more steps continues from the saved step
    r2 = _fit(_cfg(corpus, tmp_path, stage="text_pretrain", run_name="base", max_steps=3, checkpoint_every=1, lr=3e-3))
    assert r2.metrics["start_step"] == 2 and r2.metrics["step"] == 3


def _init_with_assignment(tmp_path) -> tuple[Path, object]:
    torch.manual_seed(0)
    model = DeepOmniModel(load_preset("tiny")).init_weights(seed=0)
    layers = sorted(moe_layers(model))
    assignment = random_assignment(layers, model.cfg.n_routed_experts, 4, seed=0)
    return save_model(model, tmp_path / "init", assignment), assignment


def test_s2_speech_experts_freezes_the_rest(corpus, tmp_path, ray_local):
    init, assignment = _init_with_assignment(tmp_path)
    cfg = _cfg(corpus, tmp_path, stage="s2_speech_experts", run_name="s21", init=str(init), max_steps=2, lr=1e-2)
    r = _fit(cfg)
    assert r.metrics["routed_outside_mode"] == 0.0
    load_speech = r.metrics["expert_load"]["speech"]
    for i, layer in enumerate(sorted(assignment.speech)):
        outside = [e for e in range(assignment.num_experts) if e not in assignment.speech[layer]]
        assert sum(load_speech[i][e] for e in outside) == 0.0
    before = load_file(str(init / "model.safetensors"))
    final = tmp_path / "runs" / "s21" / "final"
    after = load_file(str(final / "model.safetensors"))
    assert (final / "experts.json").is_file()
    for layer in sorted(assignment.speech):
        speech, text = assignment.speech[layer], assignment.text(layer)
        for w in ("gate_up_proj", "down_proj"):
            k = f"layers.{layer}.mlp.experts.{w}"
            assert torch.equal(before[k][text], after[k][text]), k  # text experts bit-identical
            assert not torch.equal(before[k][speech], after[k][speech]), k  # speech experts trained
        k = f"layers.{layer}.mlp.gate.weight"
        assert torch.equal(before[k][text], after[k][text])
        for k in before:
            if k.startswith(f"layers.{layer}.self_attn."):
                assert torch.equal(before[k], after[k]), k  # attention of MoE layers frozen
    for k in before:
        if k.startswith("speech.") or ".shared_experts." in k or k.startswith("layers.0.") or "norm" in k:
            assert torch.equal(before[k], after[k]), k  # speech input, shared experts, dense layer, norms
    with torch.device("meta"):
        n_text = DeepOmniModel(load_preset("tiny")).embed.layout.channel_offset(1)
    assert torch.equal(before["embed.weight"][:n_text], after["embed.weight"][:n_text])  # text rows, specials
    assert not torch.equal(before["embed.weight"][n_text:], after["embed.weight"][n_text:])  # codec rows train


def test_expert_parallel_matches_single_worker(corpus, tmp_path, ray_local):
    """ep=2 over 2 workers vs DeepSpeed ZeRO-2 on 1 worker, one step. Every worker sees the same rows, so
    the data-parallel mean of the per-rank losses equals the single-worker loss."""
    import ray.data

    from deepomni.train.loop import COLUMNS

    d = Path(corpus) / "tokenized" / "split=train" / "status=ok"
    rows = pads.dataset(sorted(str(f) for f in d.glob("*.parquet")), format="parquet").to_table(columns=COLUMNS).to_pylist()
    row = next(r for r in rows if r["task"] == "spoken_qa" and r["mel_frames"])
    init, _ = _init_with_assignment(tmp_path)
    results = {}
    for ep in (1, 2):
        cfg = _cfg(corpus, tmp_path, stage="full_finetune", run_name=f"ep{ep}", init=str(init), max_steps=1, lr=1e-3,
                   num_workers=ep, ep_size=ep)
        results[ep] = _fit(cfg, ray.data.from_items([row] * 2 * ep))
    assert results[1].metrics["loss"] == pytest.approx(results[2].metrics["loss"], rel=1e-5)
    w1 = load_file(str(tmp_path / "runs" / "ep1" / "final" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "runs" / "ep2" / "final" / "model.safetensors"))
    w0 = load_file(str(init / "model.safetensors"))
    assert w1.keys() == w2.keys()
    k = "layers.1.mlp.experts.gate_up_proj"
    assert not torch.equal(w0[k], w1[k])
    for k in w1:
        # Adam's first step is ~lr * sign(grad): allow a sign flip on gradients that are ~0 in both runs
        diff = (w1[k] - w2[k]).abs()
        assert (diff > 1e-5).float().mean() < 1e-3, (k, diff.max())


def test_data_prepared_by_an_older_version_is_a_clear_error(tmp_path):
    """Tokenized shards without a column the trainer reads (audio_segments came with speech positions
    "ctc") stop the stage with what to do, not pyarrow's missing-field error."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from deepomni.data.tokenized import TOKENIZED_SCHEMA
    from deepomni.train.config import TrainConfig
    from deepomni.train.loop import read_dataset

    d = tmp_path / "tokenized" / "split=train" / "status=ok"
    d.mkdir(parents=True)
    old = pa.schema([f for f in TOKENIZED_SCHEMA if f.name != "audio_segments"])
    pq.write_table(old.empty_table(), d / "part-0.parquet")
    cfg = TrainConfig.load("tiny", {"stage": "s1_align", "data": str(tmp_path)})
    with pytest.raises(ValueError, match=r"\['audio_segments'\].*prepare` again"):
        read_dataset(cfg, get_stage("s1_align"))
