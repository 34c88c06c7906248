"""The `Task` of each kind (task.py): every rule by hand, on numbers small enough to check."""

import math

import numpy as np
import pytest
import torch

from chest_mnist import UserError
from chest_mnist.task import SigmoidTask, SoftmaxTask, Task

MULTI_LABEL = Task.from_medmnist("multi-label, binary-class")
BINARY = Task.from_medmnist("binary-class")
MULTI_CLASS = Task.from_medmnist("multi-class")
ORDINAL = Task.from_medmnist("ordinal-regression")

# three images, two labels; and three images of four classes (classes 1 and 3 never occur)
LABEL_TARGETS = torch.tensor([[1, 0], [1, 1], [0, 0]])
CLASS_TARGETS = torch.tensor([[0], [2], [2]])


def test_from_medmnist_names_each_kind_and_refuses_others():
    assert isinstance(MULTI_LABEL, SigmoidTask) and isinstance(BINARY, SigmoidTask)
    assert isinstance(MULTI_CLASS, SoftmaxTask) and isinstance(ORDINAL, SoftmaxTask)
    assert ORDINAL.name == "ordinal-regression"  # the name travels: checkpoints keep it
    with pytest.raises(UserError, match="'multi-label' is not a MedMNIST task"):
        Task.from_medmnist("multi-label")


def test_outputs_drop_only_the_binary_negative_class():
    assert BINARY.outputs(["normal", "pneumonia"]) == ["pneumonia"]
    assert MULTI_LABEL.outputs(["a", "b"]) == ["a", "b"]
    assert MULTI_CLASS.outputs(["a", "b", "c"]) == ["a", "b", "c"]


def test_sigmoid_loss_weighs_positives_and_smooths_towards_half():
    logits = torch.tensor([[0.0, 2.0]])
    targets = torch.tensor([[1, 0]])
    loss = MULTI_LABEL.loss(logits, targets, torch.tensor([3.0, 1.0]), smoothing=0.2)
    # soft targets 0.9 and 0.1; the positive term of label 0 weighs 3
    sig = [0.5, 1 / (1 + math.exp(-2.0))]
    first = -(3 * 0.9 * math.log(sig[0]) + 0.1 * math.log(1 - sig[0]))
    second = -(0.1 * math.log(sig[1]) + 0.9 * math.log(1 - sig[1]))
    assert loss.item() == pytest.approx((first + second) / 2, rel=1e-6)


def test_softmax_loss_is_cross_entropy_with_smoothing():
    logits = torch.tensor([[2.0, 0.0, 0.0]])
    loss = MULTI_CLASS.loss(logits, torch.tensor([[0]]), None, smoothing=0.3)
    log_p = [2 - math.log(math.exp(2) + 2), -math.log(math.exp(2) + 2)]
    expected = 0.7 * -log_p[0] + 0.3 * -(log_p[0] + 2 * log_p[1]) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_pos_weight_is_refused_for_softmax_outputs_only():
    MULTI_LABEL.check_pos_weight("auto")
    MULTI_CLASS.check_pos_weight(None)
    with pytest.raises(UserError, match="model.pos_weight=null"):
        ORDINAL.check_pos_weight([1.0, 2.0])


def test_scores_are_sigmoid_per_label_or_softmax_over_classes():
    logits = torch.tensor([[0.0, 2.0, 0.0]])
    assert MULTI_LABEL.scores(logits)[0, 0].item() == 0.5
    softmax = MULTI_CLASS.scores(logits)
    assert softmax[0, 1].item() == pytest.approx(math.exp(2) / (math.exp(2) + 2), rel=1e-6)
    assert softmax.sum().item() == pytest.approx(1.0)


def test_targets_in_the_form_torchmetrics_expects():
    labels = MULTI_LABEL.targets(LABEL_TARGETS.bool())
    assert labels.dtype == torch.int32 and labels.shape == (3, 2)
    classes = MULTI_CLASS.targets(CLASS_TARGETS.to(torch.uint8))
    assert classes.dtype == torch.int64 and classes.tolist() == [0, 2, 2]


