# Shared by the GPU session scripts: sourced, not run. Sets OUT and RES, installs the wheels
# the GPU image lacks (hydra-core, omegaconf, antlr4, medmnist: carried in .whl/), and defines
# `say` (log a line) and `step NAME SECONDS COMMAND...` (run with a time limit, log, time).
# On exit the results are packed into $OUT/results.tar.gz.
OUT=${OUT:-/tmp/gpu_out}
RES=/tmp/gpu_results
mkdir -p "$OUT" "$RES"
export PYTHONUNBUFFERED=1
trap 'tar -czf "$OUT/results.tar.gz" -C "$RES" . ; cp "$RES/summary.txt" "$OUT/" 2>/dev/null' EXIT

if [ -d .whl ]; then  # packages the GPU image lacks (hydra-core, omegaconf, antlr4, medmnist)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
say() { echo "$*" | tee -a "$RES/summary.txt" "$OUT/summary_live.txt"; }
step() {  # step NAME SECONDS COMMAND...: run, log, time
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s.%N)
  timeout "$limit" "$@" > "$RES/$name.log" 2>&1
  local rc=$?
  say "$name: rc=$rc, $(python3 -c "print(f'{$(date +%s.%N) - $t0:.1f}')") s wall: $*"
  tail -n 12 "$RES/$name.log" | sed "s/^/  [$name] /" >> "$RES/summary.txt"
}

