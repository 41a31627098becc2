"""The application builder: ``serve_apps.app:build_app`` (``config.yaml``'s ``import_path``).

    Ingress.bind(SpeechEncoder.bind(cfg), Backbone.bind(cfg, Vocoder.bind(cfg)), cfg)

One module per deployment: ``encoder.py`` (SpeechEncoder), ``backbone.py`` (Backbone), ``vocoder.py``
(Vocoder), ``ingress.py`` (Ingress); what they send each other is in ``deepomni/serve/messages.py``.

``args`` are :class:`~deepomni.serve.config.AppConfig`'s fields (``checkpoint``, ``codec``, ``tokenizer``, ...).
Replicas, autoscaling, ``max_ongoing_requests`` and ``num_cpus`` come from ``config.yaml`` only (the
decorators name the deployments and set nothing else): ``serve run/deploy serve_apps/config.yaml``
applies its ``deployments`` section itself, and :func:`build_app` applies the same section when it is
called another way (``deepomni serve``, tests, ``serve run serve_apps.app:build_app``). ``serve_config:
PATH`` in ``args`` uses another Serve config file instead; it must set every deployment.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from ray.serve import Application

from deepomni.serve.config import AppConfig

from .backbone import Backbone
from .encoder import SpeechEncoder
from .ingress import Ingress
from .vocoder import Vocoder

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
    serve_config = args.pop("serve_config", None) or CONFIG_YAML
    if str(serve_config).lower() == "none":
        raise ValueError("serve_config must be a Serve config file: the deployments' settings live only there "
                         f"(default {CONFIG_YAML})")
    cfg = AppConfig.from_args(args)
    opts = deployment_options(serve_config)
    missing = [d.name for d in (Ingress, SpeechEncoder, Backbone, Vocoder) if d.name not in opts]
    if missing:  # the decorators set nothing: a deployment left out would run on Ray Serve's bare defaults
        raise ValueError(f"{serve_config}: no settings for the deployments {missing} (serve_apps/config.yaml "
                         f"sets every deployment's replicas, autoscaling, max_ongoing_requests and num_cpus)")

    def bind(deployment, *a):
        return deployment.options(**opts[deployment.name]).bind(*a)

    return bind(Ingress, bind(SpeechEncoder, cfg), bind(Backbone, cfg, bind(Vocoder, cfg)), cfg)
