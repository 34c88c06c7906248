import numpy as np
import pytest
import torch
from medmnist.evaluator import getACC, getAUC
from sklearn.metrics import f1_score, multilabel_confusion_matrix, precision_score, recall_score

from chest_mnist.metrics import all_negative_accuracy, evaluate_predictions
from chest_mnist.synthetic import LABELS


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
    assert all_negative_accuracy(targets) == pytest.approx(0.75)
    # and it is exactly what MedMNIST ACC gives an all-zero score
    zeros = torch.zeros(4, 3)
    assert all_negative_accuracy(targets) == pytest.approx(
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
    from chest_mnist.report import build_report, write_report

    scores, targets = _predictions(seed=2)
    test = (torch.full(targets.shape, 0.1), targets)
    report = build_report((scores, targets), test, LABELS)
    write_report(tmp_path, report, (scores, targets), test, LABELS, "chestmnist", 28)
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
    report = evaluate_predictions(scores, targets, names, task="multi-class")
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
    assert report["scalars"]["acc_majority"] == pytest.approx(np.bincount(y[:, 0]).max() / 400)
