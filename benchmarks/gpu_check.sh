#!/usr/bin/env bash
# One GPU check for a lent device machine: the GPU variants of bench_models, bench_curvature and
# bench_distributed, each under its own time limit (< 8 min in all), then one table of what they printed.
#
#   bash benchmarks/gpu_check.sh            # from the repository root; results also land in $OUT (or ./gpu_check_out)
#
# It installs the package (no network beyond the package registries is needed; torch comes from the
# registry), prints the card, runs each benchmark with --device cuda, and never fails early: a benchmark
# that errors or runs past its limit is reported as such in the table and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
: > "$LOG"
say() { echo "$@" | tee -a "$LOG"; }

start=$(date +%s)
if ! python -c "import trajectory, torch" >/dev/null 2>&1; then
    say "== installing sgdwalk"
    python -m pip install --quiet -e . >>"$LOG" 2>&1 || say "pip install failed (see log)"
fi
say "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
python - <<'PY' 2>&1 | tee -a "$LOG"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
PY

run() {  # name, limit seconds, command...
    local name=$1 limit=$2; shift 2
    say "== $name (limit ${limit}s): $*"
    local t0=$(date +%s)
    timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$OUT_DIR/$name.txt" 2>&1
    local rc=$?
    cat "$OUT_DIR/$name.txt" >>"$LOG"
    echo "$name rc=$rc seconds=$(( $(date +%s) - t0 ))" >>"$OUT_DIR/status.txt"
    tail -n 40 "$OUT_DIR/$name.txt"
}

: > "$OUT_DIR/status.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
run bench_models 270 python benchmarks/bench_models.py --device cuda --json "$OUT_DIR/bench_models.json"
run bench_curvature 120 python benchmarks/bench_curvature.py --device cuda --quick
run bench_distributed 60 python benchmarks/bench_distributed.py --device cuda --procs 1 --repeat 1

say "== summary ($(( $(date +%s) - start )) s in all)"
cat "$OUT_DIR/status.txt" | tee -a "$LOG"
python - "$OUT_DIR/bench_models.json" <<'PY' 2>&1 | tee -a "$LOG"
import json, sys
try:
    rows = json.load(open(sys.argv[1]))
except Exception as err:  # the benchmark failed or timed out: its log says why
    print(f"bench_models table unavailable: {err}")
    raise SystemExit(0)
rows = rows.get("rows", rows) if isinstance(rows, dict) else rows
if rows:
    keys = list(rows[0].keys())
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r.get(k):.3g}" if isinstance(r.get(k), float) else str(r.get(k)) for k in keys) + " |")
PY
