#!/usr/bin/env bash
# Issue 15: can a training step of the protocol (batch 128 at 28px, bf16, the whole step as one
# CUDA graph) take less GPU time than the 2.2 ms that puts 100 epochs at about 137 s of replays
# alone (BENCHMARKS.md)? In one call of at most 4.5 minutes
# (DEADLINE 270 s; not yet timed), benchmarks/step_floor_gpu.py without Lightning, twice:
#   1. cuDNN's benchmark as PyTorch runs it (10 algorithms tried per convolution):
#      - whole_compiled, whole_compiled_kernels: the default's step, and its kernel time by kind
#        (convolution forward, input and weight gradients, inductor's fused kernels, Adam, ...:
#        2.241 ms a replay, 2.183 ms of kernels on an H200; two independent steps at once,
#        whole_compiled_pair, took 3.429 ms: a step leaves part of the GPU idle (BENCHMARKS.md,
#        "The default measured again"). What follows tries to use that room inside one step,
#        or to need less of it);
#      - whole_streams, whole_compiled_streams, streams_max_grad_diff: each convolution's weight
#        gradient on a second stream beside its input gradient (benchmarks/two_stream_conv.py),
#        uncompiled and compiled, against whole_fused and whole_compiled; its gradients against
#        the plain network's;
#      - whole_compiled_combo(_kernels): inductor's combo kernels (independent small kernels
#        launched as one), compiled again (another setting: a miss in inductor's graph cache,
#        though Triton's may serve kernels the two share), last as the least likely to matter;
#   2. cuDNN's benchmark trying every algorithm (--cudnn-benchmark-limit 0), a fresh process:
#      whole_compiled and whole_fused.
# Results under $OUT: step_floor.json, step_floor_all_algorithms.json, summary.txt (each log's
# last 12 lines), results.tar.gz (the whole logs).
#
#   OUT=/tmp/out bash benchmarks/step_floor_gpu.sh     (nothing to carry: it needs torch and Lightning)
set -u
DEADLINE=$(( $(date +%s) + 270 ))
source "$(dirname "$0")/gpu_lib.sh"  # $OUT, $RES, say, step
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$RES/summary.txt"
CACHES="env TORCHINDUCTOR_CACHE_DIR=/tmp/step_floor_caches/inductor TRITON_CACHE_DIR=/tmp/step_floor_caches/triton"
rm -rf /tmp/step_floor_caches  # the first compile is cold (whole_compiled_setup_s)
step step_floor 190 $CACHES python3 benchmarks/step_floor_gpu.py "$OUT/step_floor.json" \
  whole_compiled whole_compiled_kernels whole_fused whole_streams \
  streams_max_grad_diff whole_compiled_streams whole_compiled_streams_kernels \
  whole_compiled_combo whole_compiled_combo_kernels
step step_floor_all_algorithms 90 $CACHES python3 benchmarks/step_floor_gpu.py \
  "$OUT/step_floor_all_algorithms.json" whole_compiled whole_fused --cudnn-benchmark-limit 0
cp "$RES/summary.txt" "$OUT/summary.txt"
say "done"
