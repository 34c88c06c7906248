"""report/heatmaps.png: for each finding (a row), the test images the model scored highest for
it, each with its Grad-CAM heatmap for that finding (cam.py), its score and whether the
decision was right: TP or TN in a green frame, FP or FN in a red one, at the thresholds tuned
on validation (the arg-max class for a multi-class task), as predict decides. The top scores
are where the model is surest: a red frame there is a confident mistake worth looking at.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from chest_mnist.cam import heatmaps, overlay  # noqa: E402
from chest_mnist.plots import inches, wrapped  # noqa: E402
from chest_mnist.report_content import Report  # noqa: E402

HEATMAPS = "heatmaps.png"
RIGHT, WRONG = "tab:green", "tab:red"


class Pick(NamedTuple):
    """One cell of the figure: a test image, the output it is shown for, and its verdict."""

    image: int  # index in the test split
    output: int  # the label (or class) index
    score: float
    verdict: str  # TP, FP, FN or TN: the decision against the truth


def top_scored(report: Report, per_label: int) -> list[Pick]:
    """For each output in order, its `per_label` highest-scored test images (ties: the first
    in the split), decided as predict decides (the tuned thresholds, or the arg-max class)."""
    scores, truth = report.test
    predicted = report.task.predicted(scores, report.thresholds)
    order = torch.argsort(scores, dim=0, descending=True, stable=True)[:per_label]
    picks = []
    for k in range(len(report.labels)):
        present = report.task.truth(truth, k).bool()
        for i in order[:, k].tolist():
            said = bool(predicted[i, k])
            verdict = ("T" if said == bool(present[i]) else "F") + ("P" if said else "N")
            picks.append(Pick(i, k, float(scores[i, k]), verdict))
    return picks


def write_heatmap_figure(
    model: nn.Module, datamodule, report: Report, out_dir: Path, per_label: int = 4
) -> Path:
    """`out_dir`/heatmaps.png from `report.test` (scores and truth in the test split's order)
    and the test split's images in `datamodule`: a row per output, `per_label` images each.
    The model's weights are left as they were."""
    picks = top_scored(report, per_label)
    index = torch.tensor([pick.image for pick in picks], dtype=torch.long)
    pixels = np.asarray(datamodule.splits["test"].images[index])
    maps = heatmaps(
        model,
        pixels,
        datamodule.hparams.mean,
        datamodule.hparams.std,
        np.array([[pick.output] for pick in picks]),
        device=next(model.parameters()).device,
    )
    rows, cols = len(report.labels), len(picks) // len(report.labels)
    # each row's label in lines shorter than its images are high (BloodMNIST has a class name
    # of 67 characters), the left margin grown by a line of 9 points for each past the first
    names = ["\n".join(wrapped(label, 1.6, fontsize=9)) for label in report.labels]
    more = 0.15 * max(name.count("\n") for name in names)
    # a cell of 1.9 x 2.0 inches: the image and its title above; margins for the row labels
    # (left) and the title (top, wrapped to the width), fixed: a layout engine measured every
    # title again and took most of the figure's time
    width, height = 1.9 * cols + 0.6 + more, 2.0 * rows + 0.4
    empty = (
        "; map empty: Grad-CAM found no region that raises the score"
        if any(not heatmap.max() > 0 for heatmap in maps[:, 0])
        else ""
    )
    title = wrapped(
        f"Grad-CAM: the {cols} highest test scores per {report.task.words.output}; "
        f"green: decided right, red: wrong{empty}",
        width - 0.2,
        fontsize=10,
    )
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(width, height),
        dpi=100,
        squeeze=False,
        gridspec_kw=inches(
            width, height, 0.45 + more, 0.1, 0.1, 0.4 + 0.2 * len(title), wspace=0.1, hspace=0.2
        ),
    )
    for cell, (ax, pick, heatmap) in enumerate(zip(axes.flat, picks, maps[:, 0], strict=True)):
        colour = RIGHT if pick.verdict.startswith("T") else WRONG
        ax.imshow(overlay(pixels[cell], heatmap))
        blank = ", map empty" if not heatmap.max() > 0 else ""
        ax.set_title(f"{pick.score:.2f} {pick.verdict}{blank}", fontsize=9, color=colour)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_color(colour)
            spine.set_linewidth(3)
        if cell % cols == 0:
            ax.set_ylabel(names[pick.output], fontsize=9)
    fig.suptitle("\n".join(title), fontsize=10, y=1 - 0.1 / height, va="top")
    path = Path(out_dir) / HEATMAPS
    fig.savefig(path)
    plt.close(fig)
    return path
