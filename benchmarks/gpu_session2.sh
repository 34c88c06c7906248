#!/usr/bin/env bash
# Issue 5's open GPU rows, in one call (about 8 minutes on an H100 or H200): 100 epochs of
# ChestMNIST-shaped data with experiment=fast_gpu, timed end to end, and its accuracy on real
# X-rays (PneumoniaMNIST, 100 epochs) against the protocol run in BENCHMARKS.md; then issue 7's
# predict on the GPU, compared with that run's report. Results go to
# $OUT (summary.txt + results.tar.gz); each step has its own time limit.
#
#   OUT=/tmp/out bash benchmarks/gpu_session2.sh      (carry .whl: see gpu_session.sh)
set -u
source "$(dirname "$0")/gpu_lib.sh"  # $OUT, $RES, the wheels, say, step

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$RES/summary.txt"
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" | tee -a "$RES/summary.txt"

# 1. the goal: 100 epochs, validation every epoch, ChestMNIST's split sizes, timed end to end
step make_full 60 python3 -m chest_mnist.synthetic /tmp/chest_full.npz --official-sizes --no-compress
step fast_100 330 python3 -m chest_mnist.train experiment=fast_gpu data=synthetic data.path=/tmp/chest_full.npz \
  paths.log_dir=/tmp/logs/fast
cp /tmp/logs/fast/train/runs/*/report/metrics.json "$RES/fast_100_metrics.json" 2>/dev/null
python3 benchmarks/epoch_times.py /tmp/logs/fast/train/runs/*/tensorboard >> "$RES/summary.txt" 2>&1

# 2. does the fast recipe still learn real X-rays as well as the protocol? (protocol row: BENCHMARKS.md)
step pneumonia_fast 150 python3 -m chest_mnist.train experiment=fast_gpu data.flag=pneumoniamnist \
  data.path=tests/data/pneumoniamnist.npz paths.log_dir=/tmp/logs/pneumonia
cp /tmp/logs/pneumonia/train/runs/*/report/metrics.json "$RES/pneumonia_fast_metrics.json" 2>/dev/null

# 3. predict on the GPU (issue 7): the test npz with that run's best checkpoint, against its report
RUN=$(ls -d /tmp/logs/pneumonia/train/runs/* | head -1)
step predict_gpu 60 python3 -m chest_mnist.predict "ckpt_path=$(ls "$RUN"/checkpoints/epoch*.ckpt | head -1)" \
  inputs=[tests/data/pneumoniamnist.npz] device=cuda format=json output=/tmp/predict_gpu.json
python3 - "$RUN" >> "$RES/summary.txt" 2>&1 <<'PY'
import json, sys
import numpy as np
doc = json.load(open("/tmp/predict_gpu.json"))
ours = np.array([[r["probabilities"][k] for k in doc["labels"]] for r in doc["predictions"]])
ref = np.load(f"{sys.argv[1]}/report/predictions.npz")["scores"]
print(f"predict on cuda: {len(ours)} rows, max |p - report| = {np.abs(ours - ref).max():.2e}")
PY
say "done"
