"""The `report/` folder of a run, written the same way by `train` and `evaluate`:
`write_report` takes the `Report` (report_content.py), reads the training run's loss curves
(from its TensorBoard or CSV log, here) and hands both to each writer. Where each thing is made:

    metrics.py           every metric, the baseline, and the tuning of the thresholds
    report_content.py    the Report: those numbers, at 0.5 and tuned, without side effects
    report_tables.py     metrics.json (every test number under the names of `flat_metrics`,
                         and the run's facts: checkpoint, epochs), thresholds.json (for
                         `predict`, with the temperatures of calibration=temperature; the
                         formats in run_files.py), per_class.csv (one row
                         per label), predictions.npz (val and test scores and labels),
                         <flag>_test_[AUC]..._[ACC]...@<run>.csv (MedMNIST's result file)
    report_figures.py    confusion_matrices.png, roc_curves.png, pr_curves.png,
                         reliability.png, loss_curves.png (drawn by plots.py), and the same in TensorBoard
    report_markdown.py   report.md, a summary to read, with the figures
    report_heatmaps.py   heatmaps.png (needs the model: evaluate draws it, report.md links it)
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from chest_mnist.metrics import THRESHOLD
from chest_mnist.report_content import Report
from chest_mnist.report_figures import write_figures
from chest_mnist.report_markdown import write_markdown
from chest_mnist.report_tables import (
    write_medmnist_result,
    write_metrics_json,
    write_per_class_csv,
    write_predictions_npz,
    write_thresholds_json,
)

log = logging.getLogger(__name__)

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


def _loss_curves(run_dir: Path | None) -> tuple[dict | None, str | None]:
    """The training run's loss curves, or None and why there are none."""
    if run_dir is None:
        return None, "no training run given"
    try:
        return read_run_loss_curves(run_dir), None
    except FileNotFoundError as e:
        log.warning("No loss curves: %s. The rest of the report is written.", e)
        return None, str(e)


def write_report(
    out_dir: Path,
    report: Report,
    flag: str,
    size: int,
    run_dir: Path | None = None,
    facts: dict | None = None,
    figures: bool = True,
    drawn: tuple[str, ...] = (),
) -> Path:
    """Write every report file into `out_dir`. `flag` and `size`: the data, in report.md's
    title and MedMNIST's result file name. `run_dir`, the training run: its name ends that file
    name, its logs (TensorBoard, else CSV) give the loss curves; without them only that figure
    is missing (said in report.md). `facts`: the run's, for metrics.json; its "checkpoint" and
    "weights_sha256" name the weights evaluated, in thresholds.json and report.md too.
    `figures=False` (`figures=false`): none drawn, report.md says so; else `drawn`, files the
    caller drew into `out_dir` (heatmaps.png), are listed after the report's."""
    out_dir.mkdir(parents=True, exist_ok=True)
    facts = facts or {}
    for label, reason in report.threshold_notes.items():
        log.warning("%s keeps the threshold %s: %s.", label, THRESHOLD, reason)
    write_metrics_json(report, out_dir, facts)
    write_per_class_csv(report, out_dir)
    write_thresholds_json(report, out_dir, facts)
    write_predictions_npz(report, out_dir)
    run_name = Path(run_dir).name if run_dir is not None else "chest_mnist"
    write_medmnist_result(report, out_dir, flag, size, run_name)
    listed, loss_note = [], None
    if figures:
        loss_curves, loss_note = _loss_curves(run_dir)
        listed = write_figures(report, out_dir, loss_curves) + list(drawn)
    write_markdown(report, out_dir, listed, loss_note, flag, facts)
    log.info("Report written to %s", out_dir)
    return out_dir
