"""The summary of a Hydra multirun: one row per job, and the best validation score (AUROC, or
the metric the checkpoints were chosen by) against the swept value.

    python -m chest_mnist.train -m model.optimizer.lr=1e-4,3e-4,1e-3,3e-3
    tensorboard --logdir logs/train/multiruns/<time>      # every job side by side

`SweepSummary` is a Hydra callback (chest_mnist/conf/hydra/default.yaml). After each job, and at the end,
it reads the job directories of the sweep (their `.hydra/overrides.yaml` and
`report/metrics.json`) and writes `sweep_summary.csv` and `sweep_summary.png` in the sweep
directory. Reading the directories, not memory, makes it work with any launcher, and a job
that failed is listed as failed instead of being lost: each job's end writes Hydra's verdict
(COMPLETED or FAILED) into its `.hydra/job_status`, so a job with `test=false` (no report) is
completed, and one still running is not finished.

For tables over seeds (`-m seed=1,2,3`, alone or with other swept keys), `python -m
chest_mnist.compare <sweep dir>` gives each setting's mean ± sd; the end of a sweep says so.

`CheckSweep`, another Hydra callback, checks every swept value before the first job starts:
a learning rate of the wrong type in job 7 of 8 is an error at once, not after six runs.
"""

from __future__ import annotations

import copy
import csv
import logging
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, RangeSweep
from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ValidationError

from chest_mnist import run_files

log = logging.getLogger(__name__)

# the CSV's columns; after "overrides" one best_<metric> column per metric the jobs' best
# checkpoints were chosen by (best_val_auroc by default: `best_column`)
COLUMNS = ("job", "status", "overrides", "test_auroc", "test_acc", "epochs", "train_seconds")


def best_column(monitor: str) -> str:
    """The summary's column for the best value of `monitor` (val/auroc: best_val_auroc)."""
    return run_files.best_score_key(monitor).replace("/", "_")


def _job_row(job_dir: Path, final: bool = False) -> dict:
    """A job's row: its status as Hydra gave it when the job ended, and its report's numbers
    when it wrote one (not with test=false). Without a status, a job with a report completed;
    one without is still running, or at the sweep's end (`final`) was stopped before Hydra could
    say (killed): failed."""
    overrides = yaml.safe_load((job_dir / run_files.OVERRIDES).read_text()) or []
    try:
        status = (job_dir / run_files.JOB_STATUS).read_text().strip().lower()
    except OSError:
        status = None
    row = {"job": job_dir.name, "overrides": " ".join(overrides), "status": status}
    try:
        metrics = run_files.read_metrics(job_dir)
    except (OSError, ValueError):  # no report: the job failed, runs, or has test=false
        return row | {"status": status or ("failed" if final else "not finished")}
    monitor, best = run_files.best_score(metrics)
    return row | {
        "status": status or "completed",
        best_column(monitor): best,
        "test_auroc": metrics.get("test/auroc"),
        "test_acc": metrics.get("test/acc"),
        "epochs": metrics.get(run_files.EPOCHS_TRAINED),
        "train_seconds": metrics.get(run_files.TRAIN_SECONDS),
    }


def _swept_value(overrides: str, key: str) -> float | None:
    for override in overrides.split():
        name, _, value = override.partition("=")
        if name.lstrip("+~") == key:
            try:
                return float(value)
            except ValueError:
                return None
    return None


def sweep_rows(sweep_dir: Path, final: bool = False) -> list[dict]:
    """One row per job folder of `sweep_dir`, in job order. `final`: at the sweep's end, when
    no job runs any more."""
    jobs = sorted(
        (d for d in sweep_dir.iterdir() if (d / run_files.OVERRIDES).exists()),
        key=lambda d: int(d.name) if d.name.isdigit() else math.inf,
    )
    return [_job_row(d, final) for d in jobs]


def write_sweep_summary(
    sweep_dir: Path, key: str = "model.optimizer.lr", final: bool = False
) -> list[dict]:
    """Write sweep_summary.csv (and .png when the jobs sweep `key`) in `sweep_dir`; return the
    rows (`sweep_rows`)."""
    rows = sweep_rows(sweep_dir, final)
    best = list(dict.fromkeys(k for r in rows for k in r if k.startswith("best_")))
    best = best or [best_column(run_files.DEFAULT_MONITOR)]
    columns = [*COLUMNS[:3], *best, *COLUMNS[3:]]

    def write_csv(partial: Path) -> None:
        with open(partial, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)

    _write_whole(sweep_dir / "sweep_summary.csv", write_csv)
    # against the swept value: the best score of the first job's metric (a sweep of the metric
    # itself draws the jobs of that one)
    points = sorted(
        (_swept_value(r["overrides"], key), r[best[0]])
        for r in rows
        if r.get(best[0]) is not None and _swept_value(r["overrides"], key) is not None
    )
    if points:
        from chest_mnist.plots import plt

        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(best[0].replace("_", " "))
        ax.grid(alpha=0.3)
        failed = [r["job"] for r in rows if r["status"] == "failed"]
        ax.set_title(
            f"{len(points)} jobs" + (f"; failed: job {', '.join(failed)}" if failed else "")
        )
        fig.tight_layout()
        try:
            _write_whole(sweep_dir / "sweep_summary.png", lambda partial: fig.savefig(partial))
        finally:
            plt.close(fig)
    return rows


def _write_whole(path: Path, write: Callable[[Path], None]) -> None:
    """`write` a hidden file beside `path` (this process's: jobs of a parallel launcher may end,
    and write the summary, at once), then rename it over `path`: whole or not at all. A failed
    write leaves `path` as it was, and no file beside it. The name ends as `path`'s, so that
    matplotlib knows the format."""
    partial = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(partial)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


