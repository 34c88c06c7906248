"""Metrics with torchmetrics, by the MedMNIST definitions, for the three kinds of task.

Multi-label (ChestMNIST) and binary: AUC is the macro mean of the per-label ROC AUCs and ACC
the macro mean of the per-label accuracies, a score strictly above 0.5 counting as positive.
Multi-class (and ordinal regression, treated as multi-class): AUC is the macro mean of the
one-vs-rest AUCs and ACC the accuracy of the arg-max class. Exactly `medmnist.evaluator`'s
`getAUC` and `getACC`, so our numbers compare with the published tables. Precision, recall
and F1 come micro (pooled, dominated by the common labels) and macro (each label equal).
Inputs are probabilities (sigmoid, or softmax for multi-class), not logits.

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

THRESHOLD = 0.5  # MedMNIST's ACC: score > 0.5 is positive
MULTI_LABEL = "multi-label, binary-class"


def is_multiclass(task: str) -> bool:
    """One class per image, chosen by arg-max (ordinal regression is treated the same way)."""
    return task in ("multi-class", "ordinal-regression")


def label_counts(
    targets: torch.Tensor, num_labels: int, task: str = MULTI_LABEL
) -> tuple[torch.Tensor, torch.Tensor]:
    """(positives, negatives) per output: per label column, or per class one against the rest."""
    if is_multiclass(task):
        positives = torch.bincount(targets.reshape(-1).long(), minlength=num_labels)
    else:
        positives = targets.reshape(len(targets), -1).long().sum(0)
    return positives.cpu(), len(targets) - positives.cpu()


def mean_over_defined(values: torch.Tensor) -> tuple[float, int]:
    """(mean of the values that are not NaN, how many there are); NaN when none is."""
    defined = ~torch.isnan(values)
    count = int(defined.sum())
    return (values[defined].mean().item() if count else float("nan")), count


class _MacroOverDefinedAUROC:
    """compute(): the mean AUROC over the outputs whose data has positives and negatives (NaN
    when none has), not torchmetrics' mean with 0.0 for the undefined ones. For the AUROC
    classes built with average=None; compute runs on the states synced across DDP ranks."""

    task = MULTI_LABEL

    def compute(self) -> torch.Tensor:
        per_label = super().compute().reshape(-1).float()
        positives, negatives = label_counts(dim_zero_cat(self.target), len(per_label), self.task)
        per_label[((positives == 0) | (negatives == 0)).to(per_label.device)] = float("nan")
        return torch.tensor(mean_over_defined(per_label)[0], device=per_label.device)


class BinaryMacroAUROC(_MacroOverDefinedAUROC, BinaryAUROC):
    pass


class MultilabelMacroAUROC(_MacroOverDefinedAUROC, MultilabelAUROC):
    pass


class MulticlassMacroAUROC(_MacroOverDefinedAUROC, MulticlassAUROC):
    task = "multi-class"


def _classes(num_labels: int, task: str = MULTI_LABEL) -> dict:
    """torchmetrics' multilabel classes, the binary ones for a single label (torchmetrics'
    multilabel metrics need two labels or more; same definitions), or the multiclass ones."""
    if is_multiclass(task):
        kw = {"num_classes": num_labels}
        return {
            "auroc": lambda average: MulticlassAUROC(average=average, **kw),
            "ap": lambda average: MulticlassAveragePrecision(average=average, **kw),
            # MedMNIST's ACC of a multi-class task is the overall accuracy (micro); per class,
            # evaluate_predictions derives one-vs-rest accuracy from the confusion matrix
            "acc": lambda average: MulticlassAccuracy(
                average="micro" if average == "macro" else average, **kw
            ),
            "precision": lambda average: MulticlassPrecision(average=average, **kw),
            "recall": lambda average: MulticlassRecall(average=average, **kw),
            "f1": lambda average: MulticlassF1Score(average=average, **kw),
            "confusion": lambda: MulticlassConfusionMatrix(**kw),
        }
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


def _micro_and_macro(make: dict) -> dict:
    return {
        f"{name}_{average}": make[name](average)
        for name in ("precision", "recall", "f1")
        for average in ("micro", "macro")
    }


def scalar_metrics(num_labels: int, task: str = MULTI_LABEL) -> MetricCollection:
    """The epoch numbers for val and test (at threshold 0.5, or arg-max): one collection,
    `.clone(prefix=...)` per stage."""
    make = _classes(num_labels, task)
    if is_multiclass(task):
        auroc = MulticlassMacroAUROC(num_classes=num_labels, average=None)
    elif num_labels == 1:
        auroc = BinaryMacroAUROC()
    else:
        auroc = MultilabelMacroAUROC(num_labels=num_labels, average=None)
    metrics = {"auroc": auroc, "acc": make["acc"]("macro")}
    metrics |= _micro_and_macro(make)
    return MetricCollection(metrics)


def decision_metrics(num_labels: int, task: str = MULTI_LABEL) -> MetricCollection:
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


def all_negative_accuracy(targets: torch.Tensor) -> float:
    """MedMNIST ACC of the model that says "no finding" for every label of every image."""
    return (targets == 0).float().mean(0).mean().item()


def majority_accuracy(
    targets: torch.Tensor, prevalence_train: torch.Tensor, task: str = MULTI_LABEL
) -> float:
    """MedMNIST ACC on `targets` of the constant answer chosen on the training split: each
    label's more frequent value there (for ChestMNIST "no finding", the all-negative model), or
    the most frequent class. Chosen on train, as a model would be: the test labels' own
    majority would be a baseline that peeked."""
    if is_multiclass(task):
        return (targets.reshape(-1) == int(torch.argmax(prevalence_train))).float().mean().item()
    answer = (prevalence_train.to(targets.device) > 0.5).to(targets.dtype)
    return (targets == answer).float().mean(0).mean().item()


def as_targets(targets: torch.Tensor, task: str) -> torch.Tensor:
    """What torchmetrics expects: (N,) class indices for multi-class, (N, L) 0/1 ints otherwise."""
    return targets.reshape(-1).long() if is_multiclass(task) else targets.int()


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
    task: str = MULTI_LABEL,
) -> dict:
    """Everything the report needs from one split's (N, L) probabilities and targets.

    Ranking metrics (AUROC, average precision) use the scores, NaN where undefined (see the
    module's docstring), their macro means over the defined ones; decisions are `score >
    threshold` per label (0.5 when `thresholds` is None, MedMNIST's ACC), or the arg-max class
    for a multi-class task. Returns {"scalars": {name: float}, "per_label": [{label, support,
    prevalence, auroc, ap, acc, precision, recall, f1, threshold, tn, fp, fn, tp}],
    "confusion": (L, 2, 2), or (C, C) for multi-class, int tensor}.
    """
    multiclass = is_multiclass(task)
    targets = as_targets(targets, task)
    per = ranking_per_label(scores, targets, len(labels), task)
    if multiclass:
        threshold = torch.full((len(labels),), float("nan"))  # arg-max: no threshold
        decisions = scores.argmax(-1)
    else:
        threshold = torch.full((len(labels),), THRESHOLD) if thresholds is None else thresholds
        decisions = (scores > threshold.to(scores.device)).int()
    decided = _local(decision_metrics(len(labels), task)).to(scores.device)
    decided.update(decisions, targets)
    values = {name: value.cpu() for name, value in decided.compute().items()}
    confusion = values.pop("confusion").long()
    for name in DECISIONS:
        per[name] = values.pop(f"per_label_{name}").reshape(-1)
    if multiclass:
        counts = one_vs_rest_counts(confusion)
        per["acc"] = (counts[:, 0] + counts[:, 3]).double() / len(targets)
    else:
        confusion = confusion.reshape(-1, 2, 2)
        counts = confusion.reshape(-1, 4)  # tn, fp, fn, tp

    scalars = {}
    scalars["auroc"], scalars["auroc_labels"] = mean_over_defined(per["auroc"])
    scalars["ap_macro"], scalars["ap_macro_labels"] = mean_over_defined(per["ap"])
    scalars |= {name: value.item() for name, value in values.items()}
    if not multiclass:
        scalars["acc_all_negative"] = all_negative_accuracy(targets)
    scalars["n_images"] = len(targets)
    rows = per_label_rows(labels, per, threshold, counts)
    return {"scalars": scalars, "per_label": rows, "confusion": confusion}


def ranking_per_label(
    scores: torch.Tensor, targets: torch.Tensor, num_labels: int, task: str
) -> dict[str, torch.Tensor]:
    """{"auroc": (L,), "ap": (L,)} on the CPU from the scores, NaN where undefined (see the
    module's docstring) rather than torchmetrics' 0.0. `targets` as `as_targets` gives them."""
    make = _classes(num_labels, task)
    ranking = _local(MetricCollection({"auroc": make["auroc"](None), "ap": make["ap"](None)})).to(
        scores.device
    )
    ranking.update(scores, targets)
    per = {name: value.cpu().reshape(-1).float() for name, value in ranking.compute().items()}
    positives, negatives = label_counts(targets, num_labels, task)
    per["auroc"][(positives == 0) | (negatives == 0)] = float("nan")  # undefined, not 0.0
    per["ap"][positives == 0] = float("nan")
    return per


def one_vs_rest_counts(confusion: torch.Tensor) -> torch.Tensor:
    """(C, 4) counts tn, fp, fn, tp of each class against the rest, from a (C, C) confusion
    matrix whose rows are the true classes."""
    tp = confusion.diagonal()
    fp, fn = confusion.sum(0) - tp, confusion.sum(1) - tp
    return torch.stack([confusion.sum() - tp - fp - fn, fp, fn, tp], dim=1)


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
