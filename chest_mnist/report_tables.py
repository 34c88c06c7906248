"""The report's numbers as files for programs, each written from a `Report` (report_content.py):

    metrics.json       every test number (`flat_metrics` names them) and the run's facts
    thresholds.json    the tuned thresholds (and temperatures), and the weights they were tuned
                       for, for `predict`
    per_class.csv      one row per label
    predictions.npz    val and test scores and labels
    <flag>_test_[AUC]..._[ACC]...@<run>.csv   MedMNIST's standard result file

The formats of the two JSON files, and their readers, are in run_files.py.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from chest_mnist import run_files
from chest_mnist.calibration import describe_bins
from chest_mnist.metrics import THRESHOLD
from chest_mnist.npz import size_suffix
from chest_mnist.report_content import Report

# per_class.csv columns that are counts or facts, not metrics: not in metrics.json
NOT_METRICS = (
    "label",
    "support",
    "prevalence_train",
    "prevalence_test",
    "temperature",
    "tn",
    "fp",
    "fn",
    "tp",
)


def flat_metrics(report: Report, split: str = "test") -> dict[str, float]:
    """The report's numbers under TensorBoard-style names: test/auroc, test/f1/<label>, ..."""
    metrics = {f"{split}/{name}": value for name, value in report.scalars.items()}
    for row in report.per_label:
        for name, value in row.items():
            if name not in NOT_METRICS:
                metrics[f"{split}/{name}/{row['label']}"] = value
    return metrics


def report_facts(report: Report) -> dict:
    """How the intervals and the calibration error were computed, and how the temperatures
    (thresholds.json, per_class.csv) lowered the validation NLL."""
    facts = {
        "intervals": report.bootstrap.describe() if report.bootstrap else None,
        "calibration_error": f"ECE, torchmetrics, {describe_bins(report.bins)}",
        "calibration": "none",
    }
    if report.scaling is not None:
        facts["calibration"] = "temperature, " + (
            "one per label" if report.scaling.per_label else "one for all outputs"
        )
        nll = report.scaling.nll
        facts["temperature_val_nll"] = {"before": nll["val_before"], "after": nll["val_after"]}
    return facts


def write_metrics_json(report: Report, out_dir: Path, facts: dict) -> Path:
    """metrics.json: every test number, how the intervals and the calibration were made, then
    the run's `facts` (checkpoint, epochs, ...)."""
    return run_files.write_metrics(out_dir, flat_metrics(report) | report_facts(report) | facts)


def write_thresholds_json(report: Report, out_dir: Path, facts: dict) -> Path:
    """thresholds.json: the tuned thresholds, the temperatures the scores they were tuned on were
    scaled by (`calibration=temperature`), and the weights they were tuned for (the facts'
    checkpoint and weights_sha256): predict uses them for these weights only."""
    checkpoint = facts.get(run_files.CHECKPOINT)
    tuned = None
    if report.thresholds is not None:  # none to tune for the arg-max (Task.tunes_thresholds)
        tuned = {label: float(t) for label, t in zip(report.labels, report.thresholds, strict=True)}
    thresholds = run_files.Thresholds(
        rule=report.rule,
        default=THRESHOLD,
        labels=tuned,
        checkpoint=Path(checkpoint).name if checkpoint else None,
        weights_sha256=facts.get(run_files.WEIGHTS_SHA256),
        kept_at_default=report.threshold_notes,
        chosen_on=None if tuned is None else "val",
        temperatures=None
        if report.scaling is None
        else dict(
            zip(
                report.labels,
                report.scaling.temperature.expand(len(report.labels)).tolist(),
                strict=True,
            )
        ),
    )
    return run_files.write_thresholds(out_dir, thresholds)


def write_per_class_csv(report: Report, out_dir: Path) -> Path:
    path = out_dir / "per_class.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(report.per_label[0]))
        writer.writeheader()
        writer.writerows(report.per_label)
    return path


def write_predictions_npz(report: Report, out_dir: Path) -> Path:
    """predictions.npz: the test and val probabilities and labels, the label names, and the
    tuned thresholds (none for a multi-class task)."""
    arrays = {
        "scores": report.test[0].float().numpy(),
        "labels": report.test[1].numpy().astype(np.uint8),
        "val_scores": report.val[0].float().numpy(),
        "val_labels": report.val[1].numpy().astype(np.uint8),
        "label_names": np.array(report.labels),
    }
    if report.thresholds is not None:
        arrays["thresholds"] = report.thresholds.numpy()
    path = out_dir / "predictions.npz"
    np.savez_compressed(path, **arrays)
    return path


def medmnist_result_name(flag: str, size: int, split: str, auc: float, acc: float, run: str) -> str:
    """The file name `medmnist.Evaluator` writes and `python -m medmnist evaluate` parses."""
    return f"{flag}{size_suffix(size)}_{split}_[AUC]{auc:.3f}_[ACC]{acc:.3f}@{run}.csv"


def write_medmnist_result(report: Report, out_dir: Path, flag: str, size: int, run: str) -> Path:
    """MedMNIST's result file of the test scores, named by their AUC and ACC and the `run`: one
    row per image, its index then its scores; no header (MedMNIST's format). An earlier one in
    `out_dir` (a resumed run's report, of other weights, under another name) is removed."""
    name = medmnist_result_name(
        flag, size, "test", report.scalars["auroc"], report.scalars["acc"], run
    )
    for earlier in out_dir.glob("*_test_[[]AUC[]]*_[[]ACC[]]*@*.csv"):  # [ and ] escaped
        earlier.unlink()
    path = out_dir / name
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        for index, row in enumerate(report.test[0].float().numpy().astype(np.float64)):
            writer.writerow([index, *(repr(float(v)) for v in row)])
    return path
