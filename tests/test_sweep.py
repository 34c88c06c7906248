"""Hydra multirun: one directory per job, a summary, and a failing job that loses nothing."""

import csv

import pytest
import yaml
from matplotlib.image import imread

from tests.conftest import run_module


def tiny(npz, log_dir):
    return [
        "data=synthetic",
        f"data.path={npz}",
        "data.subset=128",
        "data.batch_size=64",
        "model.stem=imagenet",
        "trainer.max_epochs=1",
        f"paths.log_dir={log_dir}",
    ]


@pytest.mark.slow
def test_learning_rate_multirun_writes_jobs_and_summary(tmp_path, synthetic_npz):
    result = run_module(
        "chest_mnist.train", "-m", "model.optimizer.lr=1e-3,-1,1e-2", *tiny(synthetic_npz, tmp_path)
    )
    assert result.returncode != 0  # Hydra reports the failed job at the end...
    assert "error: model.optimizer.lr=-1 must be a number above 0" in result.stderr
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


@pytest.mark.slow
def test_optuna_search_runs_two_trials(tmp_path, synthetic_npz):
    result = run_module(
        "chest_mnist.train",
        "hparams_search=lr_optuna",
        "hydra.sweeper.n_trials=2",
        *tiny(synthetic_npz, tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "train" / "multiruns").iterdir()
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == {"model.optimizer.lr", "model.optimizer.weight_decay"}
    assert 1e-5 <= results["best_params"]["model.optimizer.lr"] <= 1e-2
    with open(sweep / "sweep_summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {r["status"] for r in rows} == {"completed"}
    assert results["best_value"] == pytest.approx(max(float(r["best_val_auroc"]) for r in rows))


def test_slurm_launcher_config_composes():
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "hydra/launcher=slurm",
                "hydra.launcher.partition=gpu",
                "hydra.launcher.gpus_per_task=4",
            ],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert (
        launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    )
    assert (launcher.partition, launcher.gpus_per_task, launcher.timeout_min) == ("gpu", 4, 120)
