import numpy as np
import pytest
import torch
from medmnist.evaluator import getACC, getAUC
from sklearn.metrics import f1_score, multilabel_confusion_matrix, precision_score, recall_score

from chest_mnist.metrics import evaluate_predictions
from chest_mnist.synthetic import LABELS
from chest_mnist.task import MULTI_LABEL_TASK, Task

BINARY = Task.from_medmnist("binary-class")
MULTI_CLASS = Task.from_medmnist("multi-class")


def _predictions(n=600, labels=14, seed=0):
    """Scores that carry some signal, with exact 0.5s and ties thrown in."""
    g = torch.Generator().manual_seed(seed)
    targets = (torch.rand(n, labels, generator=g) < 0.15).int()
    targets[:3] = 1  # every label has positives
    scores = torch.sigmoid(2.0 * targets + torch.randn(n, labels, generator=g) - 1.5)
    scores[::7, ::3] = 0.5  # strictly above 0.5 is positive: these are negatives
    scores[::11] = scores[::11].round(decimals=1)  # ties
    return scores, targets


def test_auc_and_acc_equal_medmnist_evaluator():
    scores, targets = _predictions()
    report = evaluate_predictions(scores, targets, LABELS)
    task = "multi-label, binary-class"
    assert report["scalars"]["auroc"] == pytest.approx(
        getAUC(targets.numpy(), scores.numpy(), task), abs=1e-6
    )
    assert report["scalars"]["acc"] == pytest.approx(
        getACC(targets.numpy(), scores.numpy(), task), abs=1e-6
    )


def test_precision_recall_f1_and_confusion_equal_sklearn():
    scores, targets = _predictions(seed=1)
    report = evaluate_predictions(scores, targets, LABELS)
    y, p = targets.numpy(), (scores > 0.5).int().numpy()
    for average in ("micro", "macro"):
        for name, fn in (
            ("precision", precision_score),
            ("recall", recall_score),
            ("f1", f1_score),
        ):
            expected = fn(y, p, average=average, zero_division=0)
            assert report["scalars"][f"{name}_{average}"] == pytest.approx(expected, abs=1e-6), (
                name,
                average,
            )
    for k, row in enumerate(report["per_label"]):
        assert row["label"] == LABELS[k]
        assert row["precision"] == pytest.approx(
            precision_score(y[:, k], p[:, k], zero_division=0), abs=1e-6
        )
        assert row["recall"] == pytest.approx(
            recall_score(y[:, k], p[:, k], zero_division=0), abs=1e-6
        )
        assert row["f1"] == pytest.approx(f1_score(y[:, k], p[:, k], zero_division=0), abs=1e-6)
        assert row["support"] == y[:, k].sum()
    np.testing.assert_array_equal(report["confusion"].numpy(), multilabel_confusion_matrix(y, p))


def test_all_negative_baseline_by_hand():
    # 4 images x 3 labels, 3 positives of 12: "no finding" everywhere is right 9 times in 12
    targets = torch.tensor([[1, 0, 0], [0, 0, 0], [1, 0, 1], [0, 0, 0]])
    assert MULTI_LABEL_TASK.all_negative_accuracy(targets) == pytest.approx(0.75)
    # and it is exactly what MedMNIST ACC gives an all-zero score
    zeros = torch.zeros(4, 3)
    assert MULTI_LABEL_TASK.all_negative_accuracy(targets) == pytest.approx(
        getACC(targets.numpy(), zeros.numpy(), "multi-label, binary-class")
    )


def test_report_of_all_negative_model_shows_its_emptiness():
    """94.7% accuracy and nothing found: the report must make both visible."""
    _, targets = _predictions(seed=2)
    report = evaluate_predictions(torch.full(targets.shape, 0.1), targets, LABELS)
    assert report["scalars"]["acc"] == pytest.approx(
        report["scalars"]["acc_all_negative"], abs=1e-6
    )
    assert report["scalars"]["recall_micro"] == 0.0
    assert report["scalars"]["auroc"] == pytest.approx(0.5)


def test_report_text_of_a_model_level_with_the_baseline(tmp_path):
    """Its ACC equals the baseline's: said in words, never as "-0.0000"."""
    from chest_mnist.report import write_report
    from chest_mnist.report_content import build_report

    scores, targets = _predictions(seed=2)
    test = (torch.full(targets.shape, 0.1), targets)
    report = build_report((scores, targets), test, LABELS, targets.float().mean(0))
    write_report(tmp_path, report, "chestmnist", 28)
    text = (tmp_path / "report.md").read_text()
    assert "This model's ACC is the same (to 4 decimals):" in text and "0.0000 from it" not in text


