# Shared by the GPU scripts (benchmarks/*_gpu.sh): sourced, not run. Sets OUT and RES, installs the wheels
# the GPU image lacks (hydra-core, omegaconf, antlr4, medmnist, captum, pydicom: `make gpu-wheels` writes them
# into .whl/, which the device call carries), and defines
# `say` (log a line) and `step NAME SECONDS COMMAND...` (run with a time limit, log, time;
# never past $DEADLINE when it is set).
# On exit the results are packed into $OUT/results.tar.gz.
OUT=${OUT:-/tmp/gpu_out}
RES=/tmp/gpu_results
rm -rf "$RES"; mkdir -p "$OUT" "$RES"  # a rerun on a warm machine starts a fresh summary
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD  # the scripts run as files (python3 benchmarks/x.py) import chest_mnist from here
# (summary_live.txt, the summary as it grows, is for a call cut off before this: the device
# returns at most 8 files)
trap 'tar -czf "$OUT/results.tar.gz" -C "$RES" . ; cp "$RES/summary.txt" "$OUT/" 2>/dev/null && rm -f "$OUT/summary_live.txt"' EXIT

if [ -d .whl ]; then  # packages the GPU image lacks (hydra-core, omegaconf, antlr4, medmnist, captum, pydicom)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
say() { echo "$*" | tee -a "$RES/summary.txt" "$OUT/summary_live.txt"; }
DEADLINE=${DEADLINE:-}  # epoch seconds; when set, no step runs past it and a step that
                        # would get under 30 s is skipped (and said so)
step() {  # step NAME SECONDS COMMAND...: run, log, time
  local name=$1 limit=$2; shift 2
  if [ -n "$DEADLINE" ]; then
    local left=$(( DEADLINE - $(date +%s) ))
    if [ "$left" -lt 30 ]; then say "$name: skipped, ${left} s left before the deadline"; return; fi
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  local t0=$(date +%s.%N)
  timeout -k 15 "$limit" "$@" > "$RES/$name.log" 2>&1  # -k: a run that hangs on SIGTERM
  local rc=$?
  say "$name: rc=$rc, $(python3 -c "print(f'{$(date +%s.%N) - $t0:.1f}')") s wall: $*"
  tail -n 12 "$RES/$name.log" | sed "s/^/  [$name] /" >> "$RES/summary.txt"
}


say_report() {  # say_report NAME METRICS_JSON KEY...: a line with those keys of a run's metrics.json
  local name=$1 file=$2; shift 2
  say "$name report: $(python3 -c 'import json, sys; m = json.load(open(sys.argv[1])); print({k: m.get(k) for k in sys.argv[2:]})' "$file" "$@" 2>&1 | tail -1)"
}

compare_predict() {  # compare_predict NAME PREDICT_JSON RUN_DIR: predict's probabilities against the run's report
  python3 - "$@" >> "$RES/summary.txt" 2>&1 <<'PY'
import json, sys
import numpy as np
name, predicted, run = sys.argv[1:4]
doc = json.load(open(predicted))
ours = np.array([[r["probabilities"][k] for k in doc["labels"]] for r in doc["predictions"]])
ref = np.load(f"{run}/report/predictions.npz")["scores"]
print(f"{name}: {len(ours)} rows ({ref.shape[0]} in the report), max |p - report| = {np.abs(ours - ref).max():.2e}")
PY
}
