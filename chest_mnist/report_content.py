"""What a run's report says, as one value: `build_report` makes a `Report` from the validation
and test predictions of one checkpoint, with no files and no logging. Per-label thresholds
are tuned on validation (never on test) and applied to test; every decision metric is given
at 0.5 (MedMNIST's ACC) and at the tuned thresholds, next to the constant baseline. The
writers (report_tables.py, report_figures.py, report_markdown.py) only read it. What differs
between tasks (arg-max and no thresholds for multi-class, the report's words) is `Report.task`'s,
a `Task` (task.py): the writers ask it and do not branch on the task's name."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chest_mnist.metrics import DECISIONS, evaluate_predictions, tune_thresholds
from chest_mnist.task import MULTI_LABEL_TASK, Task

Split = tuple[torch.Tensor, torch.Tensor]  # (probabilities, labels) of a whole split
# scalars that no threshold changes: reported once, not again as "<name>_tuned"
THRESHOLD_FREE = (
    "auroc",
    "auroc_labels",
    "ap_macro",
    "ap_macro_labels",
    "acc_all_negative",
    "n_images",
)


@dataclass
class Report:
    """Everything report/ is written from, on test unless named val; `build_report` makes it,
    the writers only read it."""

    labels: list[str]  # the model's outputs: labels, or the classes of a multi-class task
    task: Task  # its rules: thresholds tuned or arg-max, the words for its outputs
    rule: str  # how thresholds were tuned (a thresholds.rule), or "argmax"
    # at 0.5 (or arg-max); "<name>_tuned" at the tuned thresholds; the "loss" when given
    scalars: dict[str, float]
    per_label: list[dict]  # per_class.csv's rows, with its columns in order
    thresholds: torch.Tensor | None  # one per label, tuned on val; None for arg-max
    threshold_notes: dict[str, str]  # {label: why it kept THRESHOLD}
    confusion: torch.Tensor  # at 0.5: (L, 2, 2); arg-max: (C, C), rows the truth
    confusion_tuned: torch.Tensor | None  # at the tuned thresholds: (L, 2, 2)
    val: Split
    test: Split


def build_report(
    val: Split,
    test: Split,
    labels: list[str],
    prevalence_train: torch.Tensor,
    rule: str = "f1",
    task: Task = MULTI_LABEL_TASK,
    loss: float | None = None,
) -> Report:
    """Every metric on `test` = (scores, targets): at 0.5 and at thresholds tuned on `val`, or
    at the arg-max class for a multi-class task (no thresholds to tune). The constant baseline
    is chosen on the training split's `prevalence_train`; `loss`, the test loss, is reported
    as given."""
    thresholds, kept, tuned = None, {}, None
    at_half = evaluate_predictions(*test, labels, task=task)
    if task.tunes_thresholds:
        thresholds, kept = tune_thresholds(*val, rule=rule)
        tuned = evaluate_predictions(*test, labels, thresholds, task=task)
    scalars = dict(at_half["scalars"])
    # chosen on train, as a model would be: the test labels' own majority would have peeked
    scalars["acc_majority"] = task.majority_accuracy(test[1], prevalence_train)
    for name, value in (tuned["scalars"] if tuned else {}).items():
        if name not in THRESHOLD_FREE:
            scalars[f"{name}_tuned"] = value
    if loss is not None:
        scalars["loss"] = loss
    return Report(
        labels=list(labels),
        task=task,
        rule=rule if task.tunes_thresholds else "argmax",
        scalars=scalars,
        per_label=_per_label_rows(at_half, tuned, prevalence_train),
        thresholds=thresholds,
        threshold_notes={labels[k]: reason for k, reason in kept.items()},
        confusion=at_half["confusion"],
        confusion_tuned=tuned["confusion"] if tuned else None,
        val=val,
        test=test,
    )


def _per_label_rows(
    at_half: dict, tuned: dict | None, prevalence_train: torch.Tensor
) -> list[dict]:
    """per_class.csv's rows from `evaluate_predictions` at 0.5 and at the tuned thresholds (if
    any): the label's facts and ranking metrics, its decisions at both, and its counts."""
    rows = []
    for k, half in enumerate(at_half["per_label"]):
        row = {"label": half["label"], "prevalence_train": float(prevalence_train[k])}
        row |= {
            "prevalence_test": half["prevalence"],
            "support": half["support"],
            "auroc": half["auroc"],
            "ap": half["ap"],
        }
        row |= {name: half[name] for name in DECISIONS}
        counts = half
        if tuned:
            best = counts = tuned["per_label"][k]
            row["threshold"] = best["threshold"]
            row |= {f"{name}_tuned": best[name] for name in DECISIONS}
        row |= {
            name: counts[name] for name in ("tn", "fp", "fn", "tp")
        }  # at the tuned threshold, if any
        rows.append(row)
    return rows
