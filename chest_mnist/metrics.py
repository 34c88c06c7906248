"""Multi-label metrics with torchmetrics, by the MedMNIST definitions.

AUC is the macro mean of the per-label ROC AUCs and ACC the macro mean of the per-label
accuracies, a score strictly above 0.5 counting as positive: exactly `medmnist.evaluator`'s
`getAUC` and `getACC`, so our numbers compare with the published tables. Precision, recall
and F1 come micro (pooled over labels, dominated by the common ones) and macro (each label
equal). Inputs are probabilities, not logits.
"""

from __future__ import annotations

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryConfusionMatrix,
    BinaryF1Score,
    BinaryPrecision,
    BinaryRecall,
    MultilabelAccuracy,
    MultilabelAUROC,
    MultilabelConfusionMatrix,
    MultilabelF1Score,
    MultilabelPrecision,
    MultilabelRecall,
)

THRESHOLD = 0.5  # MedMNIST's ACC: score > 0.5 is positive


def _classes(num_labels: int) -> dict:
    """torchmetrics' multilabel classes, or the binary ones for a single label (a binary task:
    torchmetrics' multilabel metrics need two labels or more). Same definitions either way."""
    if num_labels == 1:
        kw = {"threshold": THRESHOLD}
        return {
            "auroc": lambda average: BinaryAUROC(),
            "acc": lambda average: BinaryAccuracy(**kw),
            "precision": lambda average: BinaryPrecision(**kw),
            "recall": lambda average: BinaryRecall(**kw),
            "f1": lambda average: BinaryF1Score(**kw),
            "confusion": lambda: BinaryConfusionMatrix(**kw),
        }
    kw = {"num_labels": num_labels, "threshold": THRESHOLD}
    return {
        "auroc": lambda average: MultilabelAUROC(num_labels=num_labels, average=average),
        "acc": lambda average: MultilabelAccuracy(average=average, **kw),
        "precision": lambda average: MultilabelPrecision(average=average, **kw),
        "recall": lambda average: MultilabelRecall(average=average, **kw),
        "f1": lambda average: MultilabelF1Score(average=average, **kw),
        "confusion": lambda: MultilabelConfusionMatrix(**kw),
    }


def scalar_metrics(num_labels: int) -> MetricCollection:
    """The epoch numbers for val and test: one collection, `.clone(prefix=...)` per stage."""
    make = _classes(num_labels)
    metrics = {"auroc": make["auroc"]("macro"), "acc": make["acc"]("macro")}
    for name in ("precision", "recall", "f1"):
        for average in ("micro", "macro"):
            metrics[f"{name}_{average}"] = make[name](average)
    return MetricCollection(metrics)


def per_label_metrics(num_labels: int) -> MetricCollection:
    """One value per label, plus the (num_labels, 2, 2) confusion matrices [[tn, fp], [fn, tp]]."""
    make = _classes(num_labels)
    metrics = {name: make[name](None) for name in ("auroc", "acc", "precision", "recall", "f1")}
    return MetricCollection({**metrics, "confusion": make["confusion"]()})


def all_negative_accuracy(targets: torch.Tensor) -> float:
    """MedMNIST ACC of the model that says "no finding" for every label of every image."""
    return (targets == 0).float().mean(0).mean().item()


def evaluate_predictions(scores: torch.Tensor, targets: torch.Tensor, labels: list[str]) -> dict:
    """Everything the report needs from one split's (N, L) probabilities and 0/1 targets.

    Returns {"scalars": {name: float}, "per_label": [{label, support, prevalence, auroc, acc,
    precision, recall, f1, tn, fp, fn, tp}], "confusion": (L, 2, 2) int tensor}.
    """
    targets = targets.int()
    scalars = scalar_metrics(len(labels)).to(scores.device)
    scalars.update(scores, targets)
    values = {name: value.item() for name, value in scalars.compute().items()}
    values["acc_all_negative"] = all_negative_accuracy(targets)
    values["n_images"] = len(targets)

    per_label = per_label_metrics(len(labels)).to(scores.device)
    per_label.update(scores, targets)
    per = {name: value.cpu().reshape(-1) for name, value in per_label.compute().items()}
    confusion = per.pop("confusion").long().reshape(-1, 2, 2)
    rows = []
    for k, label in enumerate(labels):
        (tn, fp), (fn, tp) = confusion[k].tolist()
        rows.append(
            {
                "label": label,
                "support": tp + fn,
                "prevalence": (tp + fn) / len(targets),
                **{
                    name: per[name][k].item()
                    for name in ("auroc", "acc", "precision", "recall", "f1")
                },
                "tn": tn,
                "fp": fp,
                "fn": fn,
                "tp": tp,
            }
        )
    return {"scalars": values, "per_label": rows, "confusion": confusion}
