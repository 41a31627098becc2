"""``deepomni serve``: the Serve app (this package, docs/serving.md) on the embedded local Ray, until Ctrl-C.

    deepomni serve [--checkpoint DIR --codec builtin:DIR] [--app-config PRESET|FILE] [--host H --port P]

Without a checkpoint it serves the recipe model ``make demo`` trained, else the tiny preset's random weights
(and says so). The flags are :class:`~deepomni.serve.config.AppConfig`'s fields; replicas and autoscaling
come from ``serve_apps/config.yaml`` (or ``--config``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from deepomni.config import add_flags, flag_values, list_presets
from deepomni.serve.config import AppConfig

DEMO_OUT = "runs/demo"  # where `make demo` (deepomni pipeline --out runs/demo) writes


def demo_model(repo: str) -> tuple[str, str] | None:
    """``(checkpoint, codec spec)`` of the recipe model ``make demo`` trained (under the current directory
    or the source checkout), or None when there is none yet."""

    from deepomni.train.stages import MODELS
    from deepomni.weights import has_weights

    for root in dict.fromkeys((Path.cwd(), Path(repo))):
        out = root / DEMO_OUT
        ckpt, codec = out / "runs" / MODELS["deeptalk"] / "final", out / "data" / "codec"
        if has_weights(ckpt) and (codec / "config.json").is_file():
            return str(ckpt), f"builtin:{codec}"
    return None


def cmd_serve(args: argparse.Namespace) -> int:
    """The Serve app (serve_apps/, docs/serving.md) on the embedded local Ray, until Ctrl-C."""
    import signal
    import time

    if args.checkpoint is None and args.codec is None:
        found = demo_model(str(Path(__file__).resolve().parent.parent))
        if found is not None:
            args.checkpoint, args.codec = found
            print(f"serving the recipe model `make demo` trained: {args.checkpoint} (codec {args.codec})", flush=True)
        else:
            print(f"no trained model under {DEMO_OUT}/ (run `make demo` first, or pass --checkpoint): serving the "
                  f"tiny preset with RANDOM weights, which answers noise", flush=True)
    _check_port_free(args.host, args.port)  # first: refused before Ray or the Serve settings are touched
    from . import ray_mode

    # Serve's high-throughput mode, HAProxy's listeners on loopback and free ports, Ray's token auth: set before
    # Ray Serve is imported and the embedded Ray starts (serve_apps/ray_mode.py, docs/security.md)
    ray_mode.apply()
    from ray import serve
    from deepomni.ray_env import init_ray

    from .app import APP_NAME, build_app

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


def add_serve_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``serve`` on ``subparsers``; it sets ``fn`` to :func:`cmd_serve`."""
    srv = subparsers.add_parser("serve", help="run the Ray Serve app (docs/serving.md) on the embedded local Ray")
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
    return srv
