"""``deepomni train | profile | pairs | evaluate | pipeline``: the training side of the command line.

Every flag of a config is derived from its dataclass (:func:`deepomni.config.add_flags`): ``--config`` names
a preset (``deepomni/presets/<kind>/``) or a JSON/YAML file, the flags override it. The ``jobs/`` modules
are the same commands as entry points for ``ray job submit --working-dir . -- python -m jobs.<name>``.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..config import add_flags, flag_values, list_presets, load_config
from .config import TrainConfig


def _config_flag(p: argparse.ArgumentParser, kind: str, default: str | None, what: str) -> None:
    p.add_argument("--config", default=default, help=f"{what}: a preset ({', '.join(list_presets(kind))}) or a "
                                                     f"JSON/YAML file; the flags below override it")


# ------------------------------------------------------------------------------------------------ train
def add_train_args(p: argparse.ArgumentParser) -> None:
    _config_flag(p, "train", None, "TrainConfig (with its per-stage table)")
    add_flags(p, TrainConfig, exclude=("stages",))


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig.load(args.config, flag_values(args, TrainConfig, exclude=("stages",)))


def cmd_train(args: argparse.Namespace) -> int:
    cfg = train_config(args)
    from ..ray_env import init_ray
    from .loop import fit

    init_ray()
    print(f"[train] stage={cfg.stage} run={cfg.run_name} workers={cfg.num_workers} ep={cfg.ep_size} "
          f"zero={cfg.zero_stage} batch={cfg.batch_size} lr={cfg.lr} steps={cfg.max_steps}", flush=True)
    result = fit(cfg)
    if result.error is not None:
        print(f"[train] failed: {result.error}", file=sys.stderr)
        return 1
    m = result.metrics or {}
    print(f"[train] done: step {m.get('step')} (resumed from {m.get('start_step')}), loss "
          f"{m.get('loss', float('nan')):.4f}, {m.get('tokens_per_s', 0):.0f} tokens/s per worker, checkpoint "
          f"{result.checkpoint.path if result.checkpoint else None}")
    print(f"[train] final model: {cfg.storage_path}/{cfg.run_name}/final")
    return 0


# ---------------------------------------------------------------------------------------------- profile
def add_profile_args(p: argparse.ArgumentParser) -> None:
    from .config import ProfileConfig

    p.add_argument("--checkpoint", required=True, help="model checkpoint directory (deepomni.checkpoint)")
    p.add_argument("--data", required=True, help="dataset directory holding tokenized/ (deepomni data prepare)")
    p.add_argument("--out", required=True, help="output directory (experts.json, load.json/.csv/.png)")
    add_flags(p, ProfileConfig)


def cmd_profile(args: argparse.Namespace) -> int:
    from .config import ProfileConfig
    from .profile import run

    cfg = load_config(ProfileConfig, None, flag_values(args, ProfileConfig))
    summary = run(args.checkpoint, args.data, args.out, cfg)
    print(json.dumps(summary, indent=1))
    return 0


# ------------------------------------------------------------------------------------------------ pairs
def add_pairs_args(p: argparse.ArgumentParser) -> None:
    from .preference import PreferenceConfig

    p.add_argument("--checkpoint", required=True, help="the model that answers (and the frozen DPO reference)")
    p.add_argument("--data", required=True, help="dataset directory holding tokenized/ and the codec")
    p.add_argument("--out", required=True, help="output directory (pairs.parquet, summary.json): a dpo stage's "
                                                "--pairs")
    add_flags(p, PreferenceConfig)


def cmd_pairs(args: argparse.Namespace) -> int:
    from .preference import PreferenceConfig, build_pairs

    cfg = load_config(PreferenceConfig, None, flag_values(args, PreferenceConfig))
    print(json.dumps(build_pairs(args.checkpoint, args.data, args.out, cfg), indent=1))
    return 0


# --------------------------------------------------------------------------------------------- evaluate
def add_evaluate_args(p: argparse.ArgumentParser) -> None:
    from .config import EvalConfig

    p.add_argument("--checkpoint", required=True, help="model checkpoint directory")
    p.add_argument("--base", default=None, help="base checkpoint: its text_qa accuracy gives the relative text drop")
    p.add_argument("--data", required=True, help="dataset directory holding tokenized/")
    p.add_argument("--out", required=True, help="output directory (eval.json, eval.md, items.jsonl)")
    p.add_argument("--split", default="test", help="the held-out split (default test)")
    _config_flag(p, "eval", None, "EvalConfig")
    add_flags(p, EvalConfig)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .config import EvalConfig
    from .evaluate import markdown, run

    cfg = load_config(EvalConfig, args.config, flag_values(args, EvalConfig))
    print(markdown(run(args.checkpoint, args.data, args.out, args.base, args.split, cfg)))
    return 0


# --------------------------------------------------------------------------------------------- pipeline
def add_pipeline_args(p: argparse.ArgumentParser) -> None:
    from .recipe import PipelineConfig

    add_flags(p, PipelineConfig, title="the pipeline (--config is the training preset or TrainConfig file)")


def cmd_pipeline(args: argparse.Namespace) -> int:
    from ..ray_env import init_ray
    from .recipe import PipelineConfig, run_pipeline

    cfg = load_config(PipelineConfig, None, flag_values(args, PipelineConfig))
    load_config(TrainConfig, cfg.config)  # a wrong training config fails now, not after the data step
    init_ray()
    run_pipeline(cfg)
    return 0


def add_encoder_args(p: argparse.ArgumentParser) -> None:
    from .config import EncoderPretrainConfig

    p.add_argument("--data", required=True, help="dataset dir holding raw/<split>/part-*.parquet")
    p.add_argument("--out", required=True, help="output Whisper encoder directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_flags(p, EncoderPretrainConfig)


def cmd_train_encoder(args: argparse.Namespace) -> int:
    from .config import EncoderPretrainConfig
    from .encoder import pretrain_encoder

    cfg = load_config(EncoderPretrainConfig, None, flag_values(args, EncoderPretrainConfig))
    pretrain_encoder(cfg, args.data, args.out, progress=not args.quiet)
    return 0


COMMANDS = {
    "train": (add_train_args, cmd_train, "run one training stage on Ray Train (docs/train.md)"),
    "train-encoder": (add_encoder_args, cmd_train_encoder, "CTC-pretrain a small Whisper encoder on a corpus "
                                                           "(foundations build does this at scale; a real model uses Whisper's)"),
    "profile": (add_profile_args, cmd_profile, "measure modality load and choose the speech experts"),
    "pairs": (add_pairs_args, cmd_pairs, "sample spoken answers, judge them and keep preferred / rejected pairs "
                                         "for the DPO stage"),
    "evaluate": (add_evaluate_args, cmd_evaluate, "evaluate a checkpoint on a held-out split"),
    "pipeline": (add_pipeline_args, cmd_pipeline, "the whole recipe and its baselines, ending with the "
                                                  "evaluation table (`make demo`)"),
}


def add_train_commands(subparsers: argparse._SubParsersAction) -> None:
    for name, (add_args, fn, help_text) in COMMANDS.items():
        p = subparsers.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(fn=fn)