def test_binary_task_equals_medmnist_evaluator():
    """A binary task (PneumoniaMNIST) has one output: the binary metrics, same definitions."""
    scores, targets = _predictions(n=300, labels=1, seed=4)
    report = evaluate_predictions(scores, targets, ["pneumonia"])
    y, s = targets.numpy(), scores.numpy()
    assert report["scalars"]["auroc"] == pytest.approx(getAUC(y, s, "binary-class"), abs=1e-6)
    assert report["scalars"]["acc"] == pytest.approx(getACC(y, s, "binary-class"), abs=1e-6)
    assert report["per_label"][0]["f1"] == pytest.approx(
        f1_score(y[:, 0], (s[:, 0] > 0.5).astype(int)), abs=1e-6
    )
    assert report["confusion"].shape == (1, 2, 2) and report["confusion"].sum() == 300


def test_multiclass_task_equals_medmnist_evaluator():
    """Multi-class (BloodMNIST-like, 8 classes): one-vs-rest AUC, arg-max ACC, per-class scores."""
    g = torch.Generator().manual_seed(6)
    targets = torch.randint(0, 8, (400, 1), generator=g)
    logits = torch.randn(400, 8, generator=g) + 2.0 * torch.nn.functional.one_hot(targets[:, 0], 8)
    scores = logits.softmax(-1)
    names = [f"c{k}" for k in range(8)]
    report = evaluate_predictions(scores, targets, names, task=MULTI_CLASS)
    y, s = targets.numpy(), scores.numpy()
    assert report["scalars"]["auroc"] == pytest.approx(getAUC(y, s, "multi-class"), abs=1e-6)
    assert report["scalars"]["acc"] == pytest.approx(getACC(y, s, "multi-class"), abs=1e-6)
    predicted = s.argmax(1)
    for average in ("micro", "macro"):
        assert report["scalars"][f"f1_{average}"] == pytest.approx(
            f1_score(y[:, 0], predicted, average=average), abs=1e-6
        )
    for k, row in enumerate(report["per_label"]):
        assert row["recall"] == pytest.approx(recall_score(y[:, 0] == k, predicted == k), abs=1e-6)
        assert row["acc"] == pytest.approx(((y[:, 0] == k) == (predicted == k)).mean(), abs=1e-6)
        assert row["tp"] + row["fn"] == (y[:, 0] == k).sum()
    assert report["confusion"].shape == (8, 8) and report["confusion"].sum() == 400


def test_a_label_without_positives_has_no_auroc_or_ap_and_is_left_out_of_the_means():
    """torchmetrics scores such a label 0.0 (AUROC) and -0.0 (AP), which would pull every macro
    mean down; medmnist's getAUC is NaN there. Hernia is 0.2% of ChestMNIST: a subset lacks it."""
    from sklearn.metrics import average_precision_score

    from chest_mnist.metrics import scalar_metrics

    scores, targets = _predictions(seed=8)
    targets[:, 13] = 0  # Hernia: no positives: AUROC and AP undefined
    targets[:, 12] = 1  # every image positive: AUROC undefined, AP defined (1.0)
    report = evaluate_predictions(scores, targets, LABELS)
    rows, s = report["per_label"], report["scalars"]
    assert np.isnan(rows[13]["auroc"]) and np.isnan(rows[13]["ap"])
    assert np.isnan(rows[12]["auroc"]) and rows[12]["ap"] == pytest.approx(1.0)
    assert s["auroc_labels"] == 12 and s["ap_macro_labels"] == 13
    y, p = targets.numpy(), scores.numpy()
    assert s["auroc"] == pytest.approx(
        getAUC(y[:, :12], p[:, :12], "multi-label, binary-class"), abs=1e-6
    )
    with pytest.warns(UserWarning, match="Only one class"):  # medmnist: NaN, undefined
        assert np.isnan(getAUC(y, p, "multi-label, binary-class"))
    expected_ap = np.mean([average_precision_score(y[:, k], p[:, k]) for k in range(13)])
    assert s["ap_macro"] == pytest.approx(expected_ap, abs=1e-6)
    # the val/test AUROC logged during training (torchmetrics) is the same mean
    logged = scalar_metrics(14)
    logged.update(scores, targets)
    assert logged.compute()["auroc"].item() == pytest.approx(s["auroc"], abs=1e-6)


