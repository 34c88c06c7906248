"""The report's bootstrap intervals (chest_mnist/bootstrap.py): the same numbers as a slow loop
over the same resamples with sklearn, the evaluation's rule for undefined metrics, narrower
intervals with more images, and the time at ChestMNIST's test size."""

import math
import time

import numpy as np
import pytest
import torch
from scipy.stats import norm
from sklearn.metrics import average_precision_score, roc_auc_score

from chest_mnist.bootstrap import Bootstrap, bootstrap_intervals, resample_indices
from chest_mnist.metrics import evaluate_predictions
from chest_mnist.report_content import build_report
from chest_mnist.report_markdown import markdown
from chest_mnist.task import BINARY, MULTI_CLASS_TASK, MULTI_LABEL_TASK, Task


def reference(scores, targets, settings, thresholds=None, softmax=False):
    """The intervals the slow way: each resample's images, sklearn per label, np.nanpercentile."""
    n, num_outputs = scores.shape
    truth = np.eye(num_outputs)[targets] if softmax else targets
    if softmax:
        correct = scores.argmax(1) == targets
    else:
        cut = 0.5 if thresholds is None else thresholds
        correct = ((scores > cut) == (targets == 1)).mean(1)
    aurocs, aps, accs = [], [], []
    for chunk in resample_indices(n, settings.resamples, settings.seed):
        for idx in chunk:
            row_auc, row_ap = [], []
            for k in range(num_outputs):
                y, s = truth[idx, k], scores[idx, k]
                both = 0 < y.sum() < len(y)
                row_auc.append(roc_auc_score(y, s) if both else np.nan)
                row_ap.append(average_precision_score(y, s) if y.sum() > 0 else np.nan)
            aurocs.append(row_auc)
            aps.append(row_ap)
            accs.append(correct[idx].mean())
    aurocs, aps = np.array(aurocs), np.array(aps)
    q = [50 * (1 - settings.level), 50 * (1 + settings.level)]
    with np.errstate(all="ignore"):
        return {
            "auroc": np.nanpercentile(np.nanmean(aurocs, 1), q),
            "ap_macro": np.nanpercentile(np.nanmean(aps, 1), q),
            "acc": np.percentile(accs, q),
            "per_label_auroc": np.nanpercentile(aurocs, q, axis=0),
            "per_label_ap": np.nanpercentile(aps, q, axis=0),
            "defined_auroc": (~np.isnan(aurocs)).sum(0),
        }


def multi_label_case(n=240, seed=0):
    """Three labels: common, uncommon, and one with 2 positives (absent from many resamples),
    scores rounded to 2 decimals so that ties occur."""
    rng = np.random.default_rng(seed)
    targets = np.zeros((n, 3), np.int64)
    targets[:, 0] = rng.random(n) < 0.4
    targets[:, 1] = rng.random(n) < 0.1
    targets[rng.choice(n, 2, replace=False), 2] = 1
    scores = np.round(np.clip(0.25 * targets + rng.random((n, 3)) * 0.75, 0, 1), 2)
    return scores.astype(np.float32), targets


@pytest.mark.slow
def test_intervals_equal_a_loop_with_sklearn_over_the_same_resamples():
    scores, targets = multi_label_case()
    settings = Bootstrap(resamples=400, level=0.95, seed=7)
    got = bootstrap_intervals(
        torch.from_numpy(scores), torch.from_numpy(targets), MULTI_LABEL_TASK, settings
    )
    want = reference(scores.astype(np.float64), targets, settings)
    for name in ("auroc", "ap_macro", "acc"):
        np.testing.assert_allclose(got["scalars"][name], want[name], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got["per_label"]["auroc"], want["per_label_auroc"], atol=1e-6)
    np.testing.assert_allclose(got["per_label"]["ap"], want["per_label_ap"], atol=1e-6)
    # the rare label has no positives in some resamples: left out there, not scored 0
    assert 0 < want["defined_auroc"][2] < 400
    assert got["per_label"]["auroc"][0, 2] > 0.05  # a 0.0 counted in would pull it to 0


def test_tuned_thresholds_and_a_softmax_task_follow_their_own_decisions():
    scores, targets = multi_label_case(n=150, seed=1)
    settings = Bootstrap(resamples=200, seed=3)
    cuts = np.array([0.6, 0.3, 0.9], np.float32)
    got = bootstrap_intervals(
        torch.from_numpy(scores),
        torch.from_numpy(targets),
        MULTI_LABEL_TASK,
        settings,
        thresholds=torch.from_numpy(cuts),
    )
    want = reference(scores.astype(np.float64), targets, settings, thresholds=cuts)
    np.testing.assert_allclose(got["scalars"]["acc_tuned"], want["acc"], atol=1e-12)

    rng = np.random.default_rng(2)
    classes = rng.integers(0, 4, 180)
    logits = rng.normal(size=(180, 4)) + 1.5 * np.eye(4)[classes]
    probabilities = torch.from_numpy(logits).softmax(1).float()
    got = bootstrap_intervals(
        probabilities, torch.from_numpy(classes)[:, None], MULTI_CLASS_TASK, settings
    )
    want = reference(probabilities.double().numpy(), classes, settings, softmax=True)
    for name in ("auroc", "ap_macro", "acc"):
        np.testing.assert_allclose(got["scalars"][name], want[name], atol=1e-6)


