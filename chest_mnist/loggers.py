"""What Lightning's loggers lack: a CSV log that survives a resume, and the run's config in
TensorBoard's HPARAMS tab beside the metrics it is judged by; and the loss curves read back
from either log, for the report.

python -m chest_mnist.train logger=csv                    # <run>/csv/metrics.csv only
python -m chest_mnist.train "logger=[tensorboard,csv]"    # both
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from chest_mnist.config import flatten
from chest_mnist.run_files import ckpt_path_given

# the HPARAMS tab's metric columns beside each run's config: the last value of these scalars
HPARAMS_METRICS = ("val/auroc", "val/loss", "test/auroc", "test/acc")


@rank_zero_only  # the other processes' TensorBoard experiment is a stand-in with no writer
def log_config(loggers: Iterable[Logger], config: dict, overrides: Iterable[str] = ()) -> None:
    """The run's resolved `config` as each logger's hyperparameters (hparams.yaml), and in
    TensorBoard as the run's row of the HPARAMS tab: every key by its Hydra name
    (model.optimizer.lr) beside HPARAMS_METRICS, so that a sweep's jobs compare there; the
    keys the command line set (`overrides`, as Hydra keeps them: a sweep's swept keys) are the
    tab's first columns. Lightning's log_hyperparams writes that row only with metric values,
    which it would log as scalars at step 0; here the row names the metrics, and their values
    are the run's own. No session end is written (torch's would say "success" at the start).
    A resumed run (`ckpt_path`) adds no second row: TensorBoard shows a folder's first."""
    for logger in loggers:
        logger.log_hyperparams(config)
        if isinstance(logger, TensorBoardLogger) and not ckpt_path_given(config.get("ckpt_path")):
            writer = logger.experiment._get_file_writer()  # as Lightning's log_hyperparams
            for summary in _hparams_row(config, overrides):
                writer.add_summary(summary)


def _hparams_row(config: dict, overrides: Iterable[str]) -> tuple:
    """The HPARAMS plugin's experiment and session-start summaries (torch's), the experiment's
    keys marked `differs` where the command line set them: TensorBoard shows those first."""
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
    from torch.utils.tensorboard.summary import hparams

    row = {key: _hparam_value(value) for key, value in flatten(config).items()}
    experiment, session_start, _ = hparams(row, dict.fromkeys(HPARAMS_METRICS, 0.0))
    set_here = {override.split("=", 1)[0].lstrip("+~") for override in overrides}
    plugin = experiment.value[0].metadata.plugin_data
    data = HParamsPluginData.FromString(plugin.content)
    for info in data.experiment.hparam_infos:
        info.differs = info.name in set_here
    plugin.content = data.SerializeToString()
    return experiment, session_start


def _hparam_value(value: object) -> object:
    """A number or a string as TensorBoard shows it: YAML's spelling for true, false and
    null, lists and empty mappings as text."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return value if isinstance(value, (int, float, str)) else str(value)


class AppendingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer, except that a metrics.csv already in the folder is continued,
    not deleted: its header becomes the known columns, new columns widen the file, rows are
    appended. Widening rewrites the file: into a temporary file beside it, then renamed over
    it, so that a kill during the rewrite (Lightning truncates the file first) keeps the
    rows already logged."""

    @override
    def _check_log_dir_exists(self) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            self.metrics_keys = next(csv.reader(file), [])

    @override
    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        path = self.metrics_file_path
        with self._fs.open(path, "r", newline="") as file:
            rows = list(csv.DictReader(file))
        temporary = f"{path}.{os.getpid()}.tmp"
        try:
            with self._fs.open(temporary, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=fieldnames)
                writer.writeheader()
                writer.writerows(rows)
            self._fs.mv(temporary, path)
        finally:
            if self._fs.exists(temporary):
                self._fs.rm_file(temporary)


class AppendingCSVLogger(CSVLogger):
    """`lightning.pytorch.loggers.CSVLogger` whose metrics.csv a resumed run appends to.

    Lightning's writer deletes the metrics.csv it finds in its folder, so a run resumed into
    its own directory (`ckpt_path=<run>/checkpoints/last.ckpt`) would lose the rows of every
    epoch before the crash. Here they stay. As in TensorBoard, rows logged after the
    checkpoint by the interrupted run (at most the epoch it was in) stay too, followed by the
    resumed run's rows for the same steps: for a step or epoch, the last row is the one that
    counts.
    """

    @property
    @override
    @rank_zero_experiment
    def experiment(self) -> AppendingExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment


LOSS_CURVES = ("train/loss", "val/loss")


def read_loss_curves(tensorboard_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Per-epoch train and val loss from a run's TensorBoard event files, as {tag: (epochs, values)}.

    Lightning logs an `epoch` scalar at each step where it logs, which maps steps to epochs.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not Path(tensorboard_dir).is_dir():
        raise FileNotFoundError(f"{tensorboard_dir} does not exist")
    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # it logs every file it opens
    events = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0}).Reload()
    tags = set(events.Tags()["scalars"])
    missing = [tag for tag in (*LOSS_CURVES, "epoch") if tag not in tags]
    if missing:
        raise FileNotFoundError(f"{tensorboard_dir} has no TensorBoard scalars {missing}")
    epoch_at_step = {event.step: int(event.value) for event in events.Scalars("epoch")}
    curves = {}
    for tag in LOSS_CURVES:
        points = {
            epoch_at_step.get(e.step, e.step): e.value for e in events.Scalars(tag)
        }  # last write wins
        epochs = sorted(points)
        curves[tag] = (epochs, [points[e] for e in epochs])
    return curves


def read_loss_curves_csv(metrics_csv: Path) -> dict[str, tuple[list[int], list[float]]]:
    """The same curves from the metrics.csv of `logger=csv` (one row per logging step, with
    its `epoch`); for an epoch logged twice (a resumed run), the last row wins."""
    if not Path(metrics_csv).is_file():
        raise FileNotFoundError(f"{metrics_csv} does not exist")
    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0]) if rows else set()
    missing = [tag for tag in (*LOSS_CURVES, "epoch") if tag not in columns]
    if missing:
        raise FileNotFoundError(f"{metrics_csv} has no columns {missing}")
    curves = {}
    for tag in LOSS_CURVES:
        try:
            points = {
                int(float(row["epoch"])): float(row[tag])
                for row in rows
                if row[tag] and row["epoch"]
            }
        except (TypeError, ValueError) as e:  # an edited or cut file: no curves, the rest stays
            raise FileNotFoundError(
                f"{metrics_csv} has a {tag} or epoch that is no number ({e})"
            ) from e
        epochs = sorted(points)
        curves[tag] = (epochs, [points[e] for e in epochs])
    return curves


def read_run_loss_curves(run_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """A run's loss curves from its TensorBoard log (`<run>/tensorboard`), else from its CSV
    log (`<run>/csv/metrics.csv`, `logger=csv`)."""
    run_dir = Path(run_dir)
    try:
        return read_loss_curves(run_dir / "tensorboard")
    except FileNotFoundError as no_tensorboard:
        try:
            return read_loss_curves_csv(run_dir / "csv" / "metrics.csv")
        except FileNotFoundError as no_csv:
            raise FileNotFoundError(f"{no_tensorboard}; {no_csv}") from None
