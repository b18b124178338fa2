# Sourced by gateway_bench.sh and prosody_bench.sh (not run on its own): the shared
# command line (N P M, then bench.py options), paths, accounts, a free loopback port, and
# CPU pinning (the server on CPU 0, bench.py on CPU 1: DESIGN 8 measures per core).
N=${1:-500}
P=${2:-50}
M=${3:-200}
shift $(($# < 3 ? $# : 3))
for value in "$N" "$P" "$M"; do
    [[ $value =~ ^[0-9]+$ ]] || { echo "usage: $0 [N clients] [P pairs] [M messages] [bench.py options]" >&2; exit 2; }
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
PASSWORD=secret
PREFIX=bench
DOMAIN=localhost
PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')

PIN_SERVER=()
PIN_BENCH=()
if command -v taskset >/dev/null 2>&1 && (($(nproc) >= 2)); then
    PIN_SERVER=(taskset -c 0)
    PIN_BENCH=(taskset -c 1)
fi
