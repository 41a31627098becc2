"""What listens, and where: every TCP listener of ``deepomni serve`` (its embedded Ray, Serve, HAProxy) and of
the development head (``cluster/local.sh``; :func:`check_head`, run by tests/test_cluster.py) is on loopback,
but for what Ray 2.60 cannot bind there (``ALLOWED``, guarded by Ray's token auth), and two ``deepomni serve``
on one machine (different ports) both start (docs/security.md)."""

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from serve_apps import ray_mode

ROOT = Path(__file__).resolve().parents[1]
# Listeners that Ray 2.60 cannot bind to loopback, and why; Ray's token auth must be on for each (checked: a
# call without the token is refused). Kept minimal: anything else beyond loopback fails the test.
ALLOWED = {
    "serve-replica-grpc": "each Serve replica's inter-deployment gRPC server: `add_port_to_grpc_server(self._server, "
                          "'[::]:0')`, hard-coded in ray/serve/_private/replica.py (_on_initialized), whatever the "
                          "node's address or Serve's settings; guarded by Ray's token auth interceptor",
}
WILDCARD = {"::", "0.0.0.0"}
HAPROXY = "RAY_SERVE_HAPROXY_BINARY_PATH" in ray_mode.serve_env()  # HAProxy in front: Ray found a binary
# what the processes under test inherit: none of the settings an earlier test of this session may have left in
# os.environ (ray_mode.apply, init_ray), so that the defaults are what is checked
CLEAN_PREFIXES = ("RAY_SERVE_", "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(CLEAN_PREFIXES)}
    return {**env, **extra}


def family(roots: list[int], marks: list[str]) -> dict[int, psutil.Process]:
    """The processes of ``roots`` and their descendants, plus every process of this user whose command line
    names one of ``marks`` (a session directory, a GCS address: Ray's daemons are re-parented when `ray start`
    exits) and their descendants."""
    found: dict[int, psutil.Process] = {}

    def add(p: psutil.Process) -> None:
        found[p.pid] = p
        try:
            found.update((c.pid, c) for c in p.children(recursive=True))
        except psutil.Error:
            pass

    for pid in roots:
        try:
            add(psutil.Process(pid))
        except psutil.Error:
            pass
    me = psutil.Process().username()
    for p in psutil.process_iter(["cmdline", "username"]):
        try:
            if p.info["username"] == me and any(m in a for a in p.info["cmdline"] or () for m in marks):
                add(p)
        except psutil.Error:
            pass
    return found


def session_dirs(procs: dict[int, psutil.Process]) -> list[str]:
    """The Ray session directories these processes name (``--session-dir=...``, ``--session_dir=...``)."""
    dirs = set()
    for p in procs.values():
        try:
            for a in p.cmdline():
                if a.startswith(("--session-dir=", "--session_dir=")):
                    dirs.add(a.split("=", 1)[1])
        except psutil.Error:
            pass
    return sorted(dirs)


def listeners(procs: dict[int, psutil.Process]) -> list[tuple[str, int, str, int]]:
    """``(address, port, process name, pid)`` of every listening TCP socket of these processes."""
    out = set()
    for p in procs.values():
        try:
            conns = p.net_connections(kind="inet")
            name = p.name()
        except psutil.Error:
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN:
                out.add((c.laddr.ip, c.laddr.port, name, p.pid))
    return sorted(out)


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def allowed(listener: tuple[str, int, str, int]) -> str | None:
    """The ALLOWED entry a listener beyond loopback falls under, if any."""
    address, _, _, pid = listener
    try:
        title = " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return None
    if address in WILDCARD and title.startswith("ray::ServeReplica"):
        return "serve-replica-grpc"
    return None


def exposed(found: list[tuple[str, int, str, int]]) -> list[tuple[str, int, str, int]]:
    return [l for l in found if not is_loopback(l[0]) and allowed(l) is None]


def refused_without_token(port: int, method: str) -> bool:
    """Whether a gRPC call without Ray's token to ``method`` on this port is refused as unauthenticated."""
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            channel.unary_unary(method)(b"", timeout=15)
        except grpc.RpcError as e:
            return e.code() == grpc.StatusCode.UNAUTHENTICATED
    return False


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


def check_head(gcs: int, ports: set[int]) -> dict[int, psutil.Process]:
    """The listeners of a started development head (`cluster/local.sh start`, GCS on ``gcs``) are on loopback,
    its ``ports`` among them, and its GCS refuses a call without Ray's token. Returns its processes. Called by
    tests/test_cluster.py, whose test starts the head anyway (one head start less for the suite)."""
    procs = family([], [f"127.0.0.1:{gcs}", f"--gcs_server_port={gcs}"])
    procs = family(list(procs), session_dirs(procs) or ["/nonexistent"])
    found = listeners(procs)
    # the listing saw the head: e.g. its GCS, dashboard, metrics, Ray client server and dashboard agent
    assert {gcs, *ports} <= {port for _, port, _, _ in found}, found
    assert not exposed(found), f"the development head listens beyond loopback: {exposed(found)}\nall: {found}"
    # Ray's token auth is on, for what a Serve app deployed there would listen on (ALLOWED)
    assert refused_without_token(gcs, "/ray.rpc.NodeInfoGcsService/GetAllNodeInfo")
    return procs


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