def separable(n: int, gap: float, seed: int = 0):
    """Scores N(gap, 1) for positives and N(0, 1) for negatives, half positive: the AUROC of
    infinitely many images is Phi(gap / sqrt(2))."""
    rng = np.random.default_rng(seed)
    targets = (np.arange(n) % 2)[:, None]
    scores = rng.normal(size=(n, 1)) + gap * targets
    return torch.from_numpy(scores).float(), torch.from_numpy(targets)


def test_intervals_narrow_with_more_images_and_hold_the_point_estimate():
    task = Task.from_medmnist(BINARY)
    true_auroc = norm.cdf(1.0 / math.sqrt(2))  # 0.7602
    widths = []
    for n in (200, 2000, 20000):
        scores, targets = separable(n, gap=1.0, seed=n)
        got = bootstrap_intervals(scores, targets, task, Bootstrap(resamples=300, seed=1))
        low, high = got["scalars"]["auroc"]
        point = evaluate_predictions(scores, targets, ["finding"], task=task)["scalars"]["auroc"]
        assert low < point < high
        widths.append(high - low)
    assert widths[0] > 2.5 * widths[1] > 2.5 * 2.5 * widths[2]  # about sqrt(10) each time
    assert low < true_auroc < high
    assert widths[2] < 0.02


def test_the_same_seed_gives_the_same_intervals_and_another_seed_others():
    scores, targets = separable(300, gap=0.5)
    task = Task.from_medmnist(BINARY)
    one = bootstrap_intervals(scores, targets, task, Bootstrap(resamples=100, seed=1))
    again = bootstrap_intervals(scores, targets, task, Bootstrap(resamples=100, seed=1))
    other = bootstrap_intervals(scores, targets, task, Bootstrap(resamples=100, seed=2))
    assert one["scalars"] == again["scalars"]
    assert one["scalars"]["auroc"] != other["scalars"]["auroc"]


def test_a_label_without_positives_has_no_interval():
    scores, targets = multi_label_case(n=120)
    targets[:, 2] = 0
    got = bootstrap_intervals(
        torch.from_numpy(scores), torch.from_numpy(targets), MULTI_LABEL_TASK, Bootstrap(50)
    )
    assert np.isnan(got["per_label"]["auroc"][:, 2]).all()
    assert np.isnan(got["per_label"]["ap"][:, 2]).all()
    assert not np.isnan(got["per_label"]["auroc"][:, :2]).any()
    # the macro means are over the two defined labels, as the evaluation's
    assert not math.isnan(got["scalars"]["auroc"][0])


def test_the_report_shows_the_intervals_in_its_rows_scalars_and_text():
    scores, targets = multi_label_case(n=200)
    test = (torch.from_numpy(scores), torch.from_numpy(targets))
    labels = ["a", "b", "rare"]
    settings = Bootstrap(resamples=120, seed=4)
    report = build_report(test, test, labels, torch.tensor([0.4, 0.1, 0.01]), bootstrap=settings)
    direct = bootstrap_intervals(*test, MULTI_LABEL_TASK, settings, report.thresholds)
    assert (report.scalars["auroc_low"], report.scalars["auroc_high"]) == direct["scalars"]["auroc"]
    assert (report.scalars["acc_tuned_low"], report.scalars["acc_tuned_high"]) == (
        direct["scalars"]["acc_tuned"]
    )
    row = report.per_label[1]
    assert [row["ap_low"], row["ap_high"]] == direct["per_label"]["ap"][:, 1].tolist()
    assert list(row)[list(row).index("ap") + 1 : list(row).index("ap") + 5] == [
        "auroc_low",
        "auroc_high",
        "ap_low",
        "ap_high",
    ]
    text = markdown(report, [], None, "chestmnist", {})
    s = report.scalars
    assert f"**{s['auroc']:.4f} [{s['auroc_low']:.4f}, {s['auroc_high']:.4f}]**" in text
    assert f"{row['auroc']:.4f} [{row['auroc_low']:.4f}, {row['auroc_high']:.4f}]" in text
    assert "95% percentile bootstrap over test images, 120 resamples, seed 4" in text
    assert Bootstrap(1000, 0.975, 0).describe().startswith("97.5% percentile")  # not 98%
    no_intervals = build_report(test, test, labels, torch.tensor([0.4, 0.1, 0.01]))
    assert "auroc_low" not in no_intervals.scalars and "ap_low" not in no_intervals.per_label[0]


@pytest.mark.slow
def test_chestmnist_test_size_takes_at_most_15_seconds():
    """22,433 x 14, 1,000 resamples: the issue's budget on the 2-core CPU."""
    rng = np.random.default_rng(0)
    prevalence = np.array([10, 2.5, 4, 18, 5, 5.6, 1.2, 4.7, 3.9, 2, 2.2, 1.5, 3, 0.19]) / 100
    targets = (rng.random((22433, 14)) < prevalence).astype(np.int64)
    scores = np.clip(0.3 * targets + 0.7 * rng.random((22433, 14)), 0, 1).astype(np.float32)
    started = time.perf_counter()
    got = bootstrap_intervals(
        torch.from_numpy(scores), torch.from_numpy(targets), MULTI_LABEL_TASK, Bootstrap(1000)
    )
    seconds = time.perf_counter() - started
    assert seconds < 15, f"{seconds:.1f} s"
    assert not np.isnan(got["per_label"]["auroc"]).any()
