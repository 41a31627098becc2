"""How the Ray processes that run the app are started: Ray Serve's high-throughput mode (Ray >= 2.56).

    RAY_SERVE_THROUGHPUT_OPTIMIZED=1   gRPC between deployments, user code on each replica's own event loop
    RAY_SERVE_ENABLE_HA_PROXY=1        HAProxy (a C load balancer) in front of the Ingress replicas instead of
                                       Ray's Python HTTP proxy: one Python hop less each way

Measured on the tiny preset (2 CPU cores, one spoken question, medians of 30): the seven Serve hops on the
way to the first audio (client -> Ingress -> SpeechEncoder -> Ingress -> Backbone -> Vocoder -> Backbone ->
Ingress -> client) took 28 ms with Ray's defaults and 14 ms in this mode (``docs/serving.md``).

These are environment variables of the Ray processes (the Serve controller and the replicas read them when
they start), so they must be set before Ray starts: ``deepomni serve``, the tests and
``benchmarks/serve_latency.py`` call :func:`apply` before their embedded Ray starts, ``cluster/local.sh
start`` exports :func:`serve_env` before ``ray start``, and the KubeRay manifests set them on every Ray
container (the image installs haproxy). Without an ``haproxy`` binary the Python proxy stays and the rest of
the mode still applies. ``DEEPOMNI_SERVE_MODE=default`` keeps Ray's defaults entirely.
"""

from __future__ import annotations

import os
import shutil

THROUGHPUT = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
HAPROXY = {**THROUGHPUT, "RAY_SERVE_ENABLE_HA_PROXY": "1"}
NO_HAPROXY = {**THROUGHPUT, "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}  # the mode's other parts, Ray's HTTP proxy
# A replica behind HAProxy drains for this long before it stops (Ray's default, 30 s, gives external load
# balancers time to deregister it). A machine's own embedded Ray has none: stop in a second.
LOCAL = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}


def serve_env(local: bool = True) -> dict[str, str]:
    """The variables for a Ray started on this machine (``local``: an embedded or development instance)."""
    if os.environ.get("DEEPOMNI_SERVE_MODE", "").lower() == "default":
        return {}
    haproxy = shutil.which("haproxy") or os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    env = dict(HAPROXY if haproxy else NO_HAPROXY)
    if local and haproxy:
        env.update(LOCAL)
    return env


def apply() -> dict[str, str]:
    """Put :func:`serve_env` into this process's environment, keeping what is already set, so that a Ray
    started from here (``ray.init``) passes it to its processes. Returns what is now in effect."""
    env = serve_env()
    for k, v in env.items():
        os.environ.setdefault(k, v)
    return {k: os.environ[k] for k in env}


if __name__ == "__main__":  # shell: eval "$(python -m serve_apps.ray_mode)"
    print(" ".join(f"export {k}={v};" for k, v in serve_env().items()))
