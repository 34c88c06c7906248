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
    BinaryAveragePrecision,
    BinaryConfusionMatrix,
    BinaryF1Score,
    BinaryPrecision,
    BinaryRecall,
    MultilabelAccuracy,
    MultilabelAUROC,
    MultilabelAveragePrecision,
    MultilabelConfusionMatrix,
    MultilabelF1Score,
    MultilabelPrecision,
    MultilabelRecall,
)

from chest_mnist import UserError

THRESHOLD = 0.5  # MedMNIST's ACC: score > 0.5 is positive


def _classes(num_labels: int) -> dict:
    """torchmetrics' multilabel classes, or the binary ones for a single label (a binary task:
    torchmetrics' multilabel metrics need two labels or more). Same definitions either way."""
    if num_labels == 1:
        kw = {"threshold": THRESHOLD}
        return {
            "auroc": lambda average: BinaryAUROC(),
            "ap": lambda average: BinaryAveragePrecision(),
            "acc": lambda average: BinaryAccuracy(**kw),
            "precision": lambda average: BinaryPrecision(**kw),
            "recall": lambda average: BinaryRecall(**kw),
            "f1": lambda average: BinaryF1Score(**kw),
            "confusion": lambda: BinaryConfusionMatrix(**kw),
        }
    kw = {"num_labels": num_labels, "threshold": THRESHOLD}
    return {
        "auroc": lambda average: MultilabelAUROC(num_labels=num_labels, average=average),
        "ap": lambda average: MultilabelAveragePrecision(num_labels=num_labels, average=average),
        "acc": lambda average: MultilabelAccuracy(average=average, **kw),
        "precision": lambda average: MultilabelPrecision(average=average, **kw),
        "recall": lambda average: MultilabelRecall(average=average, **kw),
        "f1": lambda average: MultilabelF1Score(average=average, **kw),
        "confusion": lambda: MultilabelConfusionMatrix(**kw),
    }


def scalar_metrics(num_labels: int) -> MetricCollection:
    """The epoch numbers for val and test at threshold 0.5: one collection,
    `.clone(prefix=...)` per stage."""
    make = _classes(num_labels)
    metrics = {"auroc": make["auroc"]("macro"), "acc": make["acc"]("macro")}
    for name in ("precision", "recall", "f1"):
        for average in ("micro", "macro"):
            metrics[f"{name}_{average}"] = make[name](average)
    return MetricCollection(metrics)


def decision_metrics(num_labels: int) -> MetricCollection:
    """Metrics of 0/1 decisions (integer preds: torchmetrics applies no threshold to them):
    macro ACC, micro and macro precision/recall/F1, the same per label, and the confusion
    matrices (num_labels, 2, 2) [[tn, fp], [fn, tp]]."""
    make = _classes(num_labels)
    metrics = {"acc": make["acc"]("macro")}
    for name in ("precision", "recall", "f1"):
        for average in ("micro", "macro"):
            metrics[f"{name}_{average}"] = make[name](average)
    for name in DECISIONS:
        metrics[f"per_label_{name}"] = make[name](None)
    return MetricCollection({**metrics, "confusion": make["confusion"]()})


DECISIONS = ("acc", "precision", "recall", "f1")


def all_negative_accuracy(targets: torch.Tensor) -> float:
    """MedMNIST ACC of the model that says "no finding" for every label of every image."""
    return (targets == 0).float().mean(0).mean().item()


def evaluate_predictions(
    scores: torch.Tensor,
    targets: torch.Tensor,
    labels: list[str],
    thresholds: torch.Tensor | None = None,
) -> dict:
    """Everything the report needs from one split's (N, L) probabilities and 0/1 targets.

    Ranking metrics (AUROC, average precision) use the scores; decisions are `score >
    threshold`, per label (0.5 when `thresholds` is None, MedMNIST's ACC). Returns
    {"scalars": {name: float}, "per_label": [{label, support, prevalence, auroc, ap, acc,
    precision, recall, f1, tn, fp, fn, tp}], "confusion": (L, 2, 2) int tensor}.
    """
    targets = targets.int()
    make = _classes(len(labels))
    ranking = MetricCollection({"auroc": make["auroc"](None), "ap": make["ap"](None)}).to(
        scores.device
    )
    ranking.update(scores, targets)
    per = {name: value.cpu().reshape(-1) for name, value in ranking.compute().items()}
    threshold = torch.full((len(labels),), THRESHOLD) if thresholds is None else thresholds
    decisions = (scores > threshold.to(scores.device)).int()
    decided = decision_metrics(len(labels)).to(scores.device)
    decided.update(decisions, targets)
    values = {name: value.cpu() for name, value in decided.compute().items()}
    confusion = values.pop("confusion").long().reshape(-1, 2, 2)
    for name in DECISIONS:
        per[name] = values.pop(f"per_label_{name}").reshape(-1)

    scalars = {"auroc": per["auroc"].mean().item(), "ap_macro": per["ap"].mean().item()}
    scalars |= {name: value.item() for name, value in values.items()}
    scalars["acc_all_negative"] = all_negative_accuracy(targets)
    scalars["n_images"] = len(targets)
    rows = []
    for k, label in enumerate(labels):
        (tn, fp), (fn, tp) = confusion[k].tolist()
        rows.append(
            {
                "label": label,
                "support": tp + fn,
                "prevalence": (tp + fn) / len(targets),
                **{name: per[name][k].item() for name in ("auroc", "ap", *DECISIONS)},
                "threshold": threshold[k].item(),
                "tn": tn,
                "fp": fp,
                "fn": fn,
                "tp": tp,
            }
        )
    return {"scalars": scalars, "per_label": rows, "confusion": confusion}


THRESHOLD_RULES = ("f1", "youden", "fixed")


def tune_thresholds(scores: torch.Tensor, targets: torch.Tensor, rule: str = "f1") -> torch.Tensor:
    """One decision threshold per label, chosen on these (validation) predictions.

    rule "f1" maximises the label's F1, "youden" its TPR - FPR, "fixed" keeps 0.5. Every cut
    between two distinct scores is a candidate, and the threshold is placed midway between
    them, so `score > threshold` reproduces the chosen cut. A label without positives keeps 0.5.
    """
    if rule not in THRESHOLD_RULES:
        raise UserError(
            f"thresholds.rule={rule!r} is unknown; choose one of {', '.join(THRESHOLD_RULES)}."
        )
    scores, targets = scores.detach().double().cpu(), targets.cpu()
    thresholds = torch.full((scores.shape[1],), THRESHOLD, dtype=torch.float64)
    if rule == "fixed":
        return thresholds.float()
    for k in range(scores.shape[1]):
        order = torch.argsort(scores[:, k], descending=True)
        s, y = scores[order, k], targets[order, k].double()
        positives, negatives = y.sum(), len(y) - y.sum()
        if positives == 0:
            continue
        last_of_tie = torch.ones(len(s), dtype=torch.bool)
        last_of_tie[:-1] = s[:-1] != s[1:]
        tp, fp = y.cumsum(0)[last_of_tie], (1 - y).cumsum(0)[last_of_tie]  # positives: score >= cut
        cuts = s[last_of_tie]
        if rule == "f1":
            gain = 2 * tp / (tp + fp + positives)
        else:
            gain = tp / positives - (fp / negatives if negatives > 0 else 0)
        best = int(torch.argmax(gain))
        below = cuts[best + 1] if best + 1 < len(cuts) else cuts[best] - 1e-6
        thresholds[k] = (cuts[best] + below) / 2
    return thresholds.float()
