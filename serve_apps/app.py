"""The application builder: ``serve_apps.app:build_app`` (``config.yaml``'s ``import_path``).

    Ingress.bind(SpeechEncoder.bind(cfg), Backbone.bind(cfg, Vocoder.bind(cfg)), cfg)

``args`` are :class:`~serve_apps.loading.AppConfig`'s fields (``checkpoint``, ``codec``, ``tokenizer``, ...).
Replicas and autoscaling come from ``config.yaml``: ``serve run/deploy serve_apps/config.yaml`` applies
its ``deployments`` section itself, and :func:`build_app` applies the same section when it is called
another way (``deepomni serve``, tests, ``serve run serve_apps.app:build_app``), so the YAML is the one
place that sets them. Pass ``serve_config: none`` to skip that (or a path to use another file).
"""

from __future__ import annotations

from pathlib import Path

import yaml
from ray.serve import Application

from .deployments import Backbone, SpeechEncoder, Vocoder
from .ingress import Ingress
from .loading import AppConfig

CONFIG_YAML = Path(__file__).parent / "config.yaml"
APP_NAME = "deepomni"


def deployment_options(path: str | Path = CONFIG_YAML, app_name: str = APP_NAME) -> dict[str, dict]:
    """``{deployment name: options}`` of one application in a Serve config file."""
    doc = yaml.safe_load(Path(path).read_text())
    apps = [a for a in doc.get("applications", []) if a.get("name") == app_name] or doc.get("applications", [])[:1]
    if not apps:
        raise ValueError(f"{path}: no application in this Serve config")
    out = {}
    for d in apps[0].get("deployments", []):
        d = dict(d)
        out[d.pop("name")] = d
    return out


def build_app(args: dict) -> Application:
    """The Serve application for ``args`` (see the module docstring)."""
    args = dict(args or {})
    serve_config = args.pop("serve_config", CONFIG_YAML)
    cfg = AppConfig.from_args(args)
    opts = {} if str(serve_config).lower() in ("none", "") else deployment_options(serve_config)

    def bind(deployment, *a):
        return deployment.options(**opts.get(deployment.name, {})).bind(*a)

    return bind(Ingress, bind(SpeechEncoder, cfg), bind(Backbone, cfg, bind(Vocoder, cfg)), cfg)
