"""The summary of a Hydra multirun: one row per job, and validation AUROC against the swept value.

    python -m chest_mnist.train -m model.optimizer.lr=1e-4,3e-4,1e-3,3e-3
    tensorboard --logdir logs/train/multiruns/<time>      # every job side by side

`SweepSummary` is a Hydra callback (conf/hydra/default.yaml). After each job, and at the end,
it reads the job directories of the sweep (their `.hydra/overrides.yaml` and
`report/metrics.json`) and writes `sweep_summary.csv` and `sweep_summary.png` in the sweep
directory. Reading the directories, not memory, makes it work with any launcher, and a job
that failed is listed as failed instead of being lost.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

log = logging.getLogger(__name__)

COLUMNS = (
    "job",
    "status",
    "overrides",
    "best_val_auroc",
    "test_auroc",
    "test_acc",
    "epochs",
    "train_seconds",
)


def _job_row(job_dir: Path) -> dict:
    overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or []
    row = {"job": job_dir.name, "overrides": " ".join(overrides), "status": "failed"}
    metrics_file = job_dir / "report" / "metrics.json"
    if metrics_file.exists():
        metrics = json.loads(metrics_file.read_text())
        row |= {
            "status": "completed",
            "best_val_auroc": metrics.get("best_val/auroc"),
            "test_auroc": metrics.get("test/auroc"),
            "test_acc": metrics.get("test/acc"),
            "epochs": metrics.get("epochs_trained"),
            "train_seconds": metrics.get("train_seconds"),
        }
    return row


def _swept_value(overrides: str, key: str) -> float | None:
    for override in overrides.split():
        name, _, value = override.partition("=")
        if name.lstrip("+~") == key:
            try:
                return float(value)
            except ValueError:
                return None
    return None


def write_sweep_summary(sweep_dir: Path, key: str = "model.optimizer.lr") -> list[dict]:
    """Write sweep_summary.csv (and .png when the jobs sweep `key`) in `sweep_dir`; return the rows."""
    jobs = sorted(
        (d for d in sweep_dir.iterdir() if (d / ".hydra" / "overrides.yaml").exists()),
        key=lambda d: int(d.name) if d.name.isdigit() else math.inf,
    )
    rows = [_job_row(d) for d in jobs]
    with open(sweep_dir / "sweep_summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    points = sorted(
        (_swept_value(r["overrides"], key), r["best_val_auroc"])
        for r in rows
        if r["status"] == "completed" and _swept_value(r["overrides"], key) is not None
    )
    if points:
        from chest_mnist.plots import plt

        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("best val AUROC")
        ax.grid(alpha=0.3)
        failed = [r["job"] for r in rows if r["status"] != "completed"]
        ax.set_title(
            f"{len(points)} jobs" + (f"; failed: job {', '.join(failed)}" if failed else "")
        )
        fig.tight_layout()
        fig.savefig(sweep_dir / "sweep_summary.png")
        plt.close(fig)
    return rows


class SweepSummary(Callback):
    """Hydra callback: keeps the sweep summary up to date after every job of a multirun."""

    def __init__(self, key: str = "model.optimizer.lr"):
        self.key = key

    def _write(self, sweep_dir: str) -> None:
        try:
            write_sweep_summary(Path(sweep_dir), self.key)
        except Exception as e:  # a summary must never fail the sweep it summarises
            log.warning("Could not write the sweep summary in %s: %s", sweep_dir, e)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            self._write(hydra_cfg.sweep.dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._write(config.hydra.sweep.dir)