def test_label_counts_and_prevalence_per_label_or_per_class():
    positives, negatives = MULTI_LABEL.label_counts(LABEL_TARGETS, 2)
    assert positives.tolist() == [2, 1] and negatives.tolist() == [1, 2]
    assert MULTI_LABEL.prevalence(LABEL_TARGETS, 2).tolist() == pytest.approx([2 / 3, 1 / 3])
    positives, negatives = MULTI_CLASS.label_counts(CLASS_TARGETS, 4)
    assert positives.tolist() == [1, 0, 2, 0] and negatives.tolist() == [2, 3, 1, 3]
    assert MULTI_CLASS.prevalence(CLASS_TARGETS, 4).tolist() == pytest.approx([1 / 3, 0, 2 / 3, 0])


def test_truth_of_one_output_is_its_column_or_one_class_against_the_rest():
    assert MULTI_LABEL.truth(LABEL_TARGETS, 1).tolist() == [0, 1, 0]
    assert MULTI_CLASS.truth(CLASS_TARGETS, 2).tolist() == [0, 1, 1]
    assert MULTI_CLASS.truth(CLASS_TARGETS, 1).tolist() == [0, 0, 0]


def test_thresholds_default_to_half_and_are_nan_for_arg_max():
    assert MULTI_LABEL.thresholds(2).tolist() == [0.5, 0.5]
    tuned = torch.tensor([0.2, 0.7])
    assert MULTI_LABEL.thresholds(2, tuned) is tuned
    assert all(math.isnan(t) for t in MULTI_CLASS.thresholds(3, tuned).tolist())
    assert MULTI_LABEL.tunes_thresholds and not MULTI_CLASS.tunes_thresholds
    with pytest.raises(ValueError, match="1 thresholds for 2 labels"):  # not broadcast
        MULTI_LABEL.thresholds(2, torch.tensor([0.3]))


def test_decisions_are_strictly_above_the_threshold_or_the_arg_max():
    scores = torch.tensor([[0.5, 0.6, 0.1], [0.9, 0.2, 0.3]])
    # 0.5 is not above 0.5 (MedMNIST's ACC)
    assert MULTI_LABEL.decisions(scores).tolist() == [[0, 1, 0], [1, 0, 0]]
    tuned = torch.tensor([0.4, 0.6, 0.25])
    assert MULTI_LABEL.decisions(scores, tuned).tolist() == [[1, 0, 0], [1, 0, 1]]
    assert MULTI_CLASS.decisions(scores, tuned).tolist() == [1, 0]


def test_predicted_outputs_as_a_mask():
    scores = torch.tensor([[0.3, 0.6, 0.1]], dtype=torch.float64)
    assert MULTI_LABEL.predicted(scores, torch.tensor([0.2, 0.7, 0.05])).tolist() == [
        [True, False, True]
    ]
    assert MULTI_CLASS.predicted(scores).tolist() == [[False, True, False]]


def test_confusion_counts_per_label_or_one_class_against_the_rest():
    per_label = torch.tensor([[5, 1, 2, 3], [4, 0, 0, 7]])  # torchmetrics' (L, 2, 2), flat
    confusion, counts = MULTI_LABEL.confusion_counts(per_label.reshape(2, 2, 2))
    assert confusion.shape == (2, 2, 2) and counts.tolist() == per_label.tolist()
    # rows the truth: 3 of class 0 (one called 1), 2 of class 1, 4 of class 2 (one called 0)
    matrix = torch.tensor([[2, 1, 0], [0, 2, 0], [1, 0, 3]])
    confusion, counts = MULTI_CLASS.confusion_counts(matrix)
    assert confusion is matrix
    assert counts.tolist() == [[5, 1, 1, 2], [6, 1, 0, 2], [5, 0, 1, 3]]  # tn, fp, fn, tp


def test_output_accuracy_is_one_class_against_the_rest():
    counts = torch.tensor([[5, 1, 1, 2], [6, 1, 0, 2], [5, 0, 1, 3]])
    recall = torch.tensor([2 / 3, 1.0, 0.75])  # torchmetrics' per-class "accuracy"
    assert MULTI_CLASS.output_accuracy(recall, counts).tolist() == pytest.approx(
        [7 / 9, 8 / 9, 8 / 9]
    )
    per_label = torch.tensor([0.8, 0.9])
    assert MULTI_LABEL.output_accuracy(per_label, counts) is per_label


