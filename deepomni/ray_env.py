"""Connecting jobs to Ray: the cluster named by ``RAY_ADDRESS`` (set by ``ray job submit``), else an embedded
local instance sized for small machines, listening on loopback only."""

from __future__ import annotations

import os

LOCAL_NUM_CPUS = 4  # logical CPUs for the embedded Ray: on 2 cores, Ray Data inside trainers needs headroom
# Ray's switch for single-machine instances (its default on macOS and Windows; ray/_private/ray_constants.py
# ENABLE_RAY_CLUSTER): "0" makes the node's IP address the loopback one (ray/_private/services.py
# get_node_ip_address) instead of the machine's, and Ray 2.60 binds its servers to the node's address
# (docs/security.md lists each one). Read when Ray is imported; "1" keeps Ray's default (the machine's address).
SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def loopback_node() -> bool:
    """Make a Ray node started from this process a loopback-only one (see ``SINGLE_MACHINE``), unless the
    environment already says otherwise. Returns whether it is one."""
    os.environ.setdefault(SINGLE_MACHINE, "0")
    single = os.environ[SINGLE_MACHINE].strip().lower() in ("0", "false")
    from ray._private import ray_constants

    # Ray read the variable when it was imported, which may have been before this call: set what it read too.
    # Passing `_node_ip_address="127.0.0.1"` does not do it: ray.init turns a loopback address into the
    # machine's unless this switch is off (services.resolve_ip_for_localhost).
    ray_constants.ENABLE_RAY_CLUSTER = not single
    return single


def init_ray(num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        _reread_auth_mode()
        ray.init(log_to_driver=True)  # a cluster: its resources are its own
    else:
        # a private instance whose listeners are on loopback (tests/test_listeners.py): without Serve, token
        # auth would only get in the way of its own state API. Serve's replicas listen on every interface in
        # Ray 2.60: serve_apps.ray_mode.apply() (deepomni serve, the tests) turns token auth on before this.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # Ray Data 2.60's read_parquet starts 32 footer-reading actors per read (each ~2 s of CPU to start):
        # a cluster's worth, ~35 s of wall time on 2 cores for a handful of files
        os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "2")
        # Ray Train's controller looks at its workers every 2 s (ray/train/v2/_internal/constants.py), so a run
        # ends up to 2 s after its last step, and a dead worker is seen as late: local stages are short, look
        # every 0.5 s (~2 s less a stage; tests/test_recipe_pipeline.py runs ten)
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        loopback_node()
        _reread_auth_mode()
        # address="local": always a fresh private instance, even when a `ray start` cluster runs here
        ray.init(address="local", num_cpus=num_cpus or max(LOCAL_NUM_CPUS, os.cpu_count() or 1), include_dashboard=False,
                 log_to_driver=False)
        if os.environ["RAY_AUTH_MODE"].lower() == "token":
            private_token()


def _reread_auth_mode() -> None:
    """Ray caches its settings (RAY_AUTH_MODE among them) the first time it reads them; a RAY_AUTH_MODE set
    after that (serve_apps.ray_mode.apply() in a process that already used Ray, e.g. a test session) would reach
    the Ray processes started now but not this one, whose calls then lack the token. Read them again, as Ray
    does when it turns token auth on itself (ray/_private/authentication/authentication_token_setup.py)."""
    from ray._raylet import Config

    Config.initialize("")


def private_token() -> None:
    """Ray writes the token it generates (``~/.ray/auth_token``) with the umask's permissions, often readable
    by every user of the machine: make it this user's only."""
    from pathlib import Path

    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        if path.is_file() and path.stat().st_uid == os.getuid():
            path.chmod(0o600)
    except OSError:
        pass
