"""The report's figures, each from a `Report` (report_content.py) and drawn by plots.py:

    confusion_matrices.png   test, at the thresholds tuned on validation (multi-class: one
                             matrix of the arg-max class)
    roc_curves.png           one panel per label on test; the curves' points are computed here
    pr_curves.png            the same for precision and recall
    reliability.png          the reliability diagram of the test scores, pooled as the overall
                             ECE pools them, and each label's ECE (before and after
                             temperature scaling, when it was applied)
    loss_curves.png          train and val loss per epoch, from the run's logs (report.py)

and `log_to_tensorboard`: the same figures, and one PR curve per label, in TensorBoard.
The truth of one output (a label's column, or one class against the rest) is the `Task`'s
(task.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchmetrics.functional.classification import binary_precision_recall_curve, binary_roc

from chest_mnist.calibration import (
    pooled,
    reliability_bins,
)
from chest_mnist.metrics import THRESHOLD
from chest_mnist.plots import (
    plot_class_confusion,
    plot_confusion_matrices,
    plot_loss_curves,
    plot_pr_curves,
    plot_reliability,
    plot_roc_curves,
)
from chest_mnist.report_content import Report
from chest_mnist.task import Task

Curve = tuple[np.ndarray, np.ndarray]  # (x, y) points of one label's curve
# every figure write_figures can draw, in report.md's order
FIGURES = (
    "loss_curves.png",
    "confusion_matrices.png",
    "roc_curves.png",
    "pr_curves.png",
    "reliability.png",
)


def remove_figures(out_dir: Path, names: tuple[str, ...]) -> None:
    """An earlier report's figures of these `names` in `out_dir` (a resumed run writes into
    its report/ again): gone before this report draws its own, or none (figures=false), so
    that none of them, nor their TensorBoard images, shows weights this report is not of.
    Any other file there is left alone."""
    for name in names:
        (out_dir / name).unlink(missing_ok=True)


def curves_on_test(report: Report) -> tuple[list[Curve], list[Curve]]:
    """Per label on test: the ROC curve (false positive rate, true positive rate) and the
    precision-recall curve (recall, precision)."""
    scores, targets = report.test[0].float(), report.test[1].int()
    rocs, prs = [], []
    for k in range(len(report.labels)):
        truth = report.task.truth(targets, k)
        fpr, tpr, _ = binary_roc(scores[:, k], truth)
        precision, recall, _ = binary_precision_recall_curve(scores[:, k], truth)
        rocs.append((fpr.numpy(), tpr.numpy()))
        prs.append((recall.numpy(), precision.numpy()))
    return rocs, prs


def write_confusion_matrices(report: Report, path: Path) -> Path:
    """At the tuned thresholds, one (2, 2) matrix per label; without thresholds to tune, the
    one (C, C) matrix of the arg-max class."""
    if not report.task.tunes_thresholds:
        return plot_class_confusion(
            report.confusion.numpy(),
            report.labels,
            path,
            title="test confusion matrix, arg-max class (rows: truth, columns: prediction)",
        )
    return plot_confusion_matrices(
        report.confusion_tuned.numpy(),
        report.labels,
        path,
        title=(
            f"test confusion matrices at thresholds tuned on validation ({report.rule}); rows: truth"
            if report.tuned
            else f"test confusion matrices at {THRESHOLD} (thresholds.rule=fixed); rows: truth"
        ),
    )


def write_reliability(report: Report, path: Path) -> Path:
    """The reliability diagram and the per-label ECE, before and after temperature scaling
    when the report has it (the title gives the overall ECE of each). The diagram bins what
    `pooled` pools; its y-axis says what a bin's share is of: positives, or (a multi-class
    task) top labels that are the true class."""
    task, targets, rows = report.task, report.test[1], report.per_label
    scores = {"test": report.test[0]}
    ece = {"ECE": [r["ece"] for r in rows]}
    if report.scaling is not None:
        scores = {"before scaling": report.scaling.test_before, "after": report.test[0]}
        ece = {"before scaling": [r["ece_before"] for r in rows], "after": ece["ECE"]}
    curves = {
        name: reliability_bins(*pooled(values, targets, task), report.bins)
        for name, values in scores.items()
    }
    overall = f"ECE {report.scalars['ece']:.4f}"
    if report.scaling is not None:  # the diagram draws both: the title gives each
        before, after = report.scalars["ece_before"], report.scalars["ece"]
        overall = f"ECE {before:.4f} before scaling, {after:.4f} after"
    title = f"Calibration on test: {task.words.pooled}, {overall}; {report.bins} equal-width bins"
    frequency = task.words.bin_frequency
    return plot_reliability(curves, ece, report.labels, title, path, frequency)


def write_figures(
    report: Report, out_dir: Path, loss_curves: dict[str, tuple[list[int], list[float]]] | None
) -> list[str]:
    """Draw every figure into `out_dir`, the loss curves only when given; return the names of
    the files drawn, in report.md's order."""
    write_confusion_matrices(report, out_dir / "confusion_matrices.png")
    rocs, prs = curves_on_test(report)
    rows = report.per_label
    plot_roc_curves(rocs, report.labels, [r["auroc"] for r in rows], out_dir / "roc_curves.png")
    plot_pr_curves(
        prs,
        report.labels,
        [r["ap"] for r in rows],
        [r["prevalence_test"] for r in rows],
        out_dir / "pr_curves.png",
    )
    write_reliability(report, out_dir / "reliability.png")
    if loss_curves is not None:
        plot_loss_curves(loss_curves, out_dir / "loss_curves.png", report.task.words.loss)
    return [name for name in FIGURES if loss_curves is not None or name != "loss_curves.png"]


def log_to_tensorboard(
    writer,
    report_dir: Path,
    test: tuple[torch.Tensor, torch.Tensor],
    labels: list[str],
    task: Task,
    step: int,
) -> None:
    """The report's figures into a TensorBoard run (IMAGES: `report/<figure>`) and one
    precision-recall curve per label on test (PR CURVES: `test/pr_curve/<label>`, TensorBoard's
    own interactive plot, with the counts at each threshold). `writer`: a SummaryWriter."""
    from PIL import Image

    for png in sorted(report_dir.glob("*.png")):
        with Image.open(png) as image:
            pixels = np.asarray(image.convert("RGB"))
        writer.add_image(f"report/{png.stem}", pixels, step, dataformats="HWC")
    scores, targets = test[0].float(), test[1]
    for k, label in enumerate(labels):
        truth = task.truth(targets, k).bool()
        writer.add_pr_curve(f"test/pr_curve/{label}", truth, scores[:, k], step)
    writer.flush()
