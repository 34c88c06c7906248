#!/usr/bin/env bash
# Where the time of a default training step goes on a GPU, beyond the GPU's own work
# (benchmarks/step_floor_gpu.py measures that): ChestMNIST-sized data at 28px, batch 128.
#   1. cProfile over 200 steps of the default command (benchmarks/host_profile.py): the Python
#      functions with the most host time (host_profile.txt);
#   2. 4 epochs of the default command, and the same without the progress bar, without the
#      loggers, and without either: train_seconds and seconds per epoch of each.
#   OUT=/tmp/out bash benchmarks/step_overhead_gpu.sh        (carry .whl: make gpu-wheels)
#   DRY_RUN=1 OUT=/tmp/out bash benchmarks/step_overhead_gpu.sh   (on the CPU, tiny data)
set -u
DEADLINE=$(( $(date +%s) + 240 ))
source "$(dirname "$0")/gpu_lib.sh"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}.
rm -rf /tmp/logs
if [ -n "${DRY_RUN:-}" ]; then
  SIZES="--train 600 --val 300 --test 300"; CPU="trainer.accelerator=cpu model.stem=imagenet"; START=1; STEPS=2
else
  SIZES="--official-sizes"; CPU=""; START=100; STEPS=200
fi
step make_full 30 python3 -m chest_mnist.synthetic /tmp/chest_full.npz $SIZES --no-compress
COMMON="data=synthetic data.path=/tmp/chest_full.npz $CPU"
step host_profile 60 python3 -m chest_mnist.train $COMMON test=false trainer.max_epochs=1 \
  +trainer.limit_train_batches=$((START + STEPS + 5)) paths.log_dir=/tmp/logs/host_profile \
  +callbacks.host_profile._target_=benchmarks.host_profile.ProfileSteps \
  +callbacks.host_profile.out=$OUT/host_profile.txt +callbacks.host_profile.start=$START \
  +callbacks.host_profile.steps=$STEPS
head -3 "$OUT/host_profile.txt" >> "$RES/summary.txt" 2>&1
declare -A VARIANTS=(
  [default]=""
  [no_progress_bar]="~callbacks.progress_bar +trainer.enable_progress_bar=false"
  [no_loggers]="~logger ~callbacks.lr_monitor"
  [neither]="~callbacks.progress_bar +trainer.enable_progress_bar=false ~logger ~callbacks.lr_monitor"
)
for name in default no_progress_bar no_loggers neither; do
  step epochs4_$name 45 python3 -m chest_mnist.train $COMMON trainer.max_epochs=4 \
    paths.log_dir=/tmp/logs/$name ${VARIANTS[$name]}
  say_report epochs4_$name "$(ls -d /tmp/logs/$name/train/runs/*/report/metrics.json | head -1)" train_seconds epochs_trained
  grep -h "it/s" "$RES/epochs4_$name.log" | tail -1 >> "$RES/summary.txt"
done
cp "$RES/summary.txt" "$OUT/summary.txt"
say done
