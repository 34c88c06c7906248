"""The `report/` folder of a run, written the same way by `train` and `evaluate`:
`write_report` takes the `Report` (report_content.py), reads the training run's loss curves
(from its TensorBoard or CSV log: loggers.py) and hands both to each writer. Where each thing is made:

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

import logging
from pathlib import Path

from chest_mnist.loggers import read_run_loss_curves
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
