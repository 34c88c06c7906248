"""Time the report's bootstrap intervals and calibration at ChestMNIST's test size.

    python benchmarks/bootstrap_time.py [--resamples 1000] [--repeats 3] [--device cuda]

Synthetic scores and labels of 22,433 images x 14 labels at ChestMNIST's label rates (the
intervals' cost depends on the sizes, not on the values); prints the seconds of each repeat.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from chest_mnist.bootstrap import Bootstrap, bootstrap_intervals
from chest_mnist.calibration import calibration_errors
from chest_mnist.synthetic import PREVALENCE
from chest_mnist.task import MULTI_LABEL_TASK


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=22433)
    parser.add_argument("--device", default="cpu", help="where the resamples are summed")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    prevalence = PREVALENCE
    targets = torch.from_numpy(
        (rng.random((args.images, len(prevalence))) < prevalence).astype(np.int64)
    )
    scores = torch.from_numpy(rng.random(targets.shape, dtype=np.float32)) * 0.7 + 0.3 * targets
    print(
        f"{args.images:,} images x {targets.shape[1]} labels, {args.resamples:,} resamples, "
        f"on {args.device}, {torch.get_num_threads()} torch threads"
    )

    def intervals(device: str) -> dict:
        return bootstrap_intervals(
            scores,
            targets,
            MULTI_LABEL_TASK,
            Bootstrap(args.resamples),
            thresholds=torch.full((targets.shape[1],), 0.5),
            device=device,
        )

    for repeat in range(args.repeats):
        started = time.perf_counter()
        on_device = intervals(args.device)
        middle = time.perf_counter()
        calibration_errors(scores, targets, MULTI_LABEL_TASK)
        done = time.perf_counter()
        print(f"repeat {repeat + 1}: bootstrap {middle - started:.2f} s, ECE {done - middle:.3f} s")
    if args.device != "cpu":  # the same intervals as the CPU's, to rounding
        on_cpu = intervals("cpu")
        differences = [
            np.nanmax(np.abs(np.subtract(on_device[part][name], on_cpu[part][name])))
            for part in ("scalars", "per_label")
            for name in on_cpu[part]
        ]
        print(f"{args.device} against the CPU: largest difference {max(differences):.2e}")


if __name__ == "__main__":
    main()
