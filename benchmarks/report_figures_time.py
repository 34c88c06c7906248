"""Time a tiny training run with and without the report's figures (`figures=true|false`).

    python benchmarks/report_figures_time.py [--repeats 3]

The tests' tiny run: synthetic ChestMNIST-format data (512 / 256 / 256 images at 28px), 3
training steps of 32 images, the ImageNet stem, on the CPU, with the report (1,000 bootstrap
resamples). Alternates figures=false and figures=true in one process (the first run of each
pays matplotlib's and the model's first-use costs) and prints the seconds of each train().
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tests' own tiny run, from tests/conftest.py

from chest_mnist.synthetic import write_synthetic  # noqa: E402
from chest_mnist.train import train  # noqa: E402
from tests.conftest import compose_train, tiny_training_overrides  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the runs' own log lines; the times are what is printed
    work = Path(tempfile.mkdtemp(prefix="report_figures_time_"))
    npz = write_synthetic(work / "chest.npz", n_train=512, n_val=256, n_test=256, seed=0)
    times: dict[str, list[float]] = {"false": [], "true": []}
    for repeat in range(args.repeats):
        for figures in times:
            out = work / f"run_{repeat}_{figures}"
            cfg = compose_train(tiny_training_overrides(npz, out, figures=figures == "true"))
            started = time.perf_counter()
            train(cfg)
            times[figures].append(time.perf_counter() - started)
    for figures, seconds in times.items():
        print(f"figures={figures}: train() " + ", ".join(f"{s:.2f}" for s in seconds) + " s")
    print(f"(runs in {work})")


if __name__ == "__main__":
    main()
