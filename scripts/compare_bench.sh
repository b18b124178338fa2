#!/usr/bin/env bash
# Run scripts/bench.py against this gateway and against Prosody (Debian's package) in the
# same run, with the same load, and print each figure for both and their ratio.
#
# usage: bash scripts/compare_bench.sh [N clients] [P pairs] [M messages] [bench.py options...]
#   e.g. bash scripts/compare_bench.sh 1000 100 200
#        bash scripts/compare_bench.sh 1000 100 200 --rate 1000     (latency at an offered rate)
#        bash scripts/compare_bench.sh 1000 100 200 --resume 300    (XEP-0198 resumption)
#        bash scripts/compare_bench.sh 1000 100 200 --no-sm         (both without XEP-0198)
# Both runs use --warmup (returning clients). A failing run (lost messages, failed logins or
# resumptions) still gets its figures printed; the exit status is then 1.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
OUT=$(mktemp -d "${TMPDIR:-/tmp}/compare-bench.XXXXXX")
trap 'rm -rf "$OUT"' EXIT

status=0
bash "$ROOT/scripts/gateway_bench.sh" "$@" --warmup --json >"$OUT/gateway.json" || status=1
bash "$ROOT/scripts/prosody_bench.sh" "$@" --warmup --json >"$OUT/prosody.json" || status=1
for side in gateway prosody; do
    [[ -s $OUT/$side.json ]] || { echo "compare_bench: no figures from the $side run" >&2; exit 1; }
done

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
    ("SM unacked at the end", ("messages", "sm_unacked"), False),
]
resume_rows = [
    ("sessions resumed", ("resume", "resumed"), True),
    ("resume failures", ("resume", "failed"), False),
    ("resume p50 ms", ("resume", "p50_ms"), False),
    ("resume p99 ms", ("resume", "p99_ms"), False),
    ("resume max ms", ("resume", "max_ms"), False),
    ("reconnect+resume p99 ms", ("resume", "reconnect_p99_ms"), False),
    ("resume server CPU s", ("resume", "server_cpu_s"), False),
    ("resume msgs lost", ("resume", "lost"), False),
    ("resume msgs duplicated", ("resume", "duplicates"), False),
    ("resent (unhandled) msgs", ("resume", "resent"), None),
    ("parked msgs delivered", ("resume", "parked_delivered"), None),
]


def get(doc, path):
    for key in path:
        doc = (doc or {}).get(key)
    return doc


def number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def show(name, path, higher_is_better):
    a, b = get(ours, path), get(theirs, path)
    ratio = f"{a / b:.2f}" if number(a) and number(b) and b else "-"
    better = "(higher is better)" if higher_is_better else ""
    print(f"{name:<26}{a!s:>22}{b!s:>30}{ratio:>9}  {better}")


print(f"{'figure':<26}{ours['label']:>22}{theirs['label']:>30}{'ratio':>9}")
for row in rows:
    show(*row)
skipped = [get(doc, ("resume", "skipped")) for doc in (ours, theirs)]
if all(skipped):
    print(f"resumption: not measured ({skipped[0]})")
else:
    print(f"resumption: {get(ours, ('resume', 'sessions')) or get(theirs, ('resume', 'sessions'))}"
          " sessions, all reconnecting at once; p50/p99/max from <resume/> sent to <resumed/>")
    for row in resume_rows:
        show(*row)
    for label, doc, skip in zip(("gateway", "prosody"), (ours, theirs), skipped):
        if skip:
            print(f"  {label}: resumption skipped: {skip}")
        for reason, count in (get(doc, ("resume", "failures")) or {}).items():
            print(f"  {label}: resume failure x{count}: {reason}")
sm = (get(ours, ("logins", "sm_enabled")), get(theirs, ("logins", "sm_enabled")))
print(f"stream management enabled on sessions: gateway {sm[0]}, prosody {sm[1]}")
for label, doc in (("gateway", ours), ("prosody", theirs)):
    if doc.get("exit_status"):
        print(f"  {label}: bench exit status {doc['exit_status']} (failures or losses above)")
PY
exit "$status"
