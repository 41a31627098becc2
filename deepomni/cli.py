"""``deepomni``: the command line of the whole system (``deepomni --help``; each command's ``--help``).

    data (synth | import | prepare)   datasets                   deepomni/data/cli.py
    train | profile | pairs | evaluate  one step of the recipe   deepomni/train/cli.py
    pipeline                          the whole recipe (`make demo`)
    foundations (build | verify)      the pretrained encoder and base LLM a run starts from
    export-hf                         a checkpoint as a transformers model directory
    serve                             the Ray Serve app
    info | smoke                      a preset's sizes; one spoken turn on random weights

The ``jobs/`` modules run the same commands under ``ray job submit --working-dir . -- python -m jobs.<name>``.
"""

from __future__ import annotations

import argparse
import json
import sys

from .config import add_flags, flag_values, list_presets, load_preset
from .data.cli import add_data_commands
from .foundations.cli import add_foundations_command
from .model.hf.cli import add_export_hf_command
from .serve.config import AppConfig
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


DEMO_OUT = "runs/demo"  # where `make demo` (deepomni pipeline --out runs/demo) writes


def demo_model(repo: str) -> tuple[str, str] | None:
    """``(checkpoint, codec spec)`` of the recipe model ``make demo`` trained (under the current directory
    or the source checkout), or None when there is none yet."""
    from pathlib import Path

    from .train.stages import MODELS
    from .weights import has_weights

    for root in dict.fromkeys((Path.cwd(), Path(repo))):
        out = root / DEMO_OUT
        ckpt, codec = out / "runs" / MODELS["deeptalk"] / "final", out / "data" / "codec"
        if has_weights(ckpt) and (codec / "config.json").is_file():
            return str(ckpt), f"builtin:{codec}"
    return None


def cmd_serve(args: argparse.Namespace) -> int:
    """The Serve app (serve_apps/, docs/serving.md) on the embedded local Ray, until Ctrl-C."""
    import os
    import signal
    import time
    from pathlib import Path

    repo = str(Path(__file__).resolve().parent.parent)
    if args.checkpoint is None and args.codec is None:
        found = demo_model(repo)
        if found is not None:
            args.checkpoint, args.codec = found
            print(f"serving the recipe model `make demo` trained: {args.checkpoint} (codec {args.codec})", flush=True)
        else:
            print(f"no trained model under {DEMO_OUT}/ (run `make demo` first, or pass --checkpoint): serving the "
                  f"tiny preset with RANDOM weights, which answers noise", flush=True)
    if (Path(repo) / "serve_apps").is_dir():  # a source checkout: serve_apps/ sits beside the package
        sys.path.insert(0, repo)
        # the embedded Ray's workers inherit this process's environment, not its sys.path
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)
    _check_port_free(args.host, args.port)  # first: refused before Ray or the Serve settings are touched
    from serve_apps import ray_mode

    # Serve's high-throughput mode, HAProxy's listeners on loopback and free ports, Ray's token auth: set before
    # Ray Serve is imported and the embedded Ray starts (serve_apps/ray_mode.py, docs/security.md)
    ray_mode.apply()
    from ray import serve
    from serve_apps.app import APP_NAME, build_app

    from .ray_env import init_ray

    app_args = flag_values(args, AppConfig, exclude=("api_key",))
    if args.app_config is not None:
        app_args["config"] = args.app_config
    if args.config is not None:
        app_args["serve_config"] = args.config
    app = build_app(app_args)  # checks the args before Ray starts
    _check_port_free(args.host, args.port)  # again: building the app took a while
    init_ray()
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app, name=APP_NAME, route_prefix="/")
    print(f"DeepOmni is serving on http://{args.host}:{args.port}/ (page); OpenAI-compatible /v1/chat/completions, "
          f"/v1/audio/transcriptions, /v1/audio/speech, /v1/models, WS /v1/realtime; native POST /v1/dialogue, "
          f"WS /v1/dialogue/ws. Ctrl-C stops it", flush=True)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # `kill` stops it as cleanly as Ctrl-C
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        import ray

        print("shutting down", flush=True)
        serve.shutdown()
        ray.shutdown()  # the embedded Ray this process started, and its workers
    return 0


def _check_port_free(host: str, port: int) -> None:
    """A clear error, before Ray starts, when the HTTP port is taken (another `deepomni serve`?)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: only a listener blocks it
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port} ({e.strerror}): another server (a second "
                             f"`deepomni serve`?) holds it; pass --port") from e


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
    srv = sub.add_parser("serve", help="run the Ray Serve app (docs/serving.md) on the embedded local Ray")
    srv.add_argument("--app-config", help="the app's settings: a serve preset "
                                          f"({', '.join(list_presets('serve'))}) or a JSON/YAML file; the flags "
                                          "below override it")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--config", help="Serve config whose deployments section sets replicas and autoscaling "
                                      "(default serve_apps/config.yaml, the only place that sets them)")
    add_flags(srv, AppConfig, exclude=("api_key",),  # a key on the command line would show in `ps`
              title=f"app settings (AppConfig; --checkpoint default: the recipe model `make demo` wrote under "
                    f"{DEMO_OUT}/, else a random tiny model)")
    srv.set_defaults(fn=cmd_serve)
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"deepomni: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
