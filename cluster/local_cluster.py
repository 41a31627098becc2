"""A multi-node Ray cluster on this machine, to try what only a cluster has (placement across nodes, objects
moving between object stores, a node lost, a network partition) before a real one. ``cluster/local.sh`` runs it
when asked for more than one node; docs/operations.md ("Several nodes on one machine").

    cluster/local.sh start --nodes 3     # a head and 2 worker nodes: head, n1, n2
    eval "$(cluster/local.sh env)"       # then ray job submit / serve deploy as with one node
    cluster/local.sh status              # the nodes: name, address, label, processes, link, Ray's view
    cluster/local.sh add-node            # one more worker node (n3: a replacement, say)
    cluster/local.sh kill-node n1        # SIGKILL every process of node n1 (a machine lost)
    cluster/local.sh restart-node n1     # Ray on n1 again: a new Ray node at the same address and label
    cluster/local.sh cut n2              # cut node n2's link (a partition) ...
    cluster/local.sh heal n2             # ... and restore it
    cluster/local.sh exec head -- ray list nodes   # a command inside a node's network
    cluster/local.sh stop                # every process of every node, then the namespaces

Each node is a real Ray node (``ray start``: its own raylet, object store, workers and agents, ``--num-cpus``
of its own) with the Ray label ``node=<name>`` (``label_selector={"node": "n1"}`` asks for it; Ray's
``ray.io/node-id`` names it too), in its own **network namespace**: an ``eth0`` with its own address on a
bridge that lives in one more namespace of the cluster (the hub), nothing routed beyond it. So every listener
of the cluster is inside namespaces this script made, whatever Ray binds to (it binds to every interface of
a node whose address is not 127.0.0.1), the nodes see each other as separate machines do, a node's processes
are exactly those of its namespace (``ip netns pids``: what ``kill-node`` kills), and a partition is a link
set down. Network namespaces need root (``ip netns``); without it a multi-node cluster is refused with that
reason, and ``start`` without ``--nodes`` keeps the one-node loopback head of ``cluster/local.sh``.

From this machine's loopback the head is reached as with one node: a small forwarder (``forward``, started
by ``start``) listens on ``127.0.0.1`` for the dashboard (job submission, ``serve deploy``), the metrics, the
Ray client server and Serve's HTTP port, and connects each connection inside the head's namespace.

On a real cluster the same roles are ``ray up cluster/launcher.yaml`` (head + worker node types) or KubeRay
(head group + worker groups): a node's label there comes from ``ray start --labels`` in the node type's or
group's start command (``rayStartParams``), and ``/shared`` plays this machine's shared file system.

Ports and sizes (environment, as ``cluster/local.sh``): DEEPOMNI_GCS_PORT 6379, DEEPOMNI_DASHBOARD_PORT 8265,
DEEPOMNI_METRICS_PORT 8080, DEEPOMNI_CLIENT_PORT 10001, DEEPOMNI_AGENT_PORT 52365, DEEPOMNI_SERVE_PORT 8000
(forwarded), DEEPOMNI_NUM_CPUS 2 (logical CPUs per node), DEEPOMNI_OBJECT_STORE_MB 512 (per node).

Longer than 450 lines because it is one standard-library program that ``cluster/local.sh`` runs as root
before anything is installed (it imports nothing of the project), and its commands share the cluster's
bookkeeping (namespaces, nodes, ports) defined once at the top.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBNET = "10.213.0"  # inside the cluster's namespaces only: never routed, so any subnet would do
CLONE_NEWNET = 0x40000000


@dataclass
class Ports:
    gcs: int
    dashboard: int
    metrics: int
    client: int
    agent: int
    serve: int

    @classmethod
    def from_env(cls) -> "Ports":
        env = os.environ.get
        return cls(gcs=int(env("DEEPOMNI_GCS_PORT", 6379)), dashboard=int(env("DEEPOMNI_DASHBOARD_PORT", 8265)),
                   metrics=int(env("DEEPOMNI_METRICS_PORT", 8080)), client=int(env("DEEPOMNI_CLIENT_PORT", 10001)),
                   agent=int(env("DEEPOMNI_AGENT_PORT", 52365)), serve=int(env("DEEPOMNI_SERVE_PORT", 8000)))

    def forwarded(self) -> list[int]:
        """The head's ports reachable from this machine's loopback."""
        return [self.dashboard, self.metrics, self.client, self.serve]


@dataclass
class Node:
    name: str
    address: str
    head: bool = False
    killed: bool = False  # by kill-node: its namespace stays (its address is not reused), its processes are gone


@dataclass
class Cluster:
    ports: Ports
    nodes: dict[str, Node] = field(default_factory=dict)
    forwarder: int | None = None  # pid
    cpus: float = field(default_factory=lambda: float(os.environ.get("DEEPOMNI_NUM_CPUS", 2)))
    object_store_mb: int = field(default_factory=lambda: int(os.environ.get("DEEPOMNI_OBJECT_STORE_MB", 512)))

    # ----------------------------------------------------------------------------- names and state
    @property
    def prefix(self) -> str:
        return f"deepomni{self.ports.gcs}"  # two clusters (different GCS ports) never share a name

    @property
    def hub(self) -> str:
        return f"{self.prefix}-hub"

    def netns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def link(self, name: str) -> str:
        """The bridge-side end of a node's link, in the hub (what ``cut`` sets down)."""
        return f"d{self.ports.gcs}{name}"[:15]

    @property
    def head(self) -> Node:
        return next(n for n in self.nodes.values() if n.head)

    @staticmethod
    def state_file(ports: Ports) -> Path:
        return Path(tempfile.gettempdir()) / f"deepomni-cluster-{ports.gcs}" / "cluster.json"

    @property
    def dir(self) -> Path:
        return self.state_file(self.ports).parent

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state_file(self.ports).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, ports: Ports) -> "Cluster | None":
        try:
            d = json.loads(cls.state_file(ports).read_text())
        except OSError:
            return None
        return cls(ports=Ports(**d["ports"]), nodes={k: Node(**v) for k, v in d["nodes"].items()},
                   forwarder=d["forwarder"], cpus=d["cpus"], object_store_mb=d["object_store_mb"])

    def next_name(self) -> str:
        k = 1
        while f"n{k}" in self.nodes:
            k += 1
        return f"n{k}"

    # ----------------------------------------------------------------------------- processes
    def pids(self, name: str) -> list[int]:
        """Every process of a node: those in its network namespace."""
        r = subprocess.run(["ip", "netns", "pids", self.netns(name)], capture_output=True, text=True)
        return [int(p) for p in r.stdout.split()] if r.returncode == 0 else []

    def env(self) -> dict[str, str]:
        venv = Path(os.environ.get("DEEPOMNI_VENV", ROOT / ".venv"))
        # not Ray's single-machine switch of the one-node head (cluster/local.sh): `ray start --address` refuses
        # to join a node under it, and nothing needs it here (every address is inside the namespaces)
        base = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
        return {**base, "PATH": f"{venv / 'bin'}:{os.environ.get('PATH', '')}",
                # torch.distributed's gloo finds its interface by name, not by the hostname (which resolves to
                # an address outside the namespace): every node's interface is eth0, as on a machine
                "GLOO_SOCKET_IFNAME": "eth0",
                "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}

    def in_node(self, name: str, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns(name), *cmd]


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


def _namespaces() -> list[str]:
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def require_netns() -> None:
    if shutil.which("ip") is None:
        sys.exit("a multi-node local cluster needs iproute2's `ip` (apt-get install iproute2)")
    if os.geteuid() != 0:
        sys.exit("a multi-node local cluster puts each node in its own network namespace, which needs root "
                 "(`sudo cluster/local.sh start --nodes N`); without --nodes, `cluster/local.sh start` starts "
                 "the one-node loopback head")


# --------------------------------------------------------------------------------------- network
def make_hub(c: Cluster) -> None:
    _ip("netns", "add", c.hub)
    _ip("-n", c.hub, "link", "add", "br0", "type", "bridge")
    _ip("-n", c.hub, "link", "set", "br0", "up")


def make_node_network(c: Cluster, node: Node) -> None:
    """The node's namespace: loopback, and eth0 (``node.address``/24) linked to the hub's bridge."""
    ns, outer = c.netns(node.name), c.link(node.name)
    inner = outer[:14] + "i"  # its peer's name while in this namespace (names: 15 characters at most)
    _ip("netns", "add", ns)
    _ip("-n", ns, "link", "set", "lo", "up")
    _ip("link", "add", inner, "type", "veth", "peer", "name", outer)
    _ip("link", "set", outer, "netns", c.hub)
    _ip("link", "set", inner, "netns", ns)
    _ip("-n", ns, "link", "set", inner, "name", "eth0")
    _ip("-n", ns, "addr", "add", f"{node.address}/24", "dev", "eth0")
    _ip("-n", ns, "link", "set", "eth0", "up")
    _ip("-n", c.hub, "link", "set", outer, "master", "br0", "up")


# --------------------------------------------------------------------------------------- Ray
def ray_start(c: Cluster, node: Node) -> None:
    args = ["ray", "start", "--node-ip-address", node.address, "--num-cpus", f"{c.cpus:g}",
            "--object-store-memory", str(c.object_store_mb * 2**20), "--labels", f"node={node.name}",
            "--disable-usage-stats",
            # a node's own temporary directory, as on its own machine: nodes sharing /tmp/ray would share their
            # runtime_resources (the jobs' unpacked working directories), which each node's agent manages alone
            "--temp-dir", str(c.dir / node.name)]
    if node.head:
        p = c.ports
        args += ["--head", "--port", str(p.gcs), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                 "--dashboard-port", str(p.dashboard), "--dashboard-agent-listen-port", str(p.agent),
                 "--ray-client-server-port", str(p.client), "--metrics-export-port", str(p.metrics)]
    else:
        args += ["--address", f"{c.head.address}:{c.ports.gcs}"]
    env = {**c.env(), **node_failure_detection()}
    log = c.dir / f"{node.name}.log"
    with open(log, "w") as out:
        r = subprocess.run(c.in_node(node.name, *args), env=env, stdout=out, stderr=subprocess.STDOUT,
                           timeout=180)
    if r.returncode:
        raise RuntimeError(f"ray start on node {node.name} failed ({log}):\n{log.read_text()[-2000:]}")


def node_failure_detection() -> dict[str, str]:
    """How soon the head's GCS marks a silent node dead (Ray's health checks of each raylet): every period, a
    check that fails after the timeout; dead after threshold failures in a row. Ray's defaults (3 s, 10 s, 5)
    take ~50 s for a partitioned node (a killed one, whose checks fail at once, ~15 s); here 1 s, 2 s, 3: a
    partitioned node is dead within ~9 s, its actors' calls fail and Serve replaces its replicas elsewhere
    (docs/operations.md). The environment's RAY_health_check_* win."""
    defaults = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "2000",
                "RAY_health_check_failure_threshold": "3",
                "RAY_grpc_client_keepalive_time_ms": "1000", "RAY_grpc_client_keepalive_timeout_ms": "2000"}
    return {k: os.environ.get(k, v) for k, v in defaults.items()}


