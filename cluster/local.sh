#!/usr/bin/env bash
# A local Ray head for development: start | status | stop | env
#
#   cluster/local.sh start     # head on 127.0.0.1, dashboard :8265, metrics :8080, jobs use this repo's .venv
#   eval "$(cluster/local.sh env)"
#   ray job submit --working-dir . -- python -m jobs.prepare_data --out data
#   cluster/local.sh stop     # `ray stop`: note that it stops EVERY Ray instance on this machine, embedded
#                              # ones of running jobs (make demo, tests) included
#
# Auth: Ray 2.60 enables token auth by default; this development head runs with RAY_AUTH_MODE=disabled
# and listens on loopback only. Jobs run with the interpreter found on the head's PATH, so the head is
# started with .venv/bin first on PATH (else jobs would import the system Python's packages).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${DEEPOMNI_VENV:-$here/.venv}"
num_cpus="${DEEPOMNI_NUM_CPUS:-4}"          # logical CPUs: on 2 cores Ray Data inside trainers needs headroom
dash_port="${DEEPOMNI_DASHBOARD_PORT:-8265}"
metrics_port="${DEEPOMNI_METRICS_PORT:-8080}"
export RAY_AUTH_MODE=disabled
export PATH="$venv/bin:$PATH"

if [ ! -x "$venv/bin/ray" ]; then
  echo "no Ray in $venv: run 'make setup' first" >&2
  exit 1
fi

case "${1:-}" in
  start)
    # Ray Serve's high-throughput mode (HAProxy in front when installed): serve_apps/ray_mode.py
    eval "$(cd "$here" && "$venv/bin/python" -m serve_apps.ray_mode)"
    ray start --head --node-ip-address 127.0.0.1 --num-cpus "$num_cpus" \
      --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$dash_port" \
      --metrics-export-port "$metrics_port" --disable-usage-stats
    # job submission needs the node's dashboard agent: wait until it answers (slow machines take a while)
    for _ in $(seq 1 60); do
      curl -sf "http://127.0.0.1:52365/api/local_raylet_healthz" >/dev/null 2>&1 && break
      sleep 1
    done
    echo "dashboard http://127.0.0.1:$dash_port  metrics http://127.0.0.1:$metrics_port/metrics"
    echo "submit jobs with: eval \"\$($0 env)\"; ray job submit --working-dir . -- python -m jobs.<name>"
    ;;
  status)
    ray status --address 127.0.0.1:6379
    ;;
  stop)
    ray stop
    ;;
  env)
    echo "export RAY_AUTH_MODE=disabled RAY_ADDRESS=http://127.0.0.1:$dash_port PATH=\"$venv/bin:\$PATH\""
    ;;
  *)
    echo "usage: $0 start|status|stop|env" >&2
    exit 2
    ;;
esac
