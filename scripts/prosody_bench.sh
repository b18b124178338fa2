#!/usr/bin/env bash
# Benchmark Prosody with scripts/bench.py, as the comparison peer of DESIGN section 8.
#
# usage: bash scripts/prosody_bench.sh [N clients] [P pairs] [M messages] [bench.py options...]
#   e.g. bash scripts/prosody_bench.sh 500 50 200
#        bash scripts/prosody_bench.sh 1000 100 200 --rate 1000 --json
#
# Installs Debian's prosody if it is missing, then, in a throwaway directory: makes a
# self-signed EC certificate, writes a config (loopback only, a free port, VirtualHost
# "localhost", STARTTLS required, SCRAM-SHA-256 accounts, smacks when this Prosody ships
# it), writes N internal_hashed account files directly (bench0..bench{N-1}, password
# "secret", one shared salt so the bench client runs PBKDF2 once), starts prosody in the
# foreground as a child of this script (not the system service), runs bench.py against it
# with --server-pid, stops it and removes the directory, also on failure or Ctrl-C.
#
# With 2+ CPUs, prosody is pinned to CPU 0 and bench.py to CPU 1 (DESIGN 8: per core).
# Environment: PYTHON (default .venv/bin/python), KEEP_LOG=1 prints prosody's log at the end.
set -euo pipefail

# shellcheck source=scripts/bench_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench_common.sh"

if ! command -v prosody >/dev/null 2>&1; then
    echo "prosody_bench: installing prosody from Debian's packages" >&2
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y prosody
fi
command -v openssl >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y openssl
VERSION=$(dpkg-query -W -f='${Version}' prosody 2>/dev/null || echo unknown)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/prosody-bench.XXXXXX")
PROSODY_PID=""

stop_prosody() {
    [[ -n $PROSODY_PID ]] || return 0
    if kill -0 "$PROSODY_PID" 2>/dev/null; then
        kill -TERM "$PROSODY_PID" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$PROSODY_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$PROSODY_PID" 2>/dev/null || true
    fi
    wait "$PROSODY_PID" 2>/dev/null || true
    PROSODY_PID=""
}

cleanup() {
    local status=$?
    stop_prosody
    if [[ ${KEEP_LOG:-0} == 1 && -f $WORK/prosody.log ]]; then
        echo "--- prosody.log" >&2
        cat "$WORK/prosody.log" >&2
    fi
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM


openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj "/CN=$DOMAIN" -addext "subjectAltName=DNS:$DOMAIN" \
    -keyout "$WORK/$DOMAIN.key" -out "$WORK/$DOMAIN.crt" 2>/dev/null

SMACKS=""
SM_STATE=off
if dpkg -L prosody 2>/dev/null | grep -q '/mod_smacks\.lua$' \
    || [[ -f /usr/lib/prosody/modules/mod_smacks.lua ]]; then
    SMACKS='"smacks";'
    SM_STATE=on
else
    echo "prosody_bench: this Prosody has no mod_smacks, running without XEP-0198" >&2
fi

mkdir -p "$WORK/data"
cat >"$WORK/prosody.cfg.lua" <<EOF
-- Throwaway config written by scripts/prosody_bench.sh; removed after the run.
pidfile = "$WORK/prosody.pid"
data_path = "$WORK/data"
run_as_root = true -- the bench machine runs as root; this process never faces the network
log = { warn = "$WORK/prosody.log" } -- info would log every login; the bench measures the server
interfaces = { "127.0.0.1" }
local_interfaces = { "127.0.0.1" }
c2s_interfaces = { "127.0.0.1" }
c2s_ports = { $PORT }
s2s_ports = { }
http_ports = { }
https_ports = { }
network_settings = { nagle = false } -- TCP_NODELAY: Nagle + delayed ACK stalls each login ~40 ms
c2s_require_encryption = true
allow_registration = false
authentication = "internal_hashed"
password_hash = "SHA-256"
storage = "internal"
certificates = "$WORK"
ssl = { key = "$WORK/$DOMAIN.key", certificate = "$WORK/$DOMAIN.crt" }
modules_enabled = { "roster"; "saslauth"; "tls"; "disco"; "ping"; "posix"; $SMACKS }
modules_disabled = { "s2s"; "s2s_auth_certs" }
VirtualHost "$DOMAIN"
EOF

# internal_hashed accounts as util.datamanager stores them: DATA/<host>/accounts/<user>.dat,
# a Lua chunk returning the SCRAM keys (mod_auth_internal_hashed, password_hash above).
"$PYTHON" - "$WORK/data" "$DOMAIN" "$PREFIX" "$N" "$PASSWORD" <<'EOF'
import hashlib, hmac, os, sys, uuid

data, domain, prefix, count, password = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]


