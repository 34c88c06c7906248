"""Metrics with torchmetrics, by the MedMNIST definitions, for the three kinds of task.

Multi-label (ChestMNIST) and binary: AUC is the macro mean of the per-label ROC AUCs and ACC
the macro mean of the per-label accuracies, a score strictly above 0.5 counting as positive.
Multi-class (and ordinal regression, treated as multi-class): AUC is the macro mean of the
one-vs-rest AUCs and ACC the accuracy of the arg-max class. Exactly `medmnist.evaluator`'s
`getAUC` and `getACC`, so our numbers compare with the published tables. Precision, recall
and F1 come micro (pooled, dominated by the common labels) and macro (each label equal).
Inputs are probabilities (sigmoid, or softmax for multi-class), not logits. What differs
between the tasks (targets, decisions, counts, baselines) is the `Task`'s (task.py); here
only the choice of torchmetrics' binary, multilabel or multiclass classes, which it names.

AUROC is undefined for a label with no positives or no negatives in the split, and AP for one
with no positives (medmnist's getAUC gives NaN there); torchmetrics scores them 0.0. Here they are
NaN and left out of the macro means, whose label counts are reported (`auroc_labels`).
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
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassAveragePrecision,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
    MultilabelAccuracy,
    MultilabelAUROC,
    MultilabelAveragePrecision,
    MultilabelConfusionMatrix,
    MultilabelF1Score,
    MultilabelPrecision,
    MultilabelRecall,
)
from torchmetrics.utilities.data import dim_zero_cat

from chest_mnist import UserError
from chest_mnist.task import MULTI_CLASS_TASK, MULTI_LABEL_TASK, THRESHOLD, Task


def mean_over_defined(values: torch.Tensor) -> tuple[float, int]:
    """(mean of the values that are not NaN, how many there are); NaN when none is."""
    defined = ~torch.isnan(values)
    count = int(defined.sum())
    return (values[defined].mean().item() if count else float("nan")), count


class _MacroOverDefinedAUROC:
    """compute(): the mean AUROC over the outputs whose data has positives and negatives (NaN
    when none has), not torchmetrics' mean with 0.0 for the undefined ones. For the AUROC
    classes built with average=None; compute runs on the states synced across DDP ranks."""

    task = MULTI_LABEL_TASK

    def compute(self) -> torch.Tensor:
        per_label = super().compute().reshape(-1).float()
        positives, negatives = self.task.label_counts(dim_zero_cat(self.target), len(per_label))
        per_label[((positives == 0) | (negatives == 0)).to(per_label.device)] = float("nan")
        return torch.tensor(mean_over_defined(per_label)[0], device=per_label.device)


class BinaryMacroAUROC(_MacroOverDefinedAUROC, BinaryAUROC):
    pass


class MultilabelMacroAUROC(_MacroOverDefinedAUROC, MultilabelAUROC):
    pass


class MulticlassMacroAUROC(_MacroOverDefinedAUROC, MulticlassAUROC):
    task = MULTI_CLASS_TASK


def _classes(num_labels: int, task: Task = MULTI_LABEL_TASK) -> dict:
    """torchmetrics' classes of the task's `metric_family`: multilabel, binary for a single
    label (same definitions), or multiclass. "macro_auroc": the scalar AUC."""
    return _FAMILIES[task.metric_family(num_labels)](num_labels)


def _multiclass(num_labels: int) -> dict:
    kw = {"num_classes": num_labels}
    return {
        "macro_auroc": lambda: MulticlassMacroAUROC(average=None, **kw),
        "auroc": lambda average: MulticlassAUROC(average=average, **kw),
        "ap": lambda average: MulticlassAveragePrecision(average=average, **kw),
        # MedMNIST's ACC of a multi-class task is the overall accuracy (micro); per class,
        # the task's output_accuracy is one-vs-rest accuracy from the confusion matrix
        "acc": lambda average: MulticlassAccuracy(
            average="micro" if average == "macro" else average, **kw
        ),
        "precision": lambda average: MulticlassPrecision(average=average, **kw),
        "recall": lambda average: MulticlassRecall(average=average, **kw),
        "f1": lambda average: MulticlassF1Score(average=average, **kw),
        "confusion": lambda: MulticlassConfusionMatrix(**kw),
    }


def _binary(num_labels: int) -> dict:
    kw = {"threshold": THRESHOLD}
    return {
        "macro_auroc": lambda: BinaryMacroAUROC(),
        "auroc": lambda average: BinaryAUROC(),
        "ap": lambda average: BinaryAveragePrecision(),
        "acc": lambda average: BinaryAccuracy(**kw),
        "precision": lambda average: BinaryPrecision(**kw),
        "recall": lambda average: BinaryRecall(**kw),
        "f1": lambda average: BinaryF1Score(**kw),
        "confusion": lambda: BinaryConfusionMatrix(**kw),
    }


def _multilabel(num_labels: int) -> dict:
    kw = {"num_labels": num_labels, "threshold": THRESHOLD}
    return {
        "macro_auroc": lambda: MultilabelMacroAUROC(num_labels=num_labels, average=None),
        "auroc": lambda average: MultilabelAUROC(num_labels=num_labels, average=average),
        "ap": lambda average: MultilabelAveragePrecision(num_labels=num_labels, average=average),
        "acc": lambda average: MultilabelAccuracy(average=average, **kw),
        "precision": lambda average: MultilabelPrecision(average=average, **kw),
        "recall": lambda average: MultilabelRecall(average=average, **kw),
        "f1": lambda average: MultilabelF1Score(average=average, **kw),
        "confusion": lambda: MultilabelConfusionMatrix(**kw),
    }


_FAMILIES = {"multiclass": _multiclass, "binary": _binary, "multilabel": _multilabel}


def _micro_and_macro(make: dict) -> dict:
    return {
        f"{name}_{average}": make[name](average)
        for name in ("precision", "recall", "f1")
        for average in ("micro", "macro")
    }


def scalar_metrics(num_labels: int, task: Task = MULTI_LABEL_TASK) -> MetricCollection:
    """The epoch numbers for val and test (at threshold 0.5, or arg-max): one collection,
    `.clone(prefix=...)` per stage."""
    make = _classes(num_labels, task)
    metrics = {"auroc": make["macro_auroc"](), "acc": make["acc"]("macro")}
    metrics |= _micro_and_macro(make)
    return MetricCollection(metrics)


def decision_metrics(num_labels: int, task: Task = MULTI_LABEL_TASK) -> MetricCollection:
    """Metrics of decisions (integer preds: torchmetrics applies no threshold to them): ACC,
    micro and macro precision/recall/F1, the same per label, and the confusion matrices:
    (num_labels, 2, 2) [[tn, fp], [fn, tp]], or one (C, C) matrix for a multi-class task."""
    make = _classes(num_labels, task)
    metrics = {"acc": make["acc"]("macro")}
    metrics |= _micro_and_macro(make)
    for name in DECISIONS:
        metrics[f"per_label_{name}"] = make[name](None)
    return MetricCollection({**metrics, "confusion": make["confusion"]()})


DECISIONS = ("acc", "precision", "recall", "f1")


def _local(collection: MetricCollection) -> MetricCollection:
    """No sync across DDP ranks on compute: the caller passes a whole split already."""
    for metric in collection.values():
        metric.sync_on_compute = False
    return collection


def evaluate_predictions(
    scores: torch.Tensor,
    targets: torch.Tensor,
    labels: list[str],
    thresholds: torch.Tensor | None = None,
    task: Task = MULTI_LABEL_TASK,
) -> dict:
    """Everything the report needs from one split's (N, L) probabilities and targets.

    Ranking metrics (AUROC, average precision) use the scores, NaN where undefined (see the
    module's docstring), their macro means over the defined ones; decisions are `score >
    threshold` per label (0.5 when `thresholds` is None, MedMNIST's ACC), or the arg-max class
    for a multi-class task. Returns {"scalars": {name: float}, "per_label": [{label, support,
    prevalence, auroc, ap, acc, precision, recall, f1, threshold, tn, fp, fn, tp}],
    "confusion": (L, 2, 2), or (C, C) for multi-class, int tensor}.
    """
    targets = task.targets(targets)
    per = ranking_per_label(scores, targets, len(labels), task)
    threshold = task.thresholds(len(labels), thresholds)  # NaN for arg-max
    decided = _local(decision_metrics(len(labels), task)).to(scores.device)
    decided.update(task.decisions(scores, threshold), targets)
    values = {name: value.cpu() for name, value in decided.compute().items()}
    confusion, counts = task.confusion_counts(values.pop("confusion").long())
    for name in DECISIONS:
        per[name] = values.pop(f"per_label_{name}").reshape(-1)
    per["acc"] = task.output_accuracy(per["acc"], counts)

    scalars = {}
    scalars["auroc"], scalars["auroc_labels"] = mean_over_defined(per["auroc"])
    scalars["ap_macro"], scalars["ap_macro_labels"] = mean_over_defined(per["ap"])
    scalars |= {name: value.item() for name, value in values.items()}
    if (all_negative := task.all_negative_accuracy(targets)) is not None:
        scalars["acc_all_negative"] = all_negative  # a multi-class task has no such answer
    scalars["n_images"] = len(targets)
    rows = per_label_rows(labels, per, threshold, counts)
    return {"scalars": scalars, "per_label": rows, "confusion": confusion}


def ranking_per_label(
    scores: torch.Tensor, targets: torch.Tensor, num_labels: int, task: Task
) -> dict[str, torch.Tensor]:
    """{"auroc": (L,), "ap": (L,)} on the CPU from the scores, NaN where undefined (see the
    module's docstring) rather than torchmetrics' 0.0. `targets` as `task.targets` gives them."""
    make = _classes(num_labels, task)
    ranking = _local(MetricCollection({"auroc": make["auroc"](None), "ap": make["ap"](None)})).to(
        scores.device
    )
    ranking.update(scores, targets)
    per = {name: value.cpu().reshape(-1).float() for name, value in ranking.compute().items()}
    positives, negatives = task.label_counts(targets, num_labels)
    per["auroc"][(positives == 0) | (negatives == 0)] = float("nan")  # undefined, not 0.0
    per["ap"][positives == 0] = float("nan")
    return per


def per_label_rows(
    labels: list[str], per: dict[str, torch.Tensor], threshold: torch.Tensor, counts: torch.Tensor
) -> list[dict]:
    """The report's row of each label: its support and prevalence (from `counts`, (L, 4) tn,
    fp, fn, tp), its value of each metric in `per`, its threshold and its counts."""
    rows = []
    for k, label in enumerate(labels):
        tn, fp, fn, tp = counts[k].tolist()
        n_images = tn + fp + fn + tp
        rows.append(
            {
                "label": label,
                "support": tp + fn,
                "prevalence": (tp + fn) / n_images,
                **{name: per[name][k].item() for name in ("auroc", "ap", *DECISIONS)},
                "threshold": threshold[k].item(),
                "tn": tn,
                "fp": fp,
                "fn": fn,
                "tp": tp,
            }
        )
    return rows


THRESHOLD_RULES = ("f1", "youden", "fixed")


def tune_thresholds(
    scores: torch.Tensor, targets: torch.Tensor, rule: str = "f1"
) -> tuple[torch.Tensor, dict[int, str]]:
    """One decision threshold per label, chosen on these (validation) predictions; and, for the
    labels that keep 0.5 because nothing can be tuned on them, why ({label index: reason}).

    rule "f1" maximises the label's F1, "youden" its TPR - FPR, "fixed" keeps 0.5. Every cut
    between two distinct scores is a candidate. The threshold is a float32 value below the
    chosen cut and at or above the next score, so `score > threshold` in float32 (the scores'
    type) makes exactly the chosen decisions. A label without positives, or whose scores are
    all equal or not finite, keeps 0.5, and the reason is returned.
    """
    if rule not in THRESHOLD_RULES:
        raise UserError(
            f"thresholds.rule={rule!r} is unknown; choose one of {', '.join(THRESHOLD_RULES)}."
        )
    scores, targets = scores.detach().float().cpu(), targets.cpu()
    thresholds = torch.full((scores.shape[1],), THRESHOLD, dtype=torch.float32)
    if rule == "fixed":
        return thresholds, {}
    kept: dict[int, str] = {}
    for k in range(scores.shape[1]):
        column = scores[:, k]
        if not torch.isfinite(column).all():
            kept[k] = f"{int((~torch.isfinite(column)).sum())} validation scores are not finite"
        elif len(column) and bool((column == column[0]).all()):
            kept[k] = f"every validation score is {column[0].item():.6g}: nothing to rank"
        elif targets[:, k].sum() == 0:
            kept[k] = "no positives in validation"
        if k in kept:
            continue
        order = torch.argsort(column, descending=True)
        s, y = column[order], targets[order, k].double()
        positives, negatives = y.sum(), len(y) - y.sum()
        last_of_tie = torch.ones(len(s), dtype=torch.bool)
        last_of_tie[:-1] = s[:-1] != s[1:]
        tp, fp = y.cumsum(0)[last_of_tie], (1 - y).cumsum(0)[last_of_tie]  # positives: score >= cut
        cuts = s[last_of_tie]
        if rule == "f1":
            gain = 2 * tp / (tp + fp + positives)
        else:
            gain = tp / positives - (fp / negatives if negatives > 0 else 0)
        best = int(torch.argmax(gain))
        cut = cuts[best]
        below = cuts[best + 1] if best + 1 < len(cuts) else cut - max(1e-6, abs(cut.item()) * 1e-6)
        # halfway in float64, rounded to the float32 nearest: somewhere in [below, cut]
        middle = ((cut.double() + below.double()) / 2).float()
        if middle >= cut:  # rounded onto the cut, which `score > threshold` would then exclude
            middle = torch.nextafter(cut, torch.tensor(-torch.inf))
        thresholds[k] = middle
    return thresholds, kept
