"""What listens, and where: every TCP listener of ``deepomni serve`` (its embedded Ray, Serve, HAProxy) and of
the development head (``cluster/local.sh``; ``check_head`` in tests/helpers/net.py, run by tests/test_cluster.py)
is on loopback, but for what Ray 2.60 cannot bind there (``ALLOWED`` in tests/helpers/net.py, guarded by Ray's
token auth), and two ``deepomni serve`` on one machine (different ports) both start (docs/security.md)."""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from benchmarks.harness import free_port
from serve_apps import ray_mode
from tests.helpers.net import clean_env, exposed, family, is_loopback, listeners, refused_without_token, session_dirs

ROOT = Path(__file__).resolve().parents[1]
HAPROXY = "RAY_SERVE_HAPROXY_BINARY_PATH" in ray_mode.serve_env()  # HAProxy in front: Ray found a binary


def start_server(tmp_path: Path, port: int, tag: str) -> subprocess.Popen:
    log = open(tmp_path / f"serve-{tag}.log", "w")
    # Serve's proxy must be ready within 3 x 5 s of its actor's creation; a loaded 2-core machine can miss that
    # (Serve then kills it and `serve.start` fails): more time, which changes nothing this test looks at
    env = clean_env(PYTHONPATH=str(ROOT), RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S="30",
                    RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S="30")
    return subprocess.Popen([sys.executable, "-m", "deepomni.cli", "serve", "--port", str(port)], cwd=tmp_path,
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def healthz(port: int) -> int | None:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).status
    except OSError:
        return None


def stop_server(proc: subprocess.Popen) -> None:
    """After SIGTERM (`deepomni serve` then stops Serve and its embedded Ray)."""
    try:
        proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: whatever it left behind
    except OSError:
        pass


def check_server(server: subprocess.Popen, port: int, tag: str) -> None:
    procs = family([server.pid], [])
    procs = family([server.pid], session_dirs(procs) or ["/nonexistent"])
    found = listeners(procs)
    names = {name for _, _, name, _ in found}
    # the listing saw the server: its HTTP port, its Ray (GCS, raylet), HAProxy's three listeners when it runs
    assert port in {p for _, p, _, _ in found} and {"gcs_server", "raylet"} <= names, found
    if HAPROXY:  # Serve's high-throughput mode (serve_apps/ray_mode.py): its HTTP frontend, stats and exporter
        assert sum(name == "haproxy" for _, _, name, _ in found) >= 3, found
    assert not exposed(found), f"`deepomni serve` {tag} listens beyond loopback: {exposed(found)}\n{found}"
    for listener in found:
        if not is_loopback(listener[0]):  # ALLOWED: Ray's token auth guards it
            assert refused_without_token(listener[1], "/ray.serve.ASGIService/HandleRequest"), listener


def wait_healthy(tmp_path: Path, servers: list[tuple[subprocess.Popen, int, str]], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while any(healthz(port) != 200 for _, port, _ in servers):
        died = [tag for server, _, tag in servers if server.poll() is not None]
        assert not died and time.monotonic() < deadline, "\n".join(
            f"--- serve {tag}:\n" + (tmp_path / f"serve-{tag}.log").read_text()[-3000:] for _, _, tag in servers)
        time.sleep(0.5)


def test_two_servers_listen_on_loopback_only(tmp_path):
    """One `deepomni serve`, then a second one beside the first (one after the other: on 2 cores, two starting
    at once can starve Serve's proxy health checks). The development head: tests/test_cluster.py."""
    servers = []
    try:
        port_a = free_port()
        servers.append((start_server(tmp_path, port_a, "a"), port_a, "a"))
        wait_healthy(tmp_path, servers)
        port_b = free_port()
        servers.append((start_server(tmp_path, port_b, "b"), port_b, "b"))
        check_server(*servers[0])  # while server b starts
        wait_healthy(tmp_path, servers)
        check_server(*servers[1])
        wait_healthy(tmp_path, servers, timeout=60)  # both answer, side by side (a 5 s probe can miss on 2 busy cores)
    finally:
        for server, _, _ in servers:
            if server.poll() is None:
                server.send_signal(signal.SIGTERM)  # both at once: `deepomni serve` stops Serve and its Ray
        for server, _, _ in servers:
            stop_server(server)


def test_the_haproxy_wrapper_binds_stats_and_metrics_to_loopback_only(tmp_path):
    """On the configuration Ray 2.60 writes (rendered by Ray itself, HTTP on every interface): the wrapper
    rewrites the stats and Prometheus binds to loopback, leaves the HTTP frontend as Serve asked, and runs
    HAProxy (here its configuration check) with Ray's arguments."""
    from ray.serve._private.haproxy import HAProxyApi, HAProxyConfig
    from ray.serve.config import HTTPOptions

    real = ray_mode._real_haproxy()
    if real is None:
        pytest.skip("no HAProxy binary")
    cfg = HAProxyConfig(http_options=HTTPOptions(host="0.0.0.0", port=8000), stats_port=18404, metrics_port=19101,
                        socket_path=str(tmp_path / "admin.sock"), server_state_base=str(tmp_path),
                        server_state_file=str(tmp_path / "state"), metrics_socket_path=str(tmp_path / "m.sock"))
    config = tmp_path / "haproxy.cfg"
    HAProxyApi(cfg=cfg, config_file_path=str(config))._generate_config_file_internal()
    binds = lambda: sorted(l.split()[1] for l in config.read_text().splitlines() if l.strip().startswith("bind "))
    assert binds() == ["*:18404", "*:8000", ":19101"]  # Ray's template: every interface
    wrapper = ray_mode.loopback_haproxy(real, str(tmp_path))
    checked = subprocess.run([wrapper, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert binds() == ["*:8000", "127.0.0.1:18404", "127.0.0.1:19101"]
    assert os.stat(wrapper).st_mode & 0o077 == 0  # only this user may run (or replace) it
