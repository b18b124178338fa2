#!/usr/bin/env bash
# Benchmark this gateway with scripts/bench.py (DESIGN section 8); see also
# scripts/prosody_bench.sh for the comparison peer and scripts/compare_bench.sh for both.
#
# usage: bash scripts/gateway_bench.sh [N clients] [P pairs] [M messages] [bench.py options...]
#
# In a throwaway directory: makes a certificate (scripts/make_cert.py), writes a config
# (loopback, a free port, STARTTLS required, JSON logs at warning level), creates N accounts
# bench0..bench{N-1} with password "secret" through `xmpp-gateway user import` (random salts,
# as in production), starts the gateway pinned to CPU 0, runs bench.py pinned to CPU 1 with
# --server-pid, then stops the gateway with SIGTERM and removes the directory. Stream
# management (XEP-0198) is on with the gateway's defaults (ack every stanza, buffer_max 100,
# resume_timeout 600 s); bench.py --no-sm leaves it unused.
# Environment: PYTHON, KEEP_LOG=1 (print the gateway's log at the end), GATEWAY_LOG_LEVEL
# (warning; info logs every login, park and resume).
set -euo pipefail

# shellcheck source=scripts/bench_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench_common.sh"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gateway-bench.XXXXXX")
GATEWAY_PID=""

cleanup() {
    local status=$?
    if [[ -n $GATEWAY_PID ]] && kill -0 "$GATEWAY_PID" 2>/dev/null; then
        kill -TERM "$GATEWAY_PID" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$GATEWAY_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$GATEWAY_PID" 2>/dev/null || true
    fi
    [[ ${KEEP_LOG:-0} == 1 && -f $WORK/gateway.log ]] && cat "$WORK/gateway.log" >&2
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

"$PYTHON" "$ROOT/scripts/make_cert.py" --out "$WORK/certs" >/dev/null
cat >"$WORK/config.yaml" <<YAML
general: {hosts: [$DOMAIN], negotiation_timeout: 60, send_queue_size: 10000}
listen:
  c2s: [{ip: 127.0.0.1, port: $PORT, tls: ${BENCH_TLS:-required}}]
tls: {certfile: certs/$DOMAIN.pem, keyfile: certs/$DOMAIN.key}
auth: {database: data/accounts.sqlite}
logging: {level: ${GATEWAY_LOG_LEVEL:-warning}, format: json}
YAML

started_ms=$((${EPOCHREALTIME/[.,]/} / 1000))
"$PYTHON" -c "import sys; [print(f'$PREFIX{i}@$DOMAIN $PASSWORD') for i in range(int(sys.argv[1]))]" "$N" \
    | "$PYTHON" -m gateway user import - --config "$WORK/config.yaml" >&2
echo "gateway_bench: $N accounts imported in $(( ${EPOCHREALTIME/[.,]/} / 1000 - started_ms )) ms" >&2

"${PIN_SERVER[@]}" "$PYTHON" -m gateway serve --config "$WORK/config.yaml" >"$WORK/gateway.log" 2>&1 &
GATEWAY_PID=$!
for _ in $(seq 100); do
    kill -0 "$GATEWAY_PID" 2>/dev/null || { cat "$WORK/gateway.log" >&2; exit 1; }
    "$PYTHON" -c "import socket; socket.create_connection(('127.0.0.1', $PORT), 0.2).close()" 2>/dev/null && break
    sleep 0.1
done

VERSION=$("$PYTHON" -c 'import gateway; print(gateway.__version__)')
echo "gateway_bench: xmpp-gateway $VERSION pid $GATEWAY_PID on 127.0.0.1:$PORT, ${PIN_SERVER[*]:-unpinned}" >&2
status=0
"${PIN_BENCH[@]}" "$PYTHON" "$ROOT/scripts/bench.py" --host 127.0.0.1 --port "$PORT" \
    --domain "$DOMAIN" --users-prefix "$PREFIX" --password "$PASSWORD" \
    --clients "$N" --pairs "$P" --messages "$M" --server-pid "$GATEWAY_PID" \
    --label "xmpp-gateway $VERSION" "$@" || status=$?
errors=$(grep -c '"level": "error"' "$WORK/gateway.log" || true)
warnings=$(grep -c '"level": "warning"' "$WORK/gateway.log" || true)
echo "gateway_bench: gateway error lines: $errors, warning lines: $warnings (KEEP_LOG=1 shows the log)" >&2
if ((errors + warnings > 0)); then
    # The most frequent events among them, so a bad run says what went wrong.
    "$PYTHON" - "$WORK/gateway.log" <<'PY' >&2 || true
import collections, json, sys

counts = collections.Counter()
for line in open(sys.argv[1], errors="replace"):
    try:
        entry = json.loads(line)
    except ValueError:
        counts[("unparsed", line.strip()[:80])] += 1
        continue
    if entry.get("level") in ("error", "warning"):
        counts[(entry.get("level"), str(entry.get("event"))[:80])] += 1
for (level, event), count in counts.most_common(5):
    print(f"gateway_bench:   {level} x{count}: {event}")
PY
fi
exit "$status"
