"""``deepomni``: the command line of the whole system (``deepomni --help``; each command's ``--help``).

    data (synth | import | prepare)   datasets                   deepomni/data/cli.py
    train | profile | pairs | evaluate  one step of the recipe   deepomni/train/cli.py
    pipeline                          the whole recipe (`make demo`)
    foundations (build | verify)      the pretrained encoder and base LLM a run starts from
    export-hf                         a checkpoint as a transformers model directory
    serve                             the Ray Serve app          serve_apps/cli.py
    info | smoke                      a preset's sizes; one spoken turn on random weights

The ``jobs/`` modules run the same commands under ``ray job submit --working-dir . -- python -m jobs.<name>``.
"""

from __future__ import annotations

import argparse
import json
import sys

from serve_apps.cli import add_serve_command

from .config import list_presets, load_preset
from .data.cli import add_data_commands
from .foundations.cli import add_foundations_command
from .hf.cli import add_export_hf_command
from .smoke import add_smoke_args, cmd_smoke
from .train.cli import add_train_commands


def _human(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def cmd_info(args: argparse.Namespace) -> int:
    from .model.model import count_parameters

    cfg = load_preset(args.preset)
    counts = count_parameters(cfg, include_speech_encoder=args.with_encoder)
    if args.json:
        print(json.dumps({"preset": args.preset, "config": cfg.to_dict(), "parameters": counts}, indent=1))
        return 0
    moe = cfg.num_moe_layers
    print(f"preset {args.preset}: {cfg.num_hidden_layers} layers ({cfg.first_k_dense_replace} dense, {moe} MoE), "
          f"hidden {cfg.hidden_size}, {cfg.n_routed_experts} routed experts (top-{cfg.num_experts_per_tok}) "
          f"+ {cfg.n_shared_experts} shared, MLA {cfg.num_attention_heads} heads kv_lora {cfg.kv_lora_rank}")
    print(f"channels: text ({cfg.text_vocab_size} + {cfg.num_special_tokens} specials) + {cfg.num_codec_channels} "
          f"codec x ({cfg.codebook_size} + {cfg.num_special_tokens})")
    enc = " (incl. speech encoder)" if args.with_encoder else ""
    print(f"total parameters{enc}:  {_human(counts['total'])} ({counts['total']:,})")
    print(f"active parameters{enc}: {_human(counts['active'])} ({counts['active']:,})")
    print(f"text backbone as released (untied head, text vocab): total {_human(counts['backbone_total'])}, "
          f"active {_human(counts['backbone_active'])}")
    return 0


DESCRIPTION = ("DeepOmni: native speech-text Mixture-of-Experts models on Ray. Every command's --help lists its "
               "flags; configs load from the presets in deepomni/presets/ or JSON/YAML files (docs/config.md).")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    try:
        return version("deepomni")
    except PackageNotFoundError:  # a checkout on sys.path without an install
        return __version__


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="deepomni", description=DESCRIPTION)
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="cmd", required=True)
    info = sub.add_parser("info", help="print a preset's sizes and parameter counts")
    info.add_argument("--preset", default="tiny", help=f"one of {list_presets()} or a JSON config path")
    info.add_argument("--with-encoder", action="store_true", help="include the Whisper encoder in the counts")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(fn=cmd_info)
    smoke = sub.add_parser("smoke", help="one spoken turn through a random model (10 s on the tiny preset)")
    add_smoke_args(smoke)
    smoke.set_defaults(fn=cmd_smoke)
    add_data_commands(sub)
    add_train_commands(sub)
    add_foundations_command(sub)
    add_export_hf_command(sub)
    add_serve_command(sub)
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"deepomni: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
