"""Hydra multirun: one directory per job, a summary, and a failing job that loses nothing."""

import csv
import os
from pathlib import Path

import pytest
import yaml
from matplotlib.image import imread

from tests.conftest import run_here


def tiny(npz, log_dir):
    return [
        "data=synthetic",
        f"data.path={npz}",
        "data.subset=128",
        "data.batch_size=64",
        "model.stem=imagenet",
        "trainer.max_epochs=1",
        "figures=false",  # the jobs' numbers; the sweep's own summary PNG is still drawn
        f"paths.log_dir={log_dir}",
    ]


@pytest.mark.slow
def test_learning_rate_multirun_writes_jobs_and_summary(tmp_path, synthetic_npz):
    """Two learning rates x (a good file, a missing one): the jobs on the missing file fail when
    they load their data, which no check before the sweep can know."""
    missing = tmp_path / "missing.npz"
    result = run_here(
        "chest_mnist.train",
        "-m",
        "model.optimizer.lr=1e-3,1e-2",
        *tiny(synthetic_npz, tmp_path),
        f"data.path={synthetic_npz},{missing}",
        "data.synthetic=null",
    )
    assert result.returncode == 2  # the failed jobs are reported at the end...
    assert f"error: data.path={missing} does not exist" in result.stderr
    assert "Traceback" not in result.stderr  # each said why in its own error: line
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
        ("3", "failed"),
    ]
    assert (
        "model.optimizer.lr=0.01" in rows[2]["overrides"]
        and 0 <= float(rows[2]["best_val_auroc"]) <= 1
    )
    assert imread(sweep / "sweep_summary.png").shape[0] > 300
    assert f"Sweep summary: {sweep / 'sweep_summary.csv'}." in result.stdout
    assert result.stderr.rstrip().endswith(
        f"error: 2 of 4 jobs failed (job 1, 3: their error lines are above and in their "
        f"train.log; {sweep / 'sweep_summary.csv'})"
    )


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        (
            ["model.optimizer.lr=1e-3,abc"],
            "error: model.optimizer.lr='abc' must be a number above 0 (the protocol's is 1e-3). "
            "(in model.optimizer.lr=abc; no job was started)",
        ),
        (
            ["data.size=28,100"],
            "error: data.size=100 is not a MedMNIST size; choose one of 28, 64, 128, 224.",
        ),
        (
            ["data.batch_size=32,abc"],
            "error: data.batch_size: Value 'abc' of type 'str' could not be converted to Integer "
            "(no job was started)",
        ),
        (
            ["model.optimizer.lr=1e-3,1e-2", "trainer.accelerator=cpu", "trainer.devices=4096"],
            "error: trainer.devices=4096 asks for 4096 CPU processes but this machine has",
        ),
        (
            ["seed=1,2x"],  # the key compare's tables are built on
            "error: seed='2x' must be a whole number from 0 to 4294967295 (or null: a random "
            "one, which the log names). (in seed=2x; no job was started)",
        ),
    ],
    ids=["wrong_type", "bad_size", "wrong_type_for_the_schema", "too_many_devices", "bad_seed"],
)
def test_bad_sweep_is_refused_before_any_job_starts(tmp_path, synthetic_npz, sweep, message):
    result = run_here("chest_mnist.train", "-m", *sweep, *tiny(synthetic_npz, tmp_path))
    assert result.returncode == 2 and message in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("overrides.yaml"))  # no job directory was made