def encode(name: str) -> str:  # util.datamanager: every non-alphanumeric byte -> %xx
    return "".join(chr(b) if chr(b).isalnum() and b < 128 else "%%%02x" % b for b in name.encode())


salt, iterations = str(uuid.uuid4()), 10000
salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), iterations)
client_key = hmac.new(salted, b"Client Key", "sha256").digest()
stored_key = hashlib.sha256(client_key).hexdigest()
server_key = hmac.new(salted, b"Server Key", "sha256").hexdigest()
accounts = os.path.join(data, encode(domain), "accounts")
os.makedirs(accounts)
record = (
    "return {\n"
    f'\t["iteration_count"] = {iterations};\n'
    f'\t["salt"] = "{salt}";\n'
    f'\t["server_key"] = "{server_key}";\n'
    f'\t["stored_key"] = "{stored_key}";\n'
    "};\n"
)
for index in range(count):
    with open(os.path.join(accounts, encode(f"{prefix}{index}") + ".dat"), "w") as handle:
        handle.write(record)
EOF


"${PIN_SERVER[@]}" prosody --config "$WORK/prosody.cfg.lua" -F >>"$WORK/prosody.stdout" 2>&1 &
PROSODY_PID=$!

ready=0
for _ in $(seq 100); do
    if ! kill -0 "$PROSODY_PID" 2>/dev/null; then
        break
    fi
    if "$PYTHON" -c "import socket,sys; socket.create_connection(('127.0.0.1', $PORT), 0.2).close()" 2>/dev/null; then
        ready=1
        break
    fi
    sleep 0.1
done
if ((ready == 0)); then
    echo "prosody_bench: prosody did not start listening on 127.0.0.1:$PORT" >&2
    cat "$WORK/prosody.stdout" "$WORK/prosody.log" >&2 2>/dev/null || true
    exit 1
fi

echo "prosody_bench: prosody $VERSION pid $PROSODY_PID on 127.0.0.1:$PORT," \
    "${PIN_SERVER[*]:-unpinned}; smacks $SM_STATE; $N accounts" >&2
started_us=${EPOCHREALTIME/[.,]/}
status=0
"${PIN_BENCH[@]}" "$PYTHON" "$ROOT/scripts/bench.py" --host 127.0.0.1 --port "$PORT" \
    --domain "$DOMAIN" --users-prefix "$PREFIX" --password "$PASSWORD" \
    --clients "$N" --pairs "$P" --messages "$M" --server-pid "$PROSODY_PID" \
    --label "prosody $VERSION" "$@" || status=$?
elapsed_ms=$(((${EPOCHREALTIME/[.,]/} - started_us) / 1000))
echo "prosody_bench: bench.py took $((elapsed_ms / 1000)).$(printf '%03d' $((elapsed_ms % 1000))) s, exit $status" >&2
if [[ -s $WORK/prosody.log ]]; then
    echo "prosody_bench: prosody warnings/errors: $(wc -l <"$WORK/prosody.log") lines (KEEP_LOG=1 shows them)" >&2
fi
exit "$status"
