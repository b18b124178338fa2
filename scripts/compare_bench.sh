#!/usr/bin/env bash
# Run scripts/bench.py against this gateway and against Prosody (Debian's package) in the
# same run, with the same load, and print each figure for both and their ratio.
#
# usage: bash scripts/compare_bench.sh [N clients] [P pairs] [M messages] [bench.py options...]
#   e.g. bash scripts/compare_bench.sh 1000 100 200
#        bash scripts/compare_bench.sh 1000 100 200 --rate 1000     (latency at an offered rate)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
OUT=$(mktemp -d "${TMPDIR:-/tmp}/compare-bench.XXXXXX")
trap 'rm -rf "$OUT"' EXIT

bash "$ROOT/scripts/gateway_bench.sh" "$@" --warmup --json >"$OUT/gateway.json"
bash "$ROOT/scripts/prosody_bench.sh" "$@" --warmup --json >"$OUT/prosody.json"

"$PYTHON" - "$OUT/gateway.json" "$OUT/prosody.json" <<'PY'
import json, sys

ours, theirs = (json.load(open(path)) for path in sys.argv[1:3])
rows = [
    ("logins/s", ("logins", "logins_per_s"), True),
    ("logins per server CPU-s", ("logins", "logins_per_server_cpu_s"), True),
    ("login p99 ms", ("logins", "p99_ms"), False),
    ("KiB per idle session", ("idle_memory", "kib_per_session"), False),
    ("msgs/s delivered", ("messages", "msgs_per_s"), True),
    ("msgs per server CPU-s", ("messages", "msgs_per_server_cpu_s"), True),
    ("message p50 ms", ("messages", "p50_ms"), False),
    ("message p99 ms", ("messages", "p99_ms"), False),
    ("messages lost", ("messages", "lost"), False),
]


def get(doc, path):
    for key in path:
        doc = (doc or {}).get(key)
    return doc


print(f"{'figure':<26}{ours['label']:>22}{theirs['label']:>30}{'ratio':>9}")
for name, path, higher_is_better in rows:
    a, b = get(ours, path), get(theirs, path)
    ratio = f"{a / b:.2f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "-"
    better = "(higher is better)" if higher_is_better else ""
    print(f"{name:<26}{a!s:>22}{b!s:>30}{ratio:>9}  {better}")
sm = (get(ours, ("logins", "sm_enabled")), get(theirs, ("logins", "sm_enabled")))
print(f"stream management enabled on sessions: gateway {sm[0]}, prosody {sm[1]}")
PY
