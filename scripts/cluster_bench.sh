#!/usr/bin/env bash
# The cluster's efficiency: scripts/bench.py against one gateway process, then against W
# worker processes of one cluster (general.workers, a redis-server of its own), with the
# same load, in one run. Clients land on the workers as the kernel spreads connections
# (SO_REUSEPORT), so about (W-1)/W of the messages cross between nodes through Redis.
# Prints both runs' figures and the ratio of messages per server CPU-second (the
# cluster's server CPU = every worker + the supervisor + Redis): the target is >= 0.8.
# A control run, two separate processes with half the clients each and nothing crossing,
# tells what splitting the load costs by itself: cluster / control is what crossing
# nodes costs.
#
# usage: bash scripts/cluster_bench.sh [N clients] [P pairs] [M messages] [bench.py options]
# Environment: WORKERS (2), PYTHON, KEEP_LOG=1.
set -euo pipefail

# shellcheck source=scripts/bench_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench_common.sh"
WORKERS=${WORKERS:-2}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/cluster-bench.XXXXXX")
PIDS=()

cleanup() {
    local status=$?
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    [[ ${KEEP_LOG:-0} == 1 ]] && cat "$WORK"/*.log >&2
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
command -v redis-server >/dev/null || { echo "cluster_bench: needs redis-server" >&2; exit 1; }

"$PYTHON" "$ROOT/scripts/make_cert.py" --out "$WORK/certs" >/dev/null
REDIS_PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$WORK" --logfile "$WORK/redis.log" &
REDIS_PID=$!
PIDS+=("$REDIS_PID")

write_config() {  # $1: file, $2: extra YAML (the cluster part)
    cat >"$1" <<YAML
general: {hosts: [$DOMAIN], negotiation_timeout: 60, send_queue_size: 10000${3:-}}
listen:
  c2s: [{ip: 127.0.0.1, port: $PORT, tls: required}]
tls: {certfile: certs/$DOMAIN.pem, keyfile: certs/$DOMAIN.key}
auth: {database: data/accounts.sqlite}
logging: {level: warning, format: json}
$2
YAML
}
write_config "$WORK/single.yaml" ""
write_config "$WORK/cluster.yaml" "cluster: {redis: 'redis://127.0.0.1:$REDIS_PORT/0', node: gw}
modules:
  mod_stream_management: {backend: redis}" ", workers: $WORKERS"
"$PYTHON" -c "import sys; [print(f'$PREFIX{i}@$DOMAIN $PASSWORD') for i in range(int(sys.argv[1]))]" "$N" \
    | "$PYTHON" -m gateway user import - --config "$WORK/single.yaml" >/dev/null

wait_port() {  # $1: pid
    for _ in $(seq 200); do
        kill -0 "$1" 2>/dev/null || { cat "$WORK"/*.log >&2; exit 1; }
        "$PYTHON" -c "import socket; socket.create_connection(('127.0.0.1', $PORT), 0.2).close()" \
            2>/dev/null && return
        sleep 0.1
    done
    echo "cluster_bench: the gateway did not listen" >&2; exit 1
}

run_bench() {  # $1: label, $2: json out, then the pid options
    local label=$1 out=$2
    shift 2
    "$PYTHON" "$ROOT/scripts/bench.py" --host 127.0.0.1 --port "$PORT" --domain "$DOMAIN" \
        --users-prefix "$PREFIX" --password "$PASSWORD" --clients "$N" --pairs "$P" \
        --messages "$M" --label "$label" --warmup --json "$@" "${BENCH_ARGS[@]}" >"$out"
}
BENCH_ARGS=("$@")

# One process, embedded state (as gateway_bench.sh, but unpinned like the cluster).
"$PYTHON" -m gateway serve --config "$WORK/single.yaml" >"$WORK/single.log" 2>&1 &
SINGLE=$!
PIDS+=("$SINGLE")
wait_port "$SINGLE"
run_bench "one process" "$WORK/single.json" --server-pid "$SINGLE"
kill -TERM "$SINGLE"; wait "$SINGLE" || true

# The control: two separate processes (not a cluster, nothing crosses), each serving half
# the clients with its own bench client, at the same time. It shows what splitting the
# load over two processes costs by itself, so that cluster / control is what crossing
# nodes costs.
HALF=$((N / 2)); HALF_PAIRS=$((P / 2))
PORT_B=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
sed "s/port: $PORT,/port: $PORT_B,/" "$WORK/single.yaml" >"$WORK/single_b.yaml"
"$PYTHON" -m gateway serve --config "$WORK/single.yaml" >"$WORK/control_a.log" 2>&1 &
CONTROL_A=$!
PIDS+=("$CONTROL_A")
"$PYTHON" -m gateway serve --config "$WORK/single_b.yaml" >"$WORK/control_b.log" 2>&1 &
CONTROL_B=$!
PIDS+=("$CONTROL_B")
wait_port "$CONTROL_A"
PORT_A=$PORT; PORT=$PORT_B; wait_port "$CONTROL_B"; PORT=$PORT_A
control_bench() {  # $1: port, $2: pid, $3: json out
    "$PYTHON" "$ROOT/scripts/bench.py" --host 127.0.0.1 --port "$1" --domain "$DOMAIN" \
        --users-prefix "$PREFIX" --password "$PASSWORD" --clients "$HALF" --pairs "$HALF_PAIRS" \
        --messages "$M" --label "control" --warmup --json --server-pid "$2" "${BENCH_ARGS[@]}" >"$3"
}
control_bench "$PORT_A" "$CONTROL_A" "$WORK/control_a.json" &
BENCH_A=$!
control_bench "$PORT_B" "$CONTROL_B" "$WORK/control_b.json"
wait "$BENCH_A"
kill -TERM "$CONTROL_A" "$CONTROL_B"; wait "$CONTROL_A" "$CONTROL_B" || true

# The cluster: the supervisor and its workers, all on the same port.
"$PYTHON" -m gateway serve --config "$WORK/cluster.yaml" >"$WORK/cluster.log" 2>&1 &
SUPERVISOR=$!
PIDS+=("$SUPERVISOR")
wait_port "$SUPERVISOR"
# The workers are the supervisor's children; wait until every one listens.
for _ in $(seq 200); do
    mapfile -t WORKER_PIDS < <(pgrep -P "$SUPERVISOR" || true)
    ((${#WORKER_PIDS[@]} >= WORKERS)) && break
    sleep 0.1
done
sleep 2  # (imports and listeners of the last one started)
EXTRA=()
for pid in "${WORKER_PIDS[@]:1}" "$SUPERVISOR" "$REDIS_PID"; do EXTRA+=(--extra-pid "$pid"); done
cpu_of() { "$PYTHON" -c 'import os, sys; f = open(f"/proc/{sys.argv[1]}/stat").read().rpartition(")")[2].split(); print((int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK"))' "$1"; }
redis_before=$(cpu_of "$REDIS_PID")
run_bench "$WORKERS workers" "$WORK/cluster.json" --server-pid "${WORKER_PIDS[0]}" "${EXTRA[@]}"
echo "cluster_bench: redis-server used $("$PYTHON" -c "print(round($(cpu_of "$REDIS_PID") - $redis_before, 2))") CPU-s of the cluster run (all phases)"

"$PYTHON" - "$WORK/single.json" "$WORK/cluster.json" "$WORKERS" "$WORK/control_a.json" "$WORK/control_b.json" <<'PY'
import json, sys

single, cluster = (json.load(open(path)) for path in sys.argv[1:3])
workers = sys.argv[3]
halves = [json.load(open(path))["messages"] for path in sys.argv[4:6]]
rows = [
    ("msgs/s delivered", ("messages", "msgs_per_s")),
    ("msgs per server CPU-s", ("messages", "msgs_per_server_cpu_s")),
    ("message p99 ms", ("messages", "p99_ms")),
    ("messages lost", ("messages", "lost")),
    ("logins/s", ("logins", "logins_per_s")),
    ("KiB per idle session", ("idle_memory", "kib_per_session")),
    # With --resume K: the reconnections land on any worker (about half on another node
    # than the one holding the session, which then moves).
    ("sessions resumed", ("resume", "resumed")),
    ("resume failures", ("resume", "failures")),
    ("resume p99 ms", ("resume", "p99_ms")),
    ("resume msgs lost", ("resume", "lost")),
    ("resume msgs duplicated", ("resume", "duplicates")),
]
print(f"{'':24} {'one process':>12} {workers + ' workers':>12} {'ratio':>7}")
for name, (section, key) in rows:
    a = single.get(section, {}).get(key)
    b = cluster.get(section, {}).get(key)
    if a is None and b is None:
        continue
    ratio = f"{b / a:7.2f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a else "      -"
    print(f"{name:24} {a!s:>12} {b!s:>12} {ratio}")
# The control's messages per server CPU-s: both halves' messages over both servers' CPU.
delivered = sum(h["delivered"] for h in halves)
cpu = sum(h["server_cpu_s"] for h in halves)
control = delivered / cpu
cluster_rate = cluster["messages"]["msgs_per_server_cpu_s"]
print(
    f"control: 2 separate processes, nothing crosses: {control:.1f} msgs per server CPU-s"
    f" ({control / single['messages']['msgs_per_server_cpu_s']:.2f} of one process);"
    f" the cluster / control = {cluster_rate / control:.2f} (what crossing nodes costs)"
)
PY
