"""The `report/` folder of a run: metrics.json, per_class.csv, figures and predictions."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np

from chest_mnist.plots import plot_confusion_matrices, plot_loss_curves

log = logging.getLogger(__name__)

LOSS_CURVES = ("train/loss", "val/loss")


def read_loss_curves(tensorboard_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Per-epoch train and val loss from a run's TensorBoard event files, as {tag: (epochs, values)}.

    Lightning logs an `epoch` scalar at each step where it logs, which maps steps to epochs.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

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


def write_report(
    out_dir: Path,
    report: dict,
    predictions: dict,
    labels: list[str],
    tensorboard_dir: Path | None = None,
    extra: dict | None = None,
    split: str = "test",
) -> Path:
    """Write the report files for one split into `out_dir` and return it.

    `report` is `metrics.evaluate_predictions`'s result, `predictions` holds the (N, L)
    `scores` and `labels` it came from. A missing TensorBoard log costs only the loss curves.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = {f"{split}/{name}": value for name, value in report["scalars"].items()}
    for row in report["per_label"]:
        for name in ("auroc", "acc", "precision", "recall", "f1"):
            metrics[f"{split}/{name}/{row['label']}"] = row[name]
    metrics.update(extra or {})
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    with open(out_dir / "per_class.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(report["per_label"][0]))
        writer.writeheader()
        writer.writerows(report["per_label"])

    np.savez_compressed(
        out_dir / "predictions.npz",
        scores=predictions["scores"].float().numpy(),
        labels=predictions["labels"].numpy().astype(np.uint8),
        label_names=np.array(labels),
    )
    plot_confusion_matrices(
        report["confusion"].numpy(),
        labels,
        out_dir / "confusion_matrices.png",
        title=f"{split} confusion matrices at threshold 0.5 (rows: truth, columns: prediction)",
    )
    if tensorboard_dir is not None:
        try:
            plot_loss_curves(read_loss_curves(tensorboard_dir), out_dir / "loss_curves.png")
        except FileNotFoundError as e:
            log.warning("No loss curves: %s", e)
    log.info("Report written to %s", out_dir)
    return out_dir
