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
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from chest_mnist.config import register
from chest_mnist.synthetic import write_synthetic
from chest_mnist.train import train

CONF = Path(__file__).resolve().parents[1] / "chest_mnist" / "conf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    register()
    logging.disable(logging.WARNING)  # the runs' own log lines; the times are what is printed
    work = Path(tempfile.mkdtemp(prefix="report_figures_time_"))
    npz = write_synthetic(work / "chest.npz", n_train=512, n_val=256, n_test=256, seed=0)
    times: dict[str, list[float]] = {"false": [], "true": []}
    for repeat in range(args.repeats):
        for figures in times:
            overrides = [
                "data=synthetic",
                f"data.path={npz}",
                "data.batch_size=32",
                "data.eval_batch_size=256",
                "model.stem=imagenet",
                "trainer=cpu",
                "trainer.max_epochs=1",
                "+trainer.limit_train_batches=3",
                "+trainer.enable_progress_bar=false",
                "~callbacks.progress_bar",
                "~callbacks.model_summary",
                f"figures={figures}",
                f"paths.output_dir={work}/run_{repeat}_{figures}",
            ]
            with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
                cfg = compose(config_name="train", overrides=overrides)
            started = time.perf_counter()
            train(cfg)
            times[figures].append(time.perf_counter() - started)
    for figures, seconds in times.items():
        print(f"figures={figures}: train() " + ", ".join(f"{s:.2f}" for s in seconds) + " s")
    print(f"(runs in {work})")


if __name__ == "__main__":
    main()
