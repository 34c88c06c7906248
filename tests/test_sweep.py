"""Hydra multirun: one directory per job, a summary, and a failing job that loses nothing."""

import csv
import subprocess
import sys

import pytest
from matplotlib.image import imread

from tests.conftest import ROOT


@pytest.mark.slow
def test_learning_rate_multirun_writes_jobs_and_summary(tmp_path, synthetic_npz):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "chest_mnist.train",
            "-m",
            "data=synthetic",
            f"data.path={synthetic_npz}",
            "data.subset=128",
            "data.batch_size=64",
            "model.stem=imagenet",
            "trainer.max_epochs=1",
            "model.optimizer.lr=1e-3,-1,1e-2",
            f"paths.log_dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0  # Hydra reports the failed job at the end...
    assert "Invalid learning rate: -1" in result.stderr
    (sweep,) = (tmp_path / "train" / "multiruns").iterdir()
    for job in ("0", "2"):  # ...after running the others to completion
        assert (sweep / job / "report" / "metrics.json").exists()
        assert list((sweep / job / "tensorboard").glob("events.out.tfevents.*"))
    with open(sweep / "sweep_summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["job"], r["status"]) for r in rows] == [
        ("0", "completed"),
        ("1", "failed"),
        ("2", "completed"),
    ]
    assert (
        "model.optimizer.lr=0.01" in rows[2]["overrides"]
        and 0 <= float(rows[2]["best_val_auroc"]) <= 1
    )
    assert imread(sweep / "sweep_summary.png").shape[0] > 300
