#!/usr/bin/env bash
# A local Ray head for development: start | status | stop | env
#
#   cluster/local.sh start     # head on 127.0.0.1, dashboard :8265, metrics :8080, jobs use this repo's .venv
#   eval "$(cluster/local.sh env)"
#   ray job submit --working-dir . -- python -m jobs.prepare_data --out data
#   cluster/local.sh stop      # stops this head's processes only (those of its GCS port), not other Ray instances
#
# Several nodes (root: each node in its own network namespace; cluster/local_cluster.py says how):
#   cluster/local.sh start --nodes 3     # head, n1, n2; then env / status / stop as above, and
#   cluster/local.sh add-node [NAME] | kill-node NAME | restart-node NAME | cut NAME | heal NAME | exec NODE -- COMMAND...
#
# Every listener of this head is on loopback (tests/test_cluster.py): RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is
# Ray's single-machine switch (its default on macOS/Windows), which keeps the node's address 127.0.0.1 instead
# of turning `--node-ip-address 127.0.0.1` into the machine's address; Ray 2.60 binds its servers (GCS, raylet,
# workers, agents, metrics, Ray client server) to that address. HAProxy's stats and metrics listeners are put
# on loopback by serve_apps/ray_mode.py. What Ray 2.60 binds to every interface regardless (each Serve
# replica's inter-deployment gRPC server, once an app is deployed here) is guarded by Ray's token auth, which
# stays on (RAY_AUTH_MODE=token, Ray's default; the token is ~/.ray/auth_token, made by `start` when missing,
# readable by this user only; DEEPOMNI_RAY_AUTH_MODE=disabled turns it off). `env` exports what the Ray CLI
# needs to use it (docs/security.md).
# Jobs run with the interpreter found on the head's PATH, so the head is started with .venv/bin first on PATH
# (else jobs would import the system Python's packages).
#
# Ports (environment): DEEPOMNI_GCS_PORT 6379, DEEPOMNI_DASHBOARD_PORT 8265, DEEPOMNI_METRICS_PORT 8080,
# DEEPOMNI_CLIENT_PORT 10001 (Ray client server), DEEPOMNI_AGENT_PORT 52365 (dashboard agent's HTTP port: job
# submission); HAProxy's stats and metrics take free ports (RAY_SERVE_HAPROXY_STATS_PORT / _METRICS_PORT set them).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${DEEPOMNI_VENV:-$here/.venv}"
num_cpus="${DEEPOMNI_NUM_CPUS:-4}"          # logical CPUs: on 2 cores Ray Data inside trainers needs headroom
gcs_port="${DEEPOMNI_GCS_PORT:-6379}"
dash_port="${DEEPOMNI_DASHBOARD_PORT:-8265}"
metrics_port="${DEEPOMNI_METRICS_PORT:-8080}"
client_port="${DEEPOMNI_CLIENT_PORT:-10001}"
agent_port="${DEEPOMNI_AGENT_PORT:-52365}"
export RAY_AUTH_MODE="${DEEPOMNI_RAY_AUTH_MODE:-token}"
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export PATH="$venv/bin:$PATH"

if [ ! -x "$venv/bin/ray" ]; then
  echo "no Ray in $venv: run 'make setup' first" >&2
  exit 1
fi

