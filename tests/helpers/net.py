"""The processes of a Ray node on this machine and what they listen on: every TCP listener on loopback but for
what Ray 2.60 cannot bind there (``ALLOWED``, guarded by Ray's token auth); the development head's check
(:func:`check_head`); an environment for the processes under test without an earlier test's Ray settings
(:func:`clean_env`)."""

from __future__ import annotations

import ipaddress
import os

import psutil

# Listeners that Ray 2.60 cannot bind to loopback, and why; Ray's token auth must be on for each (checked: a
# call without the token is refused). Kept minimal: anything else beyond loopback fails the test.
ALLOWED = {
    "serve-replica-grpc": "each Serve replica's inter-deployment gRPC server: `add_port_to_grpc_server(self._server, "
                          "'[::]:0')`, hard-coded in ray/serve/_private/replica.py (_on_initialized), whatever the "
                          "node's address or Serve's settings; guarded by Ray's token auth interceptor",
}
WILDCARD = {"::", "0.0.0.0"}
# what the processes under test inherit: none of the settings an earlier test of this session may have left in
# os.environ (ray_mode.apply, init_ray), so that the defaults are what is checked
CLEAN_PREFIXES = ("RAY_SERVE_", "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")


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