def test_undefined_auroc_in_binary_and_multiclass_tasks():
    from sklearn.metrics import roc_auc_score

    from chest_mnist.metrics import scalar_metrics

    scores, targets = _predictions(n=50, labels=1, seed=9)
    report = evaluate_predictions(scores, torch.zeros_like(targets), ["pneumonia"])
    assert np.isnan(report["scalars"]["auroc"]) and report["scalars"]["auroc_labels"] == 0
    logged = scalar_metrics(1, BINARY)
    logged.update(scores, torch.zeros_like(targets))
    assert np.isnan(logged.compute()["auroc"].item())

    g = torch.Generator().manual_seed(10)
    classes = torch.randint(0, 4, (300, 1), generator=g)
    classes[classes == 2] = 3  # class 2 never occurs
    probabilities = torch.randn(300, 4, generator=g).softmax(-1)
    report = evaluate_predictions(probabilities, classes, list("abcd"), task=MULTI_CLASS)
    assert np.isnan(report["per_label"][2]["auroc"]) and report["scalars"]["auroc_labels"] == 3
    y, p = classes[:, 0].numpy(), probabilities.numpy()
    expected = np.mean([roc_auc_score(y == k, p[:, k]) for k in (0, 1, 3)])
    assert report["scalars"]["auroc"] == pytest.approx(expected, abs=1e-6)
    logged = scalar_metrics(4, MULTI_CLASS)
    logged.update(probabilities, classes[:, 0])
    assert logged.compute()["auroc"].item() == pytest.approx(expected, abs=1e-6)


def test_the_report_says_undefined_and_writes_nan(tmp_path):
    import csv
    import json

    from chest_mnist.report import write_report
    from chest_mnist.report_content import build_report

    scores, targets = _predictions(seed=11)
    targets[:, 13] = 0
    val = _predictions(seed=12)
    report = build_report(val, (scores, targets), LABELS, val[1].float().mean(0))
    write_report(tmp_path, report, "chestmnist", 28)
    text = (tmp_path / "report.md").read_text()
    row = "| hernia | 0.0000 | 0 | undefined: no positives in test | undefined: no positives in test |"
    assert row in text
    assert f"**{report.scalars['auroc']:.4f}** (over 13 of 14; undefined for hernia)" in text
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert np.isnan(metrics["test/auroc/hernia"]) and metrics["test/auroc_labels"] == 13
    assert not np.isnan(metrics["test/auroc"])
    with open(tmp_path / "per_class.csv", newline="") as f:
        hernia = list(csv.DictReader(f))[13]
    assert hernia["label"] == "hernia" and hernia["auroc"] == "nan" and hernia["ap"] == "nan"


def test_a_report_with_no_defined_auroc_says_so(tmp_path):
    """A one-label task (PneumoniaMNIST) whose test subset has no positives: no label to list
    as the weakest, and report.md says why instead of an empty "Lowest AUROC: ."."""
    from chest_mnist.report import write_report
    from chest_mnist.report_content import build_report

    val = _predictions(n=50, labels=1, seed=13)
    scores, targets = _predictions(n=40, labels=1, seed=14)
    test = (scores, torch.zeros_like(targets))
    report = build_report(val, test, ["pneumonia"], torch.tensor([0.7]), task=BINARY)
    write_report(tmp_path, report, "pneumoniamnist", 28)
    text = (tmp_path / "report.md").read_text()
    assert "AUC (MedMNIST, macro over labels): **undefined** (over 0 of 1;" in text
    assert "Lowest AUROC: none; it is undefined for every label on this split." in text
    assert "Lowest AUROC: ." not in text


def test_the_constant_baseline_is_chosen_on_train_not_test():
    """A label positive in 70% of training images but 30% of test images: the constant answer
    chosen on train ("positive") scores 0.3 on it; the test split's own majority would be 0.7."""
    targets = torch.zeros(10, 2, dtype=torch.int)
    targets[:3, 0] = 1
    assert MULTI_LABEL_TASK.majority_accuracy(targets, torch.tensor([0.7, 0.1])) == pytest.approx(
        (0.3 + 1.0) / 2
    )
    classes = torch.tensor([[0], [0], [0], [1], [2]])
    assert MULTI_CLASS.majority_accuracy(classes, torch.tensor([0.2, 0.5, 0.3])) == pytest.approx(
        0.2
    )


def test_a_binary_report_gives_its_one_outputs_f1_once_and_named():
    """A binary task has one output: its macro and micro F1, precision and recall are that
    output's, and report.md gives each once, named (it printed "f1 macro / micro" as two equal
    numbers, where sklearn's binary "macro" would average both classes)."""
    from chest_mnist.report_content import build_report
    from chest_mnist.report_markdown import markdown
    from chest_mnist.task import BINARY

    g = torch.Generator().manual_seed(11)
    logits = 0.4 + 1.5 * torch.randn(2000, 1, generator=g)
    targets = (torch.rand(2000, 1, generator=g) < logits.sigmoid()).int()
    val, test = (logits[:1000].sigmoid(), targets[:1000]), (logits[1000:].sigmoid(), targets[1000:])
    report = build_report(
        val, test, ["pneumonia"], torch.tensor([0.6]), task=Task.from_medmnist(BINARY)
    )
    text = markdown(report, [], None, "pneumoniamnist", {})
    assert "macro / micro" not in text
    f1 = f1_score(test[1].numpy().ravel(), (test[0] > 0.5).numpy().ravel())
    assert f"| f1 of pneumonia | {f1:.4f} | {report.scalars['f1_macro_tuned']:.4f} |" in text
