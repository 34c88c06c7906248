"""The report's figures, drawn from arrays: loss curves, per-label and per-class confusion
matrices, ROC and PR curves, the reliability diagram; and the text wrapping they share."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def plot_loss_curves(
    curves: dict[str, tuple[list[int], list[float]]], path: Path, loss: str = "BCE loss"
) -> Path:
    """One line per curve name (e.g. "train/loss", "val/loss"), `loss` (its axis's name: the
    task's, task.Words.loss) against epoch."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, (epochs, values) in curves.items():
        ax.plot(epochs, values, marker="o" if len(epochs) < 30 else None, label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(loss)
    ax.set_title("Loss per epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _draw_counts(ax, matrix: np.ndarray, fontsize: int) -> None:
    """A confusion matrix with its counts, coloured by each true row's share."""
    share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(matrix):
        color = "white" if share[i, j] > 0.5 else "black"
        ax.text(j, i, f"{count:,}", ha="center", va="center", color=color, fontsize=fontsize)


def wrapped(title: str, width: float, fontsize: float = 12) -> list[str]:
    """`title` in lines of at most about `width` inches at `fontsize` points (10 characters
    to the inch at 12 points: a character is a little over half its point size wide)."""
    return textwrap.wrap(title, width=max(10, int(width * 120 / fontsize)))


def inches(
    width: float, height: float, left: float, right: float, bottom: float, top: float, **spaces
) -> dict:
    """gridspec_kw for a `width` x `height` inch figure with these margins in inches (and
    `spaces`: wspace, hspace as matplotlib takes them, fractions of a panel)."""
    return {
        "left": left / width,
        "right": 1 - right / width,
        "bottom": bottom / height,
        "top": 1 - top / height,
        **spaces,
    }


def _panels(
    n: int,
    side: float,
    gaps: tuple[float, float],
    margins: tuple[float, float, float, float],
    title: str | None = None,
):
    """A figure of `n` square panels, 5 to a row, the cells left over hidden; a panel's axes
    `side` inches, `gaps` (between columns, between rows) and `margins` (left, right, bottom,
    top) in inches, room for the labels the panels and the figure carry; `title` above them
    all, wrapped to the figure's width (one panel is narrower than a long title). Laid out by
    these fixed sizes rather than by tight_layout, which measured every label of every panel
    again and took most of a figure's time (DPI: 110)."""
    cols = min(n, 5)
    rows = math.ceil(n / cols)
    (across, down), (left, right, bottom, top) = gaps, margins
    width = left + cols * side + (cols - 1) * across + right
    lines = wrapped(title, width) if title else []
    top += 0.25 * len(lines)
    height = bottom + rows * side + (rows - 1) * down + top
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(width, height),
        dpi=110,
        squeeze=False,
        gridspec_kw=inches(
            width, height, left, right, bottom, top, wspace=across / side, hspace=down / side
        ),
    )
    if lines:
        fig.suptitle("\n".join(lines), y=1 - 0.1 / height, va="top")
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, axes.flat


def plot_confusion_matrices(
    confusion: np.ndarray, labels: list[str], path: Path, title: str
) -> Path:
    """A grid of 2x2 matrices (rows: true 0/1, columns: predicted 0/1) with counts."""
    fig, axes = _panels(
        len(labels), 2.0, gaps=(0.7, 0.5), margins=(0.65, 0.15, 0.35, 0.4), title=title
    )
    for ax, matrix, label in zip(axes, confusion, labels, strict=False):
        _draw_counts(ax, matrix, fontsize=9)
        ax.set_title(label, fontsize=10)
        ax.set_xticks([0, 1], ["pred 0", "pred 1"], fontsize=8)
        ax.set_yticks([0, 1], ["true 0", "true 1"], fontsize=8)
    fig.savefig(path)
    plt.close(fig)
    return path


def _curve_grid(labels: list[str]):
    """Panels for one curve per label, in [0, 1] on both axes, and each label's name in lines
    of a panel's width (BloodMNIST has a class name of 67 characters) for its panel's title;
    the rows apart and the top margin grown by the lines of the longest name past its first."""
    side = 2.1
    names = ["\n".join(wrapped(label, side, fontsize=9)) for label in labels]
    more = 0.15 * max(name.count("\n") for name in names)  # a line of 9 points, in inches
    fig, axes = _panels(
        len(labels), side, gaps=(0.45, 0.75 + more), margins=(0.75, 0.2, 0.6, 0.5 + more)
    )
    return fig, axes, names


def _save_grid(fig, xlabel: str, ylabel: str, path: Path) -> Path:
    fig.supxlabel(xlabel)
    fig.supylabel(ylabel)
    fig.savefig(path)
    plt.close(fig)
    return path


def _value(metric: float) -> str:
    """A curve's area for its title; NaN where it is undefined (no positives or negatives)."""
    return "undefined" if np.isnan(metric) else f"{metric:.3f}"


def plot_roc_curves(
    curves: list[tuple[np.ndarray, np.ndarray]], labels: list[str], aurocs: list[float], path: Path
) -> Path:
    """One ROC curve per label: (false positive rate, true positive rate), with its AUROC."""
    fig, axes, names = _curve_grid(labels)
    for ax, (fpr, tpr), label, auroc in zip(axes, curves, names, aurocs, strict=False):
        ax.plot(fpr, tpr, lw=1.5)
        ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey")  # chance
        ax.set_title(f"{label}\nAUROC {_value(auroc)}", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7)
    return _save_grid(fig, "false positive rate", "true positive rate", path)


def plot_pr_curves(
    curves: list[tuple[np.ndarray, np.ndarray]],
    labels: list[str],
    aps: list[float],
    prevalences: list[float],
    path: Path,
) -> Path:
    """One precision-recall curve per label, with its average precision; the dashed line is the
    label's prevalence, the precision of a model that guesses."""
    fig, axes, names = _curve_grid(labels)
    for ax, (recall, precision), label, ap, prevalence in zip(
        axes, curves, names, aps, prevalences, strict=False
    ):
        ax.plot(recall, precision, lw=1.5)
        ax.axhline(prevalence, ls="--", lw=0.8, color="grey")
        ax.set_title(f"{label}\nAP {_value(ap)}, prevalence {prevalence:.3f}", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.tick_params(labelsize=7)
    return _save_grid(fig, "recall", "precision", path)


def plot_class_confusion(confusion: np.ndarray, labels: list[str], path: Path, title: str) -> Path:
    """One (C, C) matrix for a multi-class task, with counts (rows: truth, columns: prediction)."""
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * n, 1.0 + 0.6 * n), dpi=110)
    _draw_counts(ax, confusion, fontsize=8)
    # a long class name (BloodMNIST's 67 characters) in lines on the left, cut short below
    short = [label if len(label) <= 24 else label[:23] + "…" for label in labels]
    ax.set_xticks(range(n), short, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), ["\n".join(wrapped(label, 2.0, fontsize=8)) for label in labels])
    ax.tick_params(labelsize=8)
    ax.set_xlabel("prediction")
    ax.set_ylabel("truth")
    # over the figure, not the axes (long class names push them right), wrapped to its width
    fig.suptitle("\n".join(wrapped(title, 1.2 + 0.7 * n, fontsize=9)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_reliability(
    curves: dict[str, dict[str, np.ndarray]],
    ece_per_label: dict[str, list[float]],
    labels: list[str],
    title: str,
    path: Path,
    frequency: str = "share of positives in the bin",
) -> Path:
    """Left: the reliability diagram, one line per entry of `curves` (e.g. "before" and "after"
    temperature scaling), the share of right answers against the mean score in each bin, the
    point sized by the bin's scores; the diagonal is perfect calibration. `frequency`: the
    y-axis's name for what a right answer is (a positive, or a top label that is the true
    class). Right: each label's ECE, one bar per entry of `ece_per_label`."""
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(11, 4.2 + 0.12 * len(labels)), dpi=110, width_ratios=(1, 1.2)
    )
    left.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey", label="perfectly calibrated")
    for name, points in curves.items():
        size = 10 + 90 * np.sqrt(points["count"] / max(points["count"].max(), 1))
        (line,) = left.plot(points["confidence"], points["frequency"], lw=1.2, label=name)
        left.scatter(
            points["confidence"], points["frequency"], s=size, alpha=0.6, color=line.get_color()
        )
    left.set_xlim(0, 1)
    left.set_ylim(0, 1)
    left.set_xlabel("mean predicted probability in the bin")
    left.set_ylabel(frequency)
    left.legend(fontsize=8, loc="upper left")
    left.grid(alpha=0.3)
    height = 0.8 / max(len(ece_per_label), 1)
    positions = np.arange(len(labels))
    for i, (name, values) in enumerate(ece_per_label.items()):
        right.barh(positions + i * height, values, height=height, label=name)
    names = ["\n".join(wrapped(label, 2.5, fontsize=8)) for label in labels]  # long class names
    right.set_yticks(positions + height * (len(ece_per_label) - 1) / 2, names, fontsize=8)
    right.invert_yaxis()
    right.set_xlabel("expected calibration error (ECE)")
    if len(ece_per_label) > 1:
        right.legend(fontsize=8)
    right.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