def auth_header(mode: str | None = None) -> dict[str, str]:
    """Ray's token as an HTTP header (``mode``: Ray's auth mode, RAY_AUTH_MODE's by default)."""
    if (mode or os.environ.get("RAY_AUTH_MODE", "token")) != "token":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN")
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
        token = path.read_text().strip() if path.exists() else ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def ray_nodes(c: Cluster, auth_mode: str | None = None) -> list[dict]:
    """Ray's nodes as its state API lists them (through the forwarded dashboard)."""
    req = urllib.request.Request(f"http://127.0.0.1:{c.ports.dashboard}/api/v0/nodes?limit=1000&detail=1",
                                 headers=auth_header(auth_mode))
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())["data"]["result"]["result"]


def wait_alive(c: Cluster, names: list[str], timeout: float = 180) -> None:
    """Until Ray lists a live node labelled with each of ``names`` (a job submitted at once may be placed there)
    and the head's job agent answers (job submission goes through it)."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            alive = {n.get("labels", {}).get("node") for n in ray_nodes(c) if n.get("state") == "ALIVE"}
            agent = subprocess.run(c.in_node("head", "curl", "-sf", "-o", "/dev/null", "-H",
                                             "@" + str(c.dir / "auth_header"),
                                             f"http://127.0.0.1:{c.ports.agent}/api/local_raylet_healthz"),
                                   timeout=10).returncode == 0
            if set(names) <= alive and agent:
                return
            last = f"alive: {sorted(n for n in alive if n)}, job agent {'up' if agent else 'not yet up'}"
        except (OSError, ValueError, KeyError, subprocess.TimeoutExpired) as e:
            last = repr(e)
        time.sleep(1)
    raise TimeoutError(f"nodes {names} not all alive after {timeout:.0f} s ({last})")


def write_auth_header(c: Cluster) -> None:
    """The token header for curl, in a file only this user reads (not on a command line everyone reads)."""
    f = c.dir / "auth_header"
    f.touch(mode=0o600)
    f.write_text("".join(f"{k}: {v}\n" for k, v in auth_header().items()))


# --------------------------------------------------------------------------------------- forwarder
def forward(netns: str, ports: list[int]) -> None:
    """Listen on this machine's 127.0.0.1 for each of ``ports``, then enter ``netns`` and relay every
    connection to the same port there (its loopback first, else its eth0 address). A socket keeps the
    namespace it was made in: the listeners stay here, the connections they relay are made there."""
    listeners = []
    for port in ports:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(128)
        listeners.append(s)
    fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
    if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), f"setns {netns}")
    os.close(fd)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    def relay(port: int):
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            for host in ("127.0.0.1", f"{SUBNET}.1"):
                try:
                    up_reader, up_writer = await asyncio.open_connection(host, port)
                    break
                except OSError:
                    continue
            else:
                writer.close()
                return
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        return handle

    async def main() -> None:
        servers = [await asyncio.start_server(relay(s.getsockname()[1]), sock=s) for s in listeners]
        await asyncio.gather(*(srv.serve_forever() for srv in servers))

    asyncio.run(main())


# --------------------------------------------------------------------------------------- commands
def start(ports: Ports, nodes: int) -> None:
    require_netns()
    if Cluster.load(ports) is not None:
        sys.exit(f"a local cluster on GCS port {ports.gcs} is already up (cluster/local.sh status | stop)")
    c = Cluster(ports=ports)
    if any(ns.startswith(c.prefix + "-") for ns in _namespaces()):
        sys.exit(f"namespaces {c.prefix}-* are left from an earlier cluster: `cluster/local.sh stop` removes them")
    c.nodes["head"] = Node("head", f"{SUBNET}.1", head=True)
    for k in range(1, nodes):
        c.nodes[f"n{k}"] = Node(f"n{k}", f"{SUBNET}.{k + 1}")
    c.save()
    try:
        make_hub(c)
        for node in c.nodes.values():
            make_node_network(c, node)
        t0 = time.monotonic()
        ray_start(c, c.head)
        fwd_log = open(c.dir / "forwarder.log", "w")
        c.forwarder = subprocess.Popen(
            [sys.executable, __file__, "forward", c.netns("head"), *map(str, ports.forwarded())],
            stdout=fwd_log, stderr=subprocess.STDOUT, start_new_session=True).pid
        c.save()
        for node in c.nodes.values():
            if not node.head:
                ray_start(c, node)
        write_auth_header(c)
        wait_alive(c, list(c.nodes))
    except BaseException:
        print("start failed: stopping what was started", file=sys.stderr)
        stop(ports)
        raise
    print(f"{len(c.nodes)} Ray nodes up in {time.monotonic() - t0:.0f} s: "
          + ", ".join(f"{n.name} {n.address}" for n in c.nodes.values()))
    print(f"dashboard http://127.0.0.1:{ports.dashboard}  metrics http://127.0.0.1:{ports.metrics}/metrics  "
          f"Serve http://127.0.0.1:{ports.serve} (forwarded into the head's namespace)")
    print("submit jobs with: eval \"$(cluster/local.sh env)\"; ray job submit --working-dir . -- python -m jobs.<name>")


def add_node(ports: Ports, name: str | None) -> None:
    c = _cluster(ports)
    name = name or c.next_name()
    if name in c.nodes:
        sys.exit(f"node {name} exists (names are not reused, so that Ray's view stays readable): pick another")
    used = {n.address for n in c.nodes.values()}
    address = next(f"{SUBNET}.{i}" for i in range(2, 255) if f"{SUBNET}.{i}" not in used)
    node = c.nodes[name] = Node(name, address)
    c.save()
    make_node_network(c, node)
    ray_start(c, node)
    wait_alive(c, [name])
    print(f"node {name} {address} up")


def sigkill_all(c: Cluster, name: str, timeout: float = 10) -> set[int]:
    """SIGKILL every process of the node until none is left (one may be starting as the others die)."""
    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    while (pids := c.pids(name)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    if c.pids(name):
        raise RuntimeError(f"node {name}: processes {c.pids(name)} still there {timeout:.0f} s after SIGKILL")
    return killed


def kill_node(ports: Ports, name: str) -> None:
    c = _cluster(ports)
    node = _node(c, name)
    if node.head:
        sys.exit("the head is the cluster: `cluster/local.sh stop` stops it")
    killed = sigkill_all(c, name)
    node.killed = True
    c.save()
    print(f"node {name}: its {len(killed)} processes SIGKILLed")


def restart_node(ports: Ports, name: str) -> None:
    """Ray on a worker node again, in its namespace, at its address: a new Ray node (Ray never takes back a node
    it marked dead: after a partition its raylet exits once the link returns). What is left of the old one is
    SIGKILLed first."""
    c = _cluster(ports)
    node = _node(c, name)
    if node.head:
        sys.exit("the head is the cluster: `cluster/local.sh stop`, then `start`")
    sigkill_all(c, name)
    node.killed = False
    c.save()
    ray_start(c, node)
    wait_alive(c, [name])
    print(f"node {name} {node.address} up again")


def set_link(ports: Ports, name: str, up: bool) -> None:
    c = _cluster(ports)
    _node(c, name)
    _ip("-n", c.hub, "link", "set", c.link(name), "up" if up else "down")
    print(f"node {name}: link {'restored' if up else 'cut'}")


def status(ports: Ports) -> None:
    c = _cluster(ports)
    try:
        ray = {n.get("labels", {}).get("node"): n.get("state") for n in ray_nodes(c)
               if n.get("state") == "ALIVE"}
    except OSError as e:
        ray = {}
        print(f"(the dashboard does not answer: {e})")
    print(f"{'node':6} {'address':12} {'processes':>9} {'link':5} ray")
    for n in c.nodes.values():
        r = subprocess.run(["ip", "-n", c.hub, "-br", "link", "show", c.link(n.name)], capture_output=True,
                           text=True)
        link = "up" if " UP " in f" {r.stdout} " else "down"
        print(f"{n.name:6} {n.address:12} {len(c.pids(n.name)):9d} {link:5} {ray.get(n.name, 'not alive')}"
              + (" (killed)" if n.killed else ""))


def stop(ports: Ports) -> None:
    """Every process of every node of this cluster (SIGTERM, SIGKILL 5 s later), the forwarder, the namespaces."""
    c = Cluster.load(ports) or Cluster(ports=ports)
    names = [ns for ns in _namespaces() if ns.startswith(c.prefix + "-")]
    nodes = [ns for ns in names if ns != c.hub]

    def ns_pids(ns: str) -> list[int]:
        r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
        return [int(p) for p in r.stdout.split()]

    stopped = 0
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        pids = [p for ns in nodes for p in ns_pids(ns)]
        stopped = max(stopped, len(pids))
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(ns_pids(ns) for ns in nodes):
            time.sleep(0.2)
    if c.forwarder:
        try:
            os.kill(c.forwarder, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for ns in names:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    shutil.rmtree(c.dir, ignore_errors=True)
    print(f"stopped {stopped} processes of {len(nodes)} nodes on GCS port {ports.gcs}" if names
          else f"no local cluster on GCS port {ports.gcs}")


def exec_in(ports: Ports, name: str, cmd: list[str]) -> None:
    c = _cluster(ports)
    _node(c, name)
    if not cmd:
        sys.exit("usage: cluster/local.sh exec NODE -- COMMAND...")
    os.execvpe("ip", c.in_node(name, *cmd), c.env())


def _cluster(ports: Ports) -> Cluster:
    c = Cluster.load(ports)
    if c is None:
        sys.exit(f"no multi-node local cluster on GCS port {ports.gcs} (cluster/local.sh start --nodes N)")
    return c


def _node(c: Cluster, name: str) -> Node:
    if name not in c.nodes:
        sys.exit(f"no node {name!r}: the nodes are {', '.join(c.nodes)}")
    return c.nodes[name]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="cluster/local.sh", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("start").add_argument("--nodes", type=int, required=True, help="Ray nodes, the head included")
    sub.add_parser("add-node").add_argument("name", nargs="?", help="default: the next free n<k>")
    for cmd in ("kill-node", "restart-node", "cut", "heal"):
        sub.add_parser(cmd).add_argument("name")
    sub.add_parser("status")
    sub.add_parser("stop")
    e = sub.add_parser("exec")
    e.add_argument("name")
    e.add_argument("command", nargs=argparse.REMAINDER)
    f = sub.add_parser("forward")  # internal: started by `start`
    f.add_argument("netns")
    f.add_argument("ports", type=int, nargs="+")
    a = p.parse_args(argv)
    ports = Ports.from_env()
    if a.cmd == "start":
        if a.nodes < 2:
            sys.exit("--nodes must be >= 2 here (one node: `cluster/local.sh start` without --nodes)")
        start(ports, a.nodes)
    elif a.cmd == "add-node":
        add_node(ports, a.name)
    elif a.cmd == "kill-node":
        kill_node(ports, a.name)
    elif a.cmd == "restart-node":
        restart_node(ports, a.name)
    elif a.cmd in ("cut", "heal"):
        set_link(ports, a.name, up=a.cmd == "heal")
    elif a.cmd == "status":
        status(ports)
    elif a.cmd == "stop":
        stop(ports)
    elif a.cmd == "exec":
        exec_in(ports, a.name, a.command[1:] if a.command[:1] == ["--"] else a.command)
    elif a.cmd == "forward":
        forward(a.netns, a.ports)


if __name__ == "__main__":
    main()
