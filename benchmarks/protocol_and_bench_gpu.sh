#!/usr/bin/env bash
# Every GPU check and benchmark in one call on a lent GPU (see BENCHMARKS.md). Run from the
# repository root; results go to $OUT (summary.txt + results.tar.gz). Each step has its own
# time limit, so one failure does not cost the others.
#
#   OUT=/tmp/out bash benchmarks/protocol_and_bench_gpu.sh
set -u
source "$(dirname "$0")/gpu_lib.sh"  # $OUT, $RES, the wheels, say, step

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee -a "$RES/summary.txt"
python3 -c "import torch, lightning, torchmetrics, hydra, medmnist; print('torch', torch.__version__, 'lightning', lightning.__version__, 'torchmetrics', torchmetrics.__version__, 'hydra', hydra.__version__, 'medmnist', medmnist.__version__, 'bf16', torch.cuda.is_bf16_supported())" 2>&1 | tee -a "$RES/summary.txt"

# 1. the README's offline command on the GPU: bf16, the whole run directory
step train_synthetic 100 python3 -m chest_mnist.train data=synthetic trainer.max_epochs=2 paths.log_dir=/tmp/logs/synthetic
cp -r /tmp/logs/synthetic/train/runs/*/report "$RES/train_synthetic_report" 2>/dev/null
grep -h "precision" /tmp/logs/synthetic/train/runs/*/.hydra/config.yaml >> "$RES/summary.txt" 2>/dev/null

# 2. ChestMNIST-shaped data (78,468 / 11,219 / 22,433 at 28px), the default config, timed per epoch
step make_full 60 python3 -m chest_mnist.synthetic /tmp/chest_full.npz --official-sizes --no-compress
step train_full 150 python3 -m chest_mnist.train data=synthetic data.path=/tmp/chest_full.npz trainer.max_epochs=8 \
  callbacks.progress_bar.refresh_rate=100 paths.log_dir=/tmp/logs/full
cp /tmp/logs/full/train/runs/*/report/metrics.json "$RES/train_full_metrics.json" 2>/dev/null
python3 benchmarks/epoch_times.py /tmp/logs/full/train/runs/*/tensorboard >> "$RES/summary.txt" 2>&1

# 3. PneumoniaMNIST (real X-rays), the MedMNIST v2 protocol: 100 epochs, 28px ResNet-18
step pneumonia_100 180 python3 -m chest_mnist.train data.flag=pneumoniamnist data.path=tests/data/pneumoniamnist.npz \
  trainer.max_epochs=100 callbacks.progress_bar.refresh_rate=100 paths.log_dir=/tmp/logs/pneumonia
cp -r /tmp/logs/pneumonia/train/runs/*/report "$RES/pneumonia_report" 2>/dev/null

# 4. the bench: ours against the classic per-sample loop, 28px, then 224px with ChestMNIST's train size
step bench_28 90 python3 -m chest_mnist.bench --steps 100 --warmup 10 --out "$RES/bench_28.json"
step bench_224 200 python3 -m chest_mnist.bench --size 224 --stem imagenet --steps 30 --warmup 5 --n-train 78468 --out "$RES/bench_224.json"

# 5. the same ChestMNIST-shaped run with torch.compile (lowest priority: last)
step train_full_compiled 180 python3 -m chest_mnist.train data=synthetic data.path=/tmp/chest_full.npz trainer.max_epochs=8 \
  model.compile=true callbacks.progress_bar.refresh_rate=100 paths.log_dir=/tmp/logs/compiled
cp /tmp/logs/compiled/train/runs/*/report/metrics.json "$RES/train_compiled_metrics.json" 2>/dev/null
python3 benchmarks/epoch_times.py /tmp/logs/compiled/train/runs/*/tensorboard >> "$RES/summary.txt" 2>&1
say "done"
