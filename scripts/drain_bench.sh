#!/usr/bin/env bash
# The cluster's drain: N resumable sessions on one node of a two-node cluster (a
# redis-server of its own), SIGTERM to that node, every client resumes on the other one;
# then the same N sessions through a single node's restart, the reference. Prints the
# drain (SIGTERM -> exit), SIGTERM -> all resumed, resume p50/p99, failures and messages
# lost/duplicated of both runs, and the ratio cluster / single (scripts/drain_bench.py).
#
# usage: bash scripts/drain_bench.sh [N sessions (1000)] [drain_bench.py options]
# Environment: PYTHON (.venv/bin/python).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
N=${1:-1000}
shift $(($# < 1 ? $# : 1))
[[ $N =~ ^[0-9]+$ ]] || { echo "usage: $0 [N sessions] [drain_bench.py options]" >&2; exit 2; }
command -v redis-server >/dev/null || { echo "drain_bench: needs redis-server" >&2; exit 1; }
exec "$PYTHON" "$ROOT/scripts/drain_bench.py" --sessions "$N" "$@"