class SweepSummary(Callback):
    """Hydra callback: keeps the sweep summary up to date after every job of a multirun."""

    def __init__(self, key: str = "model.optimizer.lr"):
        self.key = key

    def _write(self, sweep_dir: str, final: bool = False) -> None:
        try:
            write_sweep_summary(Path(sweep_dir), self.key, final)
        except Exception as e:  # a summary must never fail the sweep it summarises
            log.warning("Could not write the sweep summary in %s: %s", sweep_dir, e)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            try:
                status = Path(hydra_cfg.runtime.output_dir) / run_files.JOB_STATUS
                status.write_text(f"{job_return.status.name}\n")
            except Exception as e:  # as the summary: never fail the sweep for it
                log.warning("Could not write the job's status: %s", e)
            self._write(hydra_cfg.sweep.dir)
            if _said_why(job_return) and hydra_cfg.sweeper.get("_target_") == BASIC_SWEEPER:
                # its `error:` line said why; Hydra's sweeper would end the sweep at this job
                # with a traceback of that error, before the summary: it ends below instead
                job_return.status = JobStatus.COMPLETED
                job_return.return_value = None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._write(config.hydra.sweep.dir, final=True)
        summary = Path(config.hydra.sweep.dir) / "sweep_summary.csv"
        log.info(
            "Sweep summary: %s. Mean ± sd over the seeds of each setting: "
            "python -m chest_mnist.compare %s",
            summary,
            config.hydra.sweep.dir,
        )
        # read again, apart from the summary's files: a sweep with a failed job must not exit
        # 0 because those could not be written (its jobs' ends let Hydra's sweeper go on)
        try:
            rows = sweep_rows(Path(config.hydra.sweep.dir), final=True)
        except Exception as e:
            print(f"error: could not read the sweep's job folders ({e})", file=sys.stderr)
            raise SystemExit(2) from None
        failed = [row["job"] for row in rows if row["status"] == "failed"]
        if failed:
            print(
                f"error: {len(failed)} of {len(rows)} jobs failed (job {', '.join(failed)}: "
                f"their error lines are above and in their train.log; {summary})",
                file=sys.stderr,
            )
            raise SystemExit(2)


# Hydra's default sweeper; others (Optuna's) read every job's return value themselves
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def _said_why(job_return: Any) -> bool:
    """Whether the job failed with a UserError, which its `error:` line reported already."""
    from chest_mnist.cli import find_user_error

    if job_return.status != JobStatus.FAILED:
        return False
    return find_user_error(job_return._return_value) is not None  # what Hydra would re-raise


def swept_configs(config: DictConfig) -> list[tuple[str, DictConfig]]:
    """The multirun's base config, then one copy per value of each swept key (`key=a,b,c` or
    `key=range(...)`), each value set alone: what the jobs will see of that key. Config-group
    sweeps (`data=a,b`) are checked by Hydra itself when it composes the job; interval sweeps
    (Optuna) draw their values later."""
    base = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
    overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    groups = set(config.hydra.runtime.choices)
    configs = [("the sweep's shared overrides", base)]
    for override in overrides:
        key = override.key_or_group
        if not override.is_sweep_override() or key in groups:
            continue
        if not isinstance(override.value(), ChoiceSweep | RangeSweep):
            continue
        for value in override.sweep_iterator():
            job = copy.deepcopy(base)
            OmegaConf.update(job, key, value, force_add=override.is_add())
            configs.append((f"{key}={value}", job))
    return configs


class CheckSweep(Callback):
    """Hydra callback: refuse a multirun before its first job when a swept value is invalid
    (`config_checks.check_job` on each), with `error: ...` and exit code 2, as a single run does.

    The GPU count is checked only for launchers that run the jobs on this machine: a SLURM
    job gets its GPUs on a node, not on the machine that submits it."""

    LOCAL_LAUNCHERS = ("BasicLauncher", "JoblibLauncher", "LocalLauncher")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from chest_mnist.config_checks import check_job

        if config.get("task_name") != "train":
            return  # evaluate / predict sweeps: nothing of train's to check
        sweep = Path(config.hydra.sweep.dir).expanduser()
        if sweep.is_dir() and any(
            run_files.holds_a_run(job) for job in sweep.iterdir() if job.is_dir()
        ):
            print(
                f"error: hydra.sweep.dir={sweep} holds a sweep's runs already: this one's jobs "
                f"would overwrite their configs and mix their files. Give it a folder of its own "
                f"(each sweep gets a new one unless hydra.sweep.dir says otherwise); no job was "
                f"started.",
                file=sys.stderr,
            )
            raise SystemExit(2)
        launcher = str(config.hydra.launcher.get("_target_", ""))
        local = launcher.endswith(self.LOCAL_LAUNCHERS)
        try:
            jobs = swept_configs(config)
        except ValidationError as e:  # a swept value of the wrong type for the schema
            what = e.msg.splitlines()[0]  # the lines after it repeat the key
            print(f"error: {e.full_key}: {what} (no job was started)", file=sys.stderr)
            raise SystemExit(2) from None
        for what, job in jobs:
            try:
                check_job(job, check_devices=local)
            except Exception as e:
                from chest_mnist.cli import find_user_error

                error = find_user_error(e)
                if error is None:
                    raise
                print(f"error: {error} (in {what}; no job was started)", file=sys.stderr)
                raise SystemExit(2) from None