def test_a_sweep_into_a_folder_whose_jobs_trained_is_refused_and_leaves_it(tmp_path, synthetic_npz):
    """hydra.sweep.dir= an earlier sweep's: Hydra would overwrite each job's config (compare
    would read the old reports under the new recipe) and the sweep's summary."""
    sweep = tmp_path / "sweep"
    (sweep / "0" / "checkpoints").mkdir(parents=True)
    (sweep / "0" / "checkpoints" / "last.ckpt").write_bytes(b"an earlier job's")
    (sweep / "multirun.yaml").write_text("the earlier sweep's\n")
    result = run_here(
        "chest_mnist.train",
        "-m",
        "seed=1,2",
        f"hydra.sweep.dir={sweep}",
        *tiny(synthetic_npz, tmp_path),
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"error: hydra.sweep.dir={sweep} holds a sweep's runs already" in result.stderr
    assert "no job was started" in result.stderr
    assert (sweep / "multirun.yaml").read_text() == "the earlier sweep's\n"
    assert sorted(p.name for p in sweep.rglob("*")) == [
        "0",
        "checkpoints",
        "last.ckpt",
        "multirun.yaml",
    ]


def test_sweep_over_a_key_that_does_not_exist_is_refused(tmp_path, synthetic_npz):
    result = run_here(
        "chest_mnist.train", "-m", "model.optimizer.lrr=1e-3,1e-2", *tiny(synthetic_npz, tmp_path)
    )
    assert result.returncode != 0 and "Could not override 'model.optimizer.lrr'" in result.stderr
    assert not list(tmp_path.rglob("overrides.yaml"))


def test_devices_are_checked_against_the_machine(monkeypatch):
    from chest_mnist import UserError
    from chest_mnist.config_checks import check_devices_exist

    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    check_devices_exist("gpu", 2)
    check_devices_exist("auto", [0, 1])
    with pytest.raises(
        UserError,
        match=r"trainer.devices=4 asks for 4 GPUs but this machine has 2\. Use trainer.devices=2",
    ):
        check_devices_exist("gpu", 4)
    with pytest.raises(UserError, match=r"asks for 3 GPUs"):
        check_devices_exist("auto", [0, 1, 2])
    with pytest.raises(UserError, match=r"asks for 3 GPUs"):
        check_devices_exist("gpu", "0,1,2")
    check_devices_exist("gpu", "0,1")
    check_devices_exist("gpu", "-1")
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    with pytest.raises(UserError, match=r"has 0\. Train on the CPU with trainer=cpu"):
        check_devices_exist("gpu", 1)
    check_devices_exist("cpu", 2)
    check_devices_exist("auto", "auto")
    with pytest.raises(UserError, match="must ask for at least one device"):
        check_devices_exist("cpu", 0)
    with pytest.raises(UserError, match="must be a number of devices"):
        check_devices_exist("cpu", 1.5)


@pytest.mark.slow
def test_optuna_search_runs_two_trials(tmp_path, synthetic_npz):
    result = run_here(
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


def _job(sweep, name, overrides, status=None, metrics=None):
    from chest_mnist import run_files
    from chest_mnist.run_files import JOB_STATUS

    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if status:
        (job / JOB_STATUS).write_text(status + "\n")
    if metrics:
        (job / run_files.REPORT).mkdir()
        run_files.write_metrics(job / run_files.REPORT, metrics)


def test_the_summary_takes_each_jobs_status_from_hydra_not_from_its_report(tmp_path):
    """A job with test=false writes no report and is completed; one that has not ended yet (a
    parallel launcher) is not called failed; one Hydra says failed is failed."""
    from chest_mnist.sweep import write_sweep_summary

    auroc = {"best_val/auroc": 0.8, "test/auroc": 0.7}
    _job(tmp_path, "0", ["model.optimizer.lr=0.001"], "COMPLETED", auroc)
    _job(tmp_path, "1", ["model.optimizer.lr=0.01", "test=false"], "COMPLETED")
    _job(tmp_path, "2", ["model.optimizer.lr=0.1"], "FAILED")
    _job(tmp_path, "3", ["model.optimizer.lr=1.0"])  # running
    _job(tmp_path, "4", ["model.optimizer.lr=2.0"], None, auroc)  # a sweep from before the file
    rows = write_sweep_summary(tmp_path)
    assert [r["status"] for r in rows] == [
        "completed",
        "completed",
        "failed",
        "not finished",
        "completed",
    ]
    assert rows[0]["best_val_auroc"] == 0.8 and rows[1].get("best_val_auroc") is None
    with open(tmp_path / "sweep_summary.csv") as f:
        assert [r["status"] for r in csv.DictReader(f)] == [r["status"] for r in rows]
    assert not list(tmp_path.glob(".sweep_summary*"))  # written beside, then renamed
    # at the sweep's end no job runs: one that never said how it ended was stopped (killed)
    assert write_sweep_summary(tmp_path, final=True)[3]["status"] == "failed"


def test_the_summary_shows_the_best_of_the_metric_the_checkpoints_were_chosen_by(tmp_path):
    """Jobs whose checkpoints were chosen by val/loss: the CSV's column and the figure's y-axis
    are that metric's best, not an empty AUROC column. A report from before the metric was
    named (no best_checkpoint_chosen_by) names it by its best_<metric> key."""
    from chest_mnist import run_files
    from chest_mnist.sweep import write_sweep_summary

    for job, lr, loss in (("0", 0.001, 0.31), ("1", 0.01, 0.27)):
        metrics = {run_files.CHOSEN_BY: "val/loss", "best_val/loss": loss, "test/auroc": 0.7}
        _job(tmp_path, job, [f"model.optimizer.lr={lr}"], "COMPLETED", metrics)
    rows = write_sweep_summary(tmp_path)
    assert [r["best_val_loss"] for r in rows] == [0.31, 0.27]
    with open(tmp_path / "sweep_summary.csv") as f:
        reader = csv.DictReader(f)
        assert "best_val_loss" in reader.fieldnames and "best_val_auroc" not in reader.fieldnames
        assert [float(r["best_val_loss"]) for r in reader] == [0.31, 0.27]
    assert imread(tmp_path / "sweep_summary.png").shape[0] > 300
    assert run_files.best_score({"best_val/auroc": 0.8}) == ("val/auroc", 0.8)
    older = {run_files.BEST_CHECKPOINT: "x.ckpt", "best_val/loss": 0.3}  # named by its key only
    assert run_files.best_score(older) == ("val/loss", 0.3)


def test_a_summary_write_that_fails_leaves_the_last_summary_whole(tmp_path, monkeypatch):
    """Jobs of a parallel launcher write the summary at once: each file is written beside and
    renamed over, so a write cut short (here: a figure that fails halfway) leaves the last one."""
    from matplotlib.figure import Figure

    from chest_mnist.sweep import write_sweep_summary

    _job(tmp_path, "0", ["model.optimizer.lr=0.001"], "COMPLETED", {"best_val/auroc": 0.8})
    write_sweep_summary(tmp_path)
    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("sweep_summary.csv", "sweep_summary.png"):  # as written in place: readable
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask
    before = {
        name: (tmp_path / name).read_bytes() for name in ("sweep_summary.csv", "sweep_summary.png")
    }
    _job(tmp_path, "1", ["model.optimizer.lr=0.01"], "COMPLETED", {"best_val/auroc": 0.7})

    def cut_short(fig, fname, **kwargs):
        Path(fname).write_bytes(b"half a PNG")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", cut_short)
    with pytest.raises(OSError, match="disk full"):
        write_sweep_summary(tmp_path)
    assert (tmp_path / "sweep_summary.png").read_bytes() == before["sweep_summary.png"]
    assert (tmp_path / "sweep_summary.csv").read_bytes() != before["sweep_summary.csv"]  # 2 rows
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "0",
        "1",
        "sweep_summary.csv",
        "sweep_summary.png",
    ]


def test_a_jobs_end_writes_hydras_verdict_into_its_folder(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from hydra.core.utils import JobStatus
    from hydra.types import RunMode

    from chest_mnist import run_files, sweep

    _job(tmp_path, "0", ["seed=1", "test=false"])
    hydra = SimpleNamespace(
        mode=RunMode.MULTIRUN,
        sweep=SimpleNamespace(dir=str(tmp_path)),
        runtime=SimpleNamespace(output_dir=str(tmp_path / "0")),
    )
    monkeypatch.setattr(sweep.HydraConfig, "get", staticmethod(lambda: hydra))
    sweep.SweepSummary().on_job_end(None, SimpleNamespace(status=JobStatus.COMPLETED))
    assert (tmp_path / "0" / run_files.JOB_STATUS).read_text() == "COMPLETED\n"
    (row,) = sweep.write_sweep_summary(tmp_path)
    assert row["status"] == "completed"


@pytest.mark.parametrize(
    ("error", "sweeper", "ends_at_the_summary"),
    [
        ("user", "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", True),
        ("bug", "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", False),
        ("user", "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper", False),
    ],
)
def test_a_job_that_said_why_it_failed_lets_the_sweep_reach_its_summary(
    tmp_path, monkeypatch, error, sweeper, ends_at_the_summary
):
    """A job failed with a UserError (its error: line said why): Hydra's basic sweeper is not
    left to end the sweep with a traceback of it; the job's status file still says FAILED, and
    the sweep's end reports it with exit code 2. A bug keeps Hydra's traceback, and Optuna's
    sweeper, which reads every job's value, Hydra's verdict."""
    from types import SimpleNamespace

    from hydra.core.utils import JobReturn, JobStatus
    from hydra.types import RunMode

    from chest_mnist import UserError, run_files, sweep

    _job(tmp_path, "0", ["seed=1"])
    hydra = SimpleNamespace(
        mode=RunMode.MULTIRUN,
        sweep=SimpleNamespace(dir=str(tmp_path)),
        runtime=SimpleNamespace(output_dir=str(tmp_path / "0")),
        sweeper={"_target_": sweeper},
    )
    monkeypatch.setattr(sweep.HydraConfig, "get", staticmethod(lambda: hydra))
    failure = UserError("data.path=x does not exist") if error == "user" else KeyError("bug")
    job = JobReturn(status=JobStatus.FAILED, _return_value=failure)
    summary = sweep.SweepSummary()
    summary.on_job_end(None, job)
    assert (tmp_path / "0" / run_files.JOB_STATUS).read_text() == "FAILED\n"
    if not ends_at_the_summary:
        with pytest.raises(type(failure)):
            job.return_value  # noqa: B018 (what Hydra's sweeper does with each job)
        return
    assert job.return_value is None
    config = SimpleNamespace(hydra=SimpleNamespace(sweep=SimpleNamespace(dir=str(tmp_path))))
    with pytest.raises(SystemExit) as ended:
        summary.on_multirun_end(config)
    assert ended.value.code == 2

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sweep, "write_sweep_summary", no_space)  # the summary's files fail
    with pytest.raises(SystemExit) as ended:
        summary.on_multirun_end(config)
    assert ended.value.code == 2  # the failed job still decides the exit code
