#!/usr/bin/env bash
# A multi-node Ray cluster on this machine, to try `uniformer submit` and the Ray Jobs path without Kubernetes:
# a head node and N worker nodes that listen on 127.0.0.1 only, with Ray token authentication on.
#
#   infra/local-cluster.sh start [--workers N] [--cpus-per-node C] [--dir DIR]
#   infra/local-cluster.sh status [--dir DIR]
#   infra/local-cluster.sh stop [--dir DIR]
#
# DIR (default /tmp/uniformer-cluster, or UNIFORMER_CLUSTER_DIR) holds the token, the address, the nodes' logs and
# Ray's temp dir. `stop` kills only the process groups this script started: `ray stop` would kill every Ray on the
# machine, other people's included. Nodes start through infra/ray_loopback.py, which keeps Ray on 127.0.0.1 (see
# there why plain `ray start --node-ip-address 127.0.0.1` does not). Python: PYTHON, else .venv/bin/python.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
dir="${UNIFORMER_CLUSTER_DIR:-/tmp/uniformer-cluster}"
workers=1
cpus=2

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

cmd="${1:-}"
[ -n "$cmd" ] || usage
shift
while [ $# -gt 0 ]; do
  case "$1" in
    --workers) workers="$2"; shift 2 ;;
    --cpus-per-node) cpus="$2"; shift 2 ;;
    --dir) dir="$2"; shift 2 ;;
    *) usage ;;
  esac
done

free_port() { "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Alive nodes as the dashboard reports them (the Ray token authenticates the request); 0 while it is not up.
count_nodes() {
  "$python" - "$1" "$dir/auth_token" <<'EOF' 2>/dev/null || echo 0
import json, sys, urllib.request
request = urllib.request.Request(f"{sys.argv[1]}/api/v0/nodes",
                                 headers={"Authorization": "Bearer " + open(sys.argv[2]).read().strip()})
nodes = json.loads(urllib.request.urlopen(request, timeout=5).read())["data"]["result"]["result"]
print(sum(node["state"] == "ALIVE" for node in nodes))
EOF
}

wait_for_nodes() {  # wait_for_nodes ADDRESS COUNT
  for _ in $(seq 180); do
    for pidfile in "$dir"/*.pid; do
      alive "$pidfile" || { echo "a node exited; see ${pidfile%.pid}.log" >&2; exit 1; }
    done
    [ "$(count_nodes "$1")" -ge "$2" ] && return 0
    sleep 1
  done
  echo "the cluster did not reach $2 nodes in 180 s; see $dir/*.log" >&2
  exit 1
}

start_node() {  # start_node NAME RAY_START_ARGS...
  local name="$1"; shift
  # setsid: each node is its own process group, which `stop` kills as a whole (raylet, GCS, workers, drivers)
  RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$dir/auth_token" RAY_USAGE_STATS_ENABLED=0 \
    PATH="$(dirname "$python"):$PATH" \
    setsid "$python" "$root/infra/ray_loopback.py" start --block --node-ip-address 127.0.0.1 \
      --num-cpus "$cpus" --temp-dir "$dir/ray/$name" --dashboard-agent-listen-port "$(free_port)" \
      --disable-usage-stats "$@" > "$dir/$name.log" 2>&1 < /dev/null &
  echo $! > "$dir/$name.pid"
}

start() {
  if alive "$dir/head.pid"; then
    echo "a cluster is already running from $dir ($(cat "$dir/address")); stop it first" >&2
    exit 1
  fi
  mkdir -p "$dir"
  rm -f "$dir"/*.pid
  if [ ! -s "$dir/auth_token" ]; then
    (umask 077 && "$python" -c 'import secrets; print(secrets.token_hex(32))' > "$dir/auth_token")
  fi
  local gcs_port dashboard_port address
  gcs_port="$(free_port)"
  dashboard_port="$(free_port)"
  address="http://127.0.0.1:$dashboard_port"
  start_node head --head --port "$gcs_port" --dashboard-host 127.0.0.1 --dashboard-port "$dashboard_port" \
    --ray-client-server-port "$(free_port)"
  wait_for_nodes "$address" 1
  for i in $(seq 1 "$workers"); do
    start_node "worker$i" --address "127.0.0.1:$gcs_port"
  done
  wait_for_nodes "$address" $((workers + 1))
  echo "$address" > "$dir/address"
  cat <<EOF
Ray cluster up: 1 head + $workers worker node(s), $cpus CPUs each, listening on 127.0.0.1 only, token auth on.
  dashboard / Ray Jobs API: $address
  token file:               $dir/auth_token
Submit a job (the token is read from RAY_AUTH_TOKEN_PATH):
  export RAY_ADDRESS=$address RAY_AUTH_TOKEN_PATH=$dir/auth_token
  uniformer submit --wait ingest ./videos --out ./clips --labels-from-dirs
  RAY_AUTH_MODE=token ray job list            # Ray's own CLI wants RAY_AUTH_MODE=token as well
Stop it: $0 stop --dir $dir
EOF
}

status() {
  if ! alive "$dir/head.pid"; then
    echo "no cluster running from $dir"
    exit 1
  fi
  echo "$(cat "$dir/address"): $(count_nodes "$(cat "$dir/address")") node(s) alive"
}

stop() {
  local groups=()
  for pidfile in "$dir"/*.pid; do
    [ -f "$pidfile" ] || continue
    alive "$pidfile" && groups+=("-$(cat "$pidfile")")
  done
  if [ ${#groups[@]} -eq 0 ]; then
    echo "no cluster running from $dir"
    rm -f "$dir"/*.pid
    return 0
  fi
  kill -TERM -- "${groups[@]}" 2>/dev/null || true
  for _ in $(seq 10); do
    local left=0
    for group in "${groups[@]}"; do kill -0 -- "$group" 2>/dev/null && left=1; done
    [ "$left" = 0 ] && break
    sleep 1
  done
  kill -KILL -- "${groups[@]}" 2>/dev/null || true  # Ray drains for up to 30 s on SIGTERM; a dev cluster need not
  rm -f "$dir"/*.pid "$dir/address"
  echo "stopped the cluster in $dir"
}

case "$cmd" in
  start) start ;;
  status) status ;;
  stop) stop ;;
  *) usage ;;
esac
