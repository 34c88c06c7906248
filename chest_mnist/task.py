"""What differs between MedMNIST's kinds of task, in one place: `Task.from_medmnist` reads
medmnist INFO's "task" name and gives one of two kinds.

    SigmoidTask   one sigmoid output per label: multi-label (ChestMNIST) and binary (the
                  positive class only). BCE loss; a label is predicted when its score is
                  above its threshold (0.5, or tuned per label on validation).
    SoftmaxTask   one softmax output per class: multi-class, and ordinal regression treated
                  the same way. Cross-entropy loss; the arg-max class is predicted, so there
                  are no thresholds to tune.

Each kind owns its loss, its scores from logits, its targets and decisions in the form
torchmetrics expects, the truth of one output against the rest, its constant baselines and
the words the report uses for its outputs. The model, metrics, report and predict call these
and do not branch on the task; a checkpoint keeps the task's name (a string), not this object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from chest_mnist import UserError

THRESHOLD = 0.5  # MedMNIST's ACC: score > 0.5 is positive
MULTI_LABEL = "multi-label, binary-class"
BINARY = "binary-class"
SOFTMAX_TASKS = ("multi-class", "ordinal-regression")


class Words(NamedTuple):
    """The report's words for a task's outputs."""

    output: str  # the per-label table's first column
    macro_over: str  # what the macro AUC is a mean over
    constant_answer: str  # what the constant baseline answers
    untuned_rule: str  # the decisions before any tuning: the summary's first column
    loss: str  # the training loss, as the loss curves' axis names it
    pooled: str  # what the overall calibration error pools (`calibration_pairs`)
    bin_frequency: str  # what a reliability bin's pairs have a share of: its y-axis


@dataclass(frozen=True)
class Task:
    """A MedMNIST task's rules: see the module's docstring. Make one with `from_medmnist`.

    Each kind has: `loss`, `scores` (from logits), `targets` (torchmetrics' form), `positives`
    and `prevalence` per output, `truth` of one output, `thresholds` per output, `decisions`
    (torchmetrics' form) and `predicted` (a mask) from scores, `confusion_counts`,
    `output_accuracy`, the constant baselines `majority_accuracy` and `all_negative_accuracy`
    (None where it does not apply), `metric_family` (torchmetrics' classes), and for
    calibration the pooled `calibration_pairs` and the NLL's `temperature_slope`."""

    name: str  # medmnist INFO's "task", as the model's hyperparameters keep it

    words: ClassVar[Words]
    tunes_thresholds: ClassVar[bool] = False  # per-output thresholds, tuned on validation
    # each output a sigmoid of its own logit: a temperature per output is possible, and any
    # temperature keeps each output's order of scores across images (so AUROC and AP)
    independent_outputs: ClassVar[bool] = False

    @staticmethod
    def from_medmnist(name: str) -> Task:
        """The task that medmnist INFO's "task" `name` names."""
        if name in SOFTMAX_TASKS:
            return SoftmaxTask(name)
        if name in (MULTI_LABEL, BINARY):
            return SigmoidTask(name)
        raise UserError(
            f"task={name!r} is not a MedMNIST task; it is one of medmnist INFO's: "
            f"{', '.join(map(repr, (MULTI_LABEL, BINARY, *SOFTMAX_TASKS)))}."
        )

    def outputs(self, names: list[str]) -> list[str]:
        """The model's outputs from medmnist INFO's label names, in order."""
        return names

    def label_file_shape(self, num_names: int) -> tuple[int, int]:
        """(columns, largest value) of a MedMNIST npz's labels array, for `num_names` label
        names: one 0/1 column per finding (multi-label), or one column of the class index."""
        return 1, num_names - 1

    def check_pos_weight(self, pos_weight) -> None:
        """A UserError when the model's `pos_weight` does not fit these outputs."""

    def label_counts(self, targets: Tensor, num_outputs: int) -> tuple[Tensor, Tensor]:
        """(positives, negatives) per output on the CPU."""
        positives = self.positives(targets, num_outputs).cpu()
        return positives, len(targets) - positives


class SigmoidTask(Task):
    """One sigmoid output per label; binary-class keeps the positive class only."""

    tunes_thresholds = True
    independent_outputs = True
    words = Words(
        output="label",
        macro_over="labels",
        constant_answer="each label's more frequent value in training",
        untuned_rule=f"at threshold {THRESHOLD}",
        loss="BCE loss",
        pooled="every (image, label) score",
        bin_frequency="share of positives in the bin",
    )

    def outputs(self, names: list[str]) -> list[str]:
        return names[1:] if self.name == BINARY else names  # one output: the positive class

    def label_file_shape(self, num_names: int) -> tuple[int, int]:
        return (1 if self.name == BINARY else num_names), 1

    def loss(
        self, logits: Tensor, targets: Tensor, pos_weight: Tensor | None, smoothing: float
    ) -> Tensor:
        """BCE with logits, mean over images and labels; targets smoothed towards 1/2."""
        soft = targets.float() * (1 - smoothing) + smoothing / 2
        return F.binary_cross_entropy_with_logits(logits, soft, pos_weight=pos_weight)

    def scores(self, logits: Tensor) -> Tensor:
        return logits.sigmoid()

    def targets(self, targets: Tensor) -> Tensor:
        """(N, L) 0/1 ints, as torchmetrics expects."""
        return targets.int()

    def positives(self, targets: Tensor, num_outputs: int) -> Tensor:
        return targets.reshape(len(targets), -1).long().sum(0)

    def prevalence(self, targets: Tensor, num_outputs: int) -> Tensor:
        """Fraction of the images positive for each label."""
        return targets.float().mean(0)

    def truth(self, targets: Tensor, k: int) -> Tensor:
        """0/1 per image for label `k`: its column."""
        return targets[:, k].int()

    def one_vs_rest(self, targets: Tensor, num_outputs: int) -> Tensor:
        """(N, L) 0/1: the truth of every label, its columns."""
        return targets.reshape(len(targets), -1).int()

    def correct_share(
        self, scores: Tensor, targets: Tensor, thresholds: Tensor | None = None
    ) -> Tensor:
        """(N,) each image's share of labels decided right: their mean over the images is ACC
        (MedMNIST's, the macro mean of the per-label accuracies)."""
        decided = self.decisions(scores, thresholds)
        return (decided == targets.reshape(decided.shape).to(decided)).double().mean(1)

    def thresholds(self, num_outputs: int, tuned: Tensor | None = None) -> Tensor:
        """Each label's threshold: `tuned`, or THRESHOLD."""
        if tuned is None:
            return torch.full((num_outputs,), THRESHOLD)
        if tuned.shape != (num_outputs,):  # no broadcasting one threshold over every label
            raise ValueError(f"{tuned.numel()} thresholds for {num_outputs} labels")
        return tuned

    def decisions(self, scores: Tensor, thresholds: Tensor | None = None) -> Tensor:
        """(N, L) 0/1 ints: score above the label's threshold (THRESHOLD when None)."""
        thresholds = self.thresholds(scores.shape[-1], thresholds)
        return (scores > thresholds.to(scores.device)).int()

    def predicted(self, scores: Tensor, thresholds: Tensor | None = None) -> Tensor:
        """(N, L) bools: the outputs predicted for each image."""
        return self.decisions(scores, thresholds).bool()

    def confusion_counts(self, confusion: Tensor) -> tuple[Tensor, Tensor]:
        """torchmetrics' confusion as the report keeps it, (L, 2, 2), and per label (L, 4):
        tn, fp, fn, tp."""
        confusion = confusion.reshape(-1, 2, 2)
        return confusion, confusion.reshape(-1, 4)

    def output_accuracy(self, accuracy: Tensor, counts: Tensor) -> Tensor:
        """Each label's accuracy: torchmetrics' `accuracy` per label is already it."""
        return accuracy

    def majority_accuracy(self, targets: Tensor, prevalence_train: Tensor) -> float:
        """ACC of answering each label's more frequent value in training (ChestMNIST: "no
        finding", the all-negative model)."""
        answer = (prevalence_train.to(targets.device) > 0.5).to(targets.dtype)
        return (targets == answer).float().mean(0).mean().item()

    def all_negative_accuracy(self, targets: Tensor) -> float | None:
        """ACC of answering "no finding" for every label of every image."""
        return (targets == 0).float().mean(0).mean().item()

    def metric_family(self, num_outputs: int) -> str:
        """torchmetrics' task: its multilabel metrics need two labels or more."""
        return "binary" if num_outputs == 1 else "multilabel"

    def calibration_pairs(self, scores: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """(confidence, 0/1 truth) pairs that the overall calibration error bins: every
        (image, label) score and its truth."""
        return scores.reshape(-1), self.one_vs_rest(targets, scores.shape[1]).reshape(-1)

    def temperature_slope(self, logits: Tensor, targets: Tensor, b: Tensor) -> Tensor:
        """d NLL / d b of `logits * b` (b = 1/T), summed over images: per label when `b` has
        one value per label, else over all of them (one temperature for all)."""
        residual = ((logits * b).sigmoid() - targets.double()) * logits
        return residual.sum(0) if len(b) > 1 else residual.sum().reshape(1)


class SoftmaxTask(Task):
    """One softmax output per class; ordinal regression is treated as multi-class."""

    words = Words(
        output="class",
        macro_over="classes, one against the rest",
        constant_answer="the class most frequent in training",
        untuned_rule="arg-max class",
        loss="cross-entropy loss",
        pooled="top-label scores",
        bin_frequency="accuracy of the top label in the bin",
    )

    def check_pos_weight(self, pos_weight) -> None:
        if pos_weight is not None:
            raise UserError(
                "model.pos_weight weights the positives of sigmoid outputs; a multi-class task has none. "
                "Set model.pos_weight=null."
            )

    def loss(
        self, logits: Tensor, targets: Tensor, pos_weight: Tensor | None, smoothing: float
    ) -> Tensor:
        """Cross-entropy, mean over images (`pos_weight` is None: `check_pos_weight`)."""
        return F.cross_entropy(logits, targets.reshape(-1).long(), label_smoothing=smoothing)

    def scores(self, logits: Tensor) -> Tensor:
        return logits.softmax(-1)

    def targets(self, targets: Tensor) -> Tensor:
        """(N,) class indices, as torchmetrics expects."""
        return targets.reshape(-1).long()

    def positives(self, targets: Tensor, num_outputs: int) -> Tensor:
        return torch.bincount(targets.reshape(-1).long(), minlength=num_outputs)

    def prevalence(self, targets: Tensor, num_outputs: int) -> Tensor:
        """Fraction of the images of each class."""
        return self.positives(targets, num_outputs).float() / len(targets)

    def truth(self, targets: Tensor, k: int) -> Tensor:
        """0/1 per image: "is class k", one against the rest."""
        return (targets.reshape(-1) == k).int()

    def one_vs_rest(self, targets: Tensor, num_outputs: int) -> Tensor:
        """(N, C) 0/1: "is class k" for every class k."""
        return F.one_hot(targets.reshape(-1).long(), num_outputs).int()

    def correct_share(
        self, scores: Tensor, targets: Tensor, thresholds: Tensor | None = None
    ) -> Tensor:
        """(N,) 1 where the arg-max class is the image's class: its mean is ACC."""
        return (self.decisions(scores) == targets.reshape(-1).to(scores.device)).double()

    def thresholds(self, num_outputs: int, tuned: Tensor | None = None) -> Tensor:
        """NaN for every class: the arg-max has no threshold."""
        return torch.full((num_outputs,), float("nan"))

    def decisions(self, scores: Tensor, thresholds: Tensor | None = None) -> Tensor:
        """(N,) the arg-max class of each image."""
        return scores.argmax(-1)

    def predicted(self, scores: Tensor, thresholds: Tensor | None = None) -> Tensor:
        """(N, C) bools: the one class predicted for each image."""
        return F.one_hot(self.decisions(scores), scores.shape[-1]).bool()

    def confusion_counts(self, confusion: Tensor) -> tuple[Tensor, Tensor]:
        """The (C, C) confusion matrix (rows the truth), and each class against the rest (C, 4):
        tn, fp, fn, tp."""
        tp = confusion.diagonal()
        fp, fn = confusion.sum(0) - tp, confusion.sum(1) - tp
        return confusion, torch.stack([confusion.sum() - tp - fp - fn, fp, fn, tp], dim=1)

    def output_accuracy(self, accuracy: Tensor, counts: Tensor) -> Tensor:
        """Each class's accuracy one against the rest, from `counts`: torchmetrics' per-class
        `accuracy` is the class's recall."""
        return (counts[:, 0] + counts[:, 3]).double() / counts[0].sum()

    def majority_accuracy(self, targets: Tensor, prevalence_train: Tensor) -> float:
        """ACC of answering the class most frequent in training."""
        return (targets.reshape(-1) == int(torch.argmax(prevalence_train))).float().mean().item()

    def all_negative_accuracy(self, targets: Tensor) -> float | None:
        """None: every image has a class, so "no finding" is no answer."""
        return None

    def metric_family(self, num_outputs: int) -> str:
        return "multiclass"

    def calibration_pairs(self, scores: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Each image's top score, and whether its class is the top one (top-label
        calibration, what torchmetrics' multiclass_calibration_error bins)."""
        top, predicted = scores.max(-1)
        return top, (predicted == targets.reshape(-1)).int()

    def temperature_slope(self, logits: Tensor, targets: Tensor, b: Tensor) -> Tensor:
        """d NLL / d b of `logits * b` (b = 1/T, one for all classes), summed over images."""
        true = logits.gather(1, targets.reshape(-1, 1).long())
        return ((logits * b).softmax(-1) * logits).sum(-1, keepdim=True).sub(true).sum().reshape(1)


MULTI_LABEL_TASK = Task.from_medmnist(MULTI_LABEL)  # ChestMNIST's: the default
MULTI_CLASS_TASK = Task.from_medmnist("multi-class")
