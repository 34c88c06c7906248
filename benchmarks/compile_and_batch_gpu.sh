#!/usr/bin/env bash
# Where does a training step's time go on a GPU? Our pipeline alone (no reference loop), eager
# against torch.compile with CUDA graphs, at two batch sizes. Results: $OUT/summary.txt.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
export PYTHONUNBUFFERED=1
b() {
  echo "== $*" | tee -a "$OUT/summary.txt"
  timeout 80 python3 -m chest_mnist.bench --skip-reference --warmup 20 --steps 200 "$@" 2>&1 \
    | grep -A2 "^pipeline\|rror" | tee -a "$OUT/summary.txt"
}
b --batch-size 128 --compile reduce-overhead
b --batch-size 512
b --batch-size 512 --compile reduce-overhead