# the multi-node cluster (cluster/local_cluster.py) answers for itself once started
cluster_state="${TMPDIR:-/tmp}/deepomni-cluster-$gcs_port/cluster.json"
multi() { exec "$venv/bin/python" "$here/cluster/local_cluster.py" "$@"; }
nodes=1
if [ "${1:-}" = start ] && [ $# -gt 1 ]; then
  if [ "${2:-}" = --nodes ] && [ $# -eq 3 ] && [[ "$3" =~ ^[0-9]+$ ]]; then
    nodes="$3"
  else
    echo "usage: $0 start [--nodes N]" >&2
    exit 2
  fi
fi

case "${1:-}" in
  start)
    # Ray Serve's high-throughput mode (HAProxy in front when installed): serve_apps/ray_mode.py
    eval "$(cd "$here" && "$venv/bin/python" -m serve_apps.ray_mode)"
    token="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
    if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ] && [ ! -f "$token" ]; then
      # a fresh machine: Ray 2.60's `ray start` refuses to start without a token and does not make one
      if [ -n "${RAY_AUTH_TOKEN_PATH:-}" ]; then
        echo "RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH does not exist: create it, or unset it to use ~/.ray/auth_token" >&2
        exit 1
      fi
      (umask 077; ray get-auth-token --generate >/dev/null 2>&1)  # made readable by this user only
    fi
    [ "$nodes" -gt 1 ] && multi start --nodes "$nodes"
    ray start --head --node-ip-address 127.0.0.1 --port "$gcs_port" --num-cpus "$num_cpus" \
      --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$dash_port" \
      --dashboard-agent-listen-port "$agent_port" --ray-client-server-port "$client_port" \
      --metrics-export-port "$metrics_port" --disable-usage-stats
    header=""
    if [ "$RAY_AUTH_MODE" = token ] && [ -f "$token" ]; then
      [ -O "$token" ] && chmod 600 "$token"
      header="Authorization: Bearer $(cat "$token")"
    fi
    # job submission needs the node's dashboard agent: wait until it answers (slow machines take a while);
    # the token goes to curl through a file descriptor, not its command line (which every user can read)
    for _ in $(seq 1 60); do
      curl -sf -H @<(printf '%s\n' "$header") "http://127.0.0.1:$agent_port/api/local_raylet_healthz" \
        >/dev/null 2>&1 && break
      sleep 1
    done
    echo "dashboard http://127.0.0.1:$dash_port  metrics http://127.0.0.1:$metrics_port/metrics"
    if [ -n "${RAY_SERVE_HAPROXY_METRICS_PORT:-}" ]; then
      echo "Serve's HAProxy (once the app is deployed): metrics http://127.0.0.1:$RAY_SERVE_HAPROXY_METRICS_PORT/metrics" \
           " stats http://127.0.0.1:${RAY_SERVE_HAPROXY_STATS_PORT:-}/stats"
    fi
    echo "submit jobs with: eval \"\$($0 env)\"; ray job submit --working-dir . -- python -m jobs.<name>"
    ;;
  status)
    [ -f "$cluster_state" ] && multi status
    ray status --address "127.0.0.1:$gcs_port"
    ;;
  add-node|kill-node|restart-node|cut|heal|exec)
    multi "$@"
    ;;
  stop)
    { [ -f "$cluster_state" ] || ip netns list 2>/dev/null | grep -q "^deepomni$gcs_port-"; } && multi stop
    # Not `ray stop`, which stops every Ray instance on this machine (the embedded ones of running jobs, tests
    # and `deepomni serve` too): the processes that name this head's GCS address, and their descendants
    # (workers, job drivers). In `ray stop`'s order: the raylet, then the others, then the GCS; SIGTERM, and
    # SIGKILL to what still runs 5 s later.
    "$venv/bin/python" - "127.0.0.1:$gcs_port" "--gcs_server_port=$gcs_port" <<'PY'
import os, sys, tempfile, psutil

gcs, gcs_flag = sys.argv[1], sys.argv[2]
me, user = {os.getpid(), os.getppid()}, psutil.Process().username()
procs = {}
for p in psutil.process_iter(["cmdline", "username"]):
    try:
        args = p.info["cmdline"] or []
        if p.pid in me or p.info["username"] != user:
            continue
        if gcs_flag in args or any(a.endswith("=" + gcs) or a == gcs for a in args):
            procs[p.pid] = p
            procs.update((c.pid, c) for c in p.children(recursive=True))
    except psutil.Error:
        pass


def name(p):
    try:
        return p.name()
    except psutil.Error:
        return ""


buckets = [[p for p in procs.values() if name(p) == "raylet"],
           [p for p in procs.values() if name(p) not in ("raylet", "gcs_server")],
           [p for p in procs.values() if name(p) == "gcs_server"]]
for bucket in buckets:
    for p in bucket:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(bucket, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=2)
address_file = os.path.join(tempfile.gettempdir(), "ray", "ray_current_cluster")  # `ray start` wrote it
try:
    with open(address_file) as f:
        if f.read().strip() == gcs:
            os.remove(address_file)
except OSError:
    pass
print(f"stopped {len(procs)} processes of the head on {gcs}" if procs else f"no head on {gcs}")
PY
    ;;
  env)
    echo "export RAY_AUTH_MODE=$RAY_AUTH_MODE RAY_ADDRESS=http://127.0.0.1:$dash_port PATH=\"$venv/bin:\$PATH\""
    ;;
  *)
    echo "usage: $0 start [--nodes N]|status|stop|env|add-node [NAME]|kill-node NAME|restart-node NAME|cut NAME|heal NAME|exec NODE -- COMMAND..." >&2
    exit 2
    ;;
esac