def test_constant_baselines():
    # label 0 positive in 70% of training: answer 1 (right on 2 of 3); label 1: answer 0 (2 of 3)
    assert MULTI_LABEL.majority_accuracy(LABEL_TARGETS, torch.tensor([0.7, 0.1])) == pytest.approx(
        2 / 3
    )
    assert MULTI_LABEL.all_negative_accuracy(LABEL_TARGETS) == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert BINARY.all_negative_accuracy(torch.tensor([[1], [0], [0], [0]])) == pytest.approx(0.75)
    # class 2 most frequent in training: right on 2 of 3
    prevalence = torch.tensor([0.3, 0.1, 0.4, 0.2])
    assert MULTI_CLASS.majority_accuracy(CLASS_TARGETS, prevalence) == pytest.approx(2 / 3)
    assert MULTI_CLASS.all_negative_accuracy(CLASS_TARGETS) is None


def test_metric_family_and_words():
    assert BINARY.metric_family(1) == "binary"
    assert MULTI_LABEL.metric_family(14) == "multilabel"
    assert ORDINAL.metric_family(5) == "multiclass"
    assert (MULTI_LABEL.words.output, MULTI_CLASS.words.output) == ("label", "class")
    assert MULTI_CLASS.words.macro_over == "classes, one against the rest"
    assert MULTI_LABEL.words.untuned_rule == "at threshold 0.5"
    assert MULTI_CLASS.words.untuned_rule == "arg-max class"


def test_predict_compares_as_python_does_in_float64():
    """A score stored as float32 and a threshold written by hand: 0.1 as a float32 is
    0.10000000149..., above the float64 0.1 (Python says so); in float32 they are equal."""
    from chest_mnist.predict import predicted_labels

    score = float(np.float32(0.1))
    assert score > 0.1
    assert predicted_labels([score, 0.0], ["a", "b"], [0.1, 0.5], MULTI_LABEL) == ["a"]
    with pytest.raises(ValueError):  # one threshold for two labels is refused, not broadcast
        predicted_labels([score, 0.0], ["a", "b"], [0.1], MULTI_LABEL)


@pytest.mark.parametrize("task", [MULTI_LABEL, MULTI_CLASS])
def test_report_md_tables_hold_per_class_csv_numbers(tmp_path, task):
    """report.md's per-label table against per_class.csv, column by column: for sigmoid
    outputs F1 at 0.5, then the tuned threshold, precision, recall and F1; for classes the
    decisions at the arg-max (no threshold column)."""
    import csv

    from chest_mnist.report import write_report
    from chest_mnist.report_content import build_report

    g = torch.Generator().manual_seed(0)
    if task is MULTI_LABEL:
        targets = (torch.rand(60, 2, generator=g) < 0.4).int()
        scores = targets * 0.3 + torch.rand(60, 2, generator=g) * 0.7
    else:
        targets = torch.randint(0, 2, (60, 1), generator=g)
        scores = torch.nn.functional.one_hot(targets[:, 0], 2) * 0.3 + torch.rand(
            60, 2, generator=g
        )
        scores = scores / scores.sum(1, keepdim=True)
    report = build_report(
        (scores, targets), (scores, targets), ["a", "b"], torch.tensor([0.4, 0.4]), "f1", task
    )
    write_report(tmp_path, report, "chestmnist", 28)
    with open(tmp_path / "per_class.csv", newline="") as f:
        rows = {row["label"]: row for row in csv.DictReader(f)}
    table = (tmp_path / "report.md").read_text().split("## Per label")[1].split("\n## ")[0]
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    tuned = task.tunes_thresholds
    columns = ["f1", "threshold", "precision_tuned", "recall_tuned", "f1_tuned"] if tuned else []
    columns = columns or ["precision", "recall", "f1"]
    assert ("| threshold |" in lines[0]) == tuned
    for label in ("a", "b"):
        (line,) = [line for line in lines if line.startswith(f"| {label} |")]
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[-len(columns) :] == [f"{float(rows[label][c]):.4f}" for c in columns]
        assert cells[3] == f"{float(rows[label]['auroc']):.4f}"


@pytest.mark.parametrize(
    ("flag", "shape"),
    [
        ("chestmnist", (14, 1)),
        ("pneumoniamnist", (1, 1)),
        ("pathmnist", (1, 8)),
        ("retinamnist", (1, 4)),
    ],
)
def test_label_file_shape_of_a_medmnist_npz(flag, shape):
    """(columns, largest value) of the labels array: 14 findings of 0/1, one 0/1 column, or
    the class index (9 tissue classes; 5 retinopathy grades)."""
    from medmnist import INFO

    info = INFO[flag]
    assert Task.from_medmnist(info["task"]).label_file_shape(len(info["label"])) == shape
