"""Calibration (chest_mnist/calibration.py): the ECE is torchmetrics', the reliability diagram's
bins are the ECE's, temperature scaling fixes a deliberately over-confident model without
changing its ranking or its decisions, and the report carries all of it."""

import re

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torchmetrics.classification import BinaryCalibrationError, MulticlassCalibrationError

from chest_mnist import UserError
from chest_mnist.calibration import (
    calibration_errors,
    fit_temperature,
    negative_log_likelihood,
    pooled,
    reliability_bins,
    scale,
    temperature_scaling,
)
from chest_mnist.metrics import evaluate_predictions
from chest_mnist.report_content import ReportOptions, build_report
from chest_mnist.report_markdown import markdown
from chest_mnist.task import MULTI_CLASS_TASK, MULTI_LABEL_TASK

LABELS = ["a", "b", "c"]


def calibrated_logits(n: int = 6000, seed: int = 0, prevalence=(0.5, 0.3, 0.1)):
    """Logits whose sigmoid is the true probability of each label: the label is drawn from it."""
    g = torch.Generator().manual_seed(seed)
    prior = torch.tensor(prevalence).logit()
    logits = prior + 1.5 * torch.randn(n, len(prevalence), generator=g)
    targets = (torch.rand(n, len(prevalence), generator=g) < logits.sigmoid()).int()
    return logits, targets


def test_ece_is_torchmetrics_per_label_and_pooled():
    logits, targets = calibrated_logits(n=2000)
    scores = (2.5 * logits).sigmoid()
    overall, per_label = calibration_errors(scores, targets, MULTI_LABEL_TASK, bins=10)
    for k in range(3):
        metric = BinaryCalibrationError(n_bins=10, norm="l1")
        assert per_label[k].item() == pytest.approx(
            metric(scores[:, k], targets[:, k]).item(), abs=1e-7
        )
    pooled_metric = BinaryCalibrationError(n_bins=10)(scores.reshape(-1), targets.reshape(-1))
    assert overall == pytest.approx(pooled_metric.item(), abs=1e-7)
    assert overall > 0.05  # over-confident by a factor 2.5: far from 0

    classes = torch.randint(0, 4, (500,), generator=torch.Generator().manual_seed(1))
    probabilities = (torch.randn(500, 4) + 2 * torch.nn.functional.one_hot(classes, 4)).softmax(1)
    overall, per_class = calibration_errors(probabilities, classes[:, None], MULTI_CLASS_TASK)
    top_label = MulticlassCalibrationError(num_classes=4, n_bins=15)(probabilities, classes)
    assert overall == pytest.approx(top_label.item(), abs=1e-7)
    one_vs_rest = BinaryCalibrationError(n_bins=15)(probabilities[:, 2], (classes == 2).int())
    assert per_class[2].item() == pytest.approx(one_vs_rest.item(), abs=1e-7)


def test_the_reliability_diagram_bins_add_up_to_the_ece():
    logits, targets = calibrated_logits(n=3000, seed=2)
    scores = (0.4 * logits).sigmoid()  # under-confident this time
    scores[:5, 0] = torch.tensor([0.0, 1.0, 0.2, 0.4, 1.0 / 3])  # edges and exact values
    g = torch.Generator().manual_seed(8)
    classes = torch.randint(0, 4, (3000,), generator=g)
    logits = torch.randn(3000, 4, generator=g) + 2 * torch.nn.functional.one_hot(classes, 4)
    probabilities = (0.6 * logits).softmax(1)
    for task, p, truth, bins, pairs in (
        (MULTI_LABEL_TASK, scores, targets, 15, scores.numel()),  # every (image, label) score
        (MULTI_LABEL_TASK, scores, targets, 7, scores.numel()),
        (MULTI_CLASS_TASK, probabilities, classes[:, None], 15, len(classes)),  # top labels
    ):
        points = reliability_bins(*pooled(p, truth, task), bins)
        share = points["count"] / points["count"].sum()
        ece = (share * np.abs(points["confidence"] - points["frequency"])).sum()
        assert ece == pytest.approx(calibration_errors(p, truth, task, bins)[0], abs=1e-6)
        assert points["count"].sum() == pairs


def test_temperature_fixes_an_over_confident_model_and_keeps_its_ranking():
    val_logits, val_targets = calibrated_logits(seed=3)
    test_logits, test_targets = calibrated_logits(seed=4)
    confident = 3.0  # the model's logits are 3x the calibrated ones
    val, test = (confident * val_logits, val_targets), (confident * test_logits, test_targets)
    scaling = temperature_scaling(val, test, MULTI_LABEL_TASK, per_label=False)
    assert scaling.temperature.item() == pytest.approx(confident, rel=0.1)
    assert scaling.nll["val_after"] < scaling.nll["val_before"] - 0.05
    assert scaling.nll["test_after"] < scaling.nll["test_before"] - 0.05
    before = test[0].sigmoid()
    after = scale(test[0], scaling.temperature).sigmoid()
    ece_before, _ = calibration_errors(before, test_targets, MULTI_LABEL_TASK)
    ece_after, _ = calibration_errors(after, test_targets, MULTI_LABEL_TASK)
    assert ece_after < ece_before / 3
    one = evaluate_predictions(before, test_targets, LABELS)
    two = evaluate_predictions(after, test_targets, LABELS)
    # the same ranking and decisions; float32 probabilities of logits beyond about 17 round to
    # 1.0, so the over-confident scores have a few more ties than the scaled ones (1e-6 here)
    for name in ("auroc", "ap_macro"):
        assert two["scalars"][name] == pytest.approx(one["scalars"][name], abs=1e-5)
    for name in ("acc", "f1_macro"):
        assert two["scalars"][name] == one["scalars"][name]

    # one temperature per label finds each label's own over-confidence
    factors = torch.tensor([1.0, 2.0, 4.0])
    per_label = fit_temperature(factors * val_logits, val_targets, MULTI_LABEL_TASK, per_label=True)
    np.testing.assert_allclose(per_label.numpy(), factors.numpy(), rtol=0.12)
    nll_one = negative_log_likelihood(
        scale(
            factors * val_logits,
            fit_temperature(factors * val_logits, val_targets, MULTI_LABEL_TASK, False),
        ),
        val_targets,
        MULTI_LABEL_TASK,
    )
    nll_each = negative_log_likelihood(
        scale(factors * val_logits, per_label), val_targets, MULTI_LABEL_TASK
    )
    assert nll_each < nll_one


def test_a_softmax_task_takes_one_temperature():
    """One temperature for all classes, and the right one: the classes are drawn from the
    softmax of `logits`, and the model's logits are 3 times those."""
    g = torch.Generator().manual_seed(7)
    logits = 2 * torch.randn(4000, 4, generator=g)
    classes = torch.multinomial(logits.softmax(1), 1, generator=g)
    with pytest.raises(UserError, match="calibration.per_label=false"):
        fit_temperature(3 * logits, classes, MULTI_CLASS_TASK, per_label=True)
    temperature = fit_temperature(3 * logits, classes, MULTI_CLASS_TASK, per_label=False)
    assert temperature.shape == (1,)
    assert temperature.item() == pytest.approx(3.0, rel=0.1)


def test_the_report_gives_the_calibration_before_and_after():
    val_logits, val_targets = calibrated_logits(seed=5)
    test_logits, test_targets = calibrated_logits(n=3000, seed=6)
    val, test = (2 * val_logits, val_targets), (2 * test_logits, test_targets)
    scaling = temperature_scaling(val, test, MULTI_LABEL_TASK, per_label=True)
    t = scaling.temperature
    report = build_report(
        (scale(val[0], t).sigmoid(), val_targets),
        (scale(test[0], t).sigmoid(), test_targets),
        LABELS,
        torch.tensor([0.5, 0.3, 0.1]),
        scaling=scaling,
    )
    s = report.scalars
    assert s["ece"] < s["ece_before"]
    assert s["nll"] == scaling.nll["test_after"] < s["nll_before"] == scaling.nll["test_before"]
    per_label = calibration_errors(test[0].sigmoid(), test_targets, MULTI_LABEL_TASK)[1]
    for k, row in enumerate(report.per_label):
        assert row["ece_before"] == pytest.approx(per_label[k].item())
        assert row["temperature"] == pytest.approx(t[k].item())
    text = markdown(report, [], None, "chestmnist", {})
    assert f"ECE on test {s['ece_before']:.4f} before, {s['ece']:.4f} after" in text
    assert "one per label" in text
    plain = build_report(
        (val[0].sigmoid(), val_targets), (test[0].sigmoid(), test_targets), LABELS, torch.ones(3)
    )
    assert "ece_before" not in plain.scalars and "No temperature scaling" in markdown(
        plain, [], None, "chestmnist", {}
    )
    assert plain.scalars["ece"] == pytest.approx(s["ece_before"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("calibration.method=platt", "calibration.method='platt'"),
        ("calibration.bins=0", "calibration.bins=0"),
        ("calibration.per_label=maybe", "calibration.per_label='maybe'"),
        ("bootstrap.resamples=-5", "bootstrap.resamples=-5"),
        ("bootstrap.level=95", "bootstrap.level=95"),
        ("thresholds.rule=best", "thresholds.rule='best'"),
        ("figures=maybe", "figures='maybe'"),
    ],
)
def test_report_options_refuse_a_bad_value_naming_the_key(override, key):
    cfg = OmegaConf.create(
        {
            "thresholds": {"rule": "f1"},
            "bootstrap": {"resamples": 1000, "level": 0.95, "seed": 0},
            "calibration": {"method": "none", "per_label": False, "bins": 15},
        }
    )
    name, value = override.split("=")
    OmegaConf.update(
        cfg, name, OmegaConf.create({"v": value})["v"] if value.isalpha() else eval(value)
    )
    with pytest.raises(UserError, match=key.replace("[", r"\[").replace(".", r"\.")):
        ReportOptions.from_config(cfg)


def test_report_options_from_the_defaults():
    options = ReportOptions.from_config(
        OmegaConf.create({"bootstrap": {"resamples": 0}, "calibration": {"method": "temperature"}})
    )
    assert options.bootstrap is None and options.calibration == "temperature"
    defaults = ReportOptions.from_config(OmegaConf.create({}))
    assert defaults.bootstrap.resamples == 1000 and defaults.figures is True
    assert ReportOptions.from_config(OmegaConf.create({"figures": False})).figures is False


@pytest.mark.slow
def test_evaluate_with_temperature_then_predict_applies_it(trained_run, synthetic_npz, tmp_path):
    """calibration=temperature: the report's scores, thresholds and ECE are after it, its
    thresholds.json holds the temperatures for the weights it names, and predict and the page
    give the report's own test probabilities with them: beside the checkpoint and as
    thresholds=PATH; beside other weights, neither thresholds nor temperatures are used."""
    import json
    import shutil

    from chest_mnist.checkpoints import resolve_checkpoint
    from chest_mnist.evaluate import evaluate
    from chest_mnist.predict import predict
    from tests.conftest import compose_train

    def evaluate_into(folder, *overrides):
        return evaluate(
            compose_train(
                [
                    f"ckpt_path={trained_run}",
                    "trainer=cpu",
                    "+trainer.enable_progress_bar=false",
                    f"paths.output_dir={folder}",
                    "bootstrap.resamples=100",
                    *overrides,
                ],
                "evaluate",
            )
        )

    plain = evaluate_into(tmp_path / "plain", "figures=false")  # the scaled one draws them
    scaled = evaluate_into(
        tmp_path / "scaled", "calibration=temperature", "calibration.per_label=true"
    )
    report = tmp_path / "scaled" / "report"
    tuned = json.loads((report / "thresholds.json").read_text())
    assert len(tuned["temperatures"]) == 14 and len(set(tuned["temperatures"].values())) > 1
    assert (
        tuned["weights_sha256"]
        == json.loads((report / "metrics.json").read_text())["weights_sha256"]
    )
    assert (
        json.loads((tmp_path / "plain" / "report" / "thresholds.json").read_text())["temperatures"]
        is None
    )
    # the ranking and the decisions at 0.5 are kept, up to float32 rounding: this 2-epoch
    # model's logits are nearly equal and near 0, so a few scores tie, or sit at exactly 0.5,
    # on one side of the scaling and not on the other (one decision of 3,584 here)
    assert scaled["test/acc"] == pytest.approx(plain["test/acc"], abs=2 / (256 * 14))
    for name in ("test/auroc", "test/ap_macro"):
        assert scaled[f"{name}_before"] == plain[name]
        assert scaled[name] == pytest.approx(plain[name], abs=2e-4), name
    assert scaled["test/ece_before"] == pytest.approx(plain["test/ece"], abs=1e-6)
    assert scaled["test/ece"] != pytest.approx(plain["test/ece"], abs=1e-6)

    saved = np.load(report / "predictions.npz")
    unscaled = np.load(tmp_path / "plain" / "report" / "predictions.npz")
    assert not np.allclose(saved["scores"], unscaled["scores"], atol=1e-4)

    def predict_into(name, ckpt_path, *overrides):
        summary = predict(
            compose_train(
                [
                    f"ckpt_path={ckpt_path}",
                    f"inputs=[{synthetic_npz}]",
                    "format=json",
                    f"paths.output_dir={tmp_path / name}",
                    *overrides,
                ],
                "predict",
            )
        )
        document = json.loads(summary["output"].read_text())
        probabilities = [row["probabilities"] for row in document["predictions"]]
        scores = np.array([[p[label] for label in document["labels"]] for p in probabilities])
        return document, scores

    # given by hand
    document, scores = predict_into("given", trained_run, f"thresholds={report}/thresholds.json")
    np.testing.assert_allclose(scores, saved["scores"], atol=1e-6)
    assert document["calibration_from"].startswith("temperature scaling fitted on validation")
    np.testing.assert_allclose(list(document["thresholds"].values()), saved["thresholds"], atol=0)

    # beside the checkpoint, as a training run with calibration=temperature leaves it
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(resolve_checkpoint(trained_run), run / "checkpoints")
    shutil.copytree(report, run / "report")
    _, beside = predict_into("beside", run)
    np.testing.assert_allclose(beside, saved["scores"], atol=1e-6)

    # beside other weights: no temperatures either, the model's own probabilities
    other = json.loads((run / "report" / "thresholds.json").read_text())
    other["weights_sha256"] = "f" * 64
    (run / "report" / "thresholds.json").write_text(json.dumps(other))
    document, own = predict_into("other", run)
    np.testing.assert_allclose(own, unscaled["scores"], atol=1e-6)
    assert document["calibration_from"].startswith("none")
    assert set(document["thresholds"].values()) == {0.5}

    # the web page takes the same temperatures, through the same code
    from PIL import Image

    from chest_mnist.analyser import Analyser

    with np.load(synthetic_npz) as npz:
        Image.fromarray(npz["test_images"][3]).save(tmp_path / "three.png")
    page = Analyser(trained_run, thresholds=str(report / "thresholds.json"), device="cpu")
    assert page.calibration_from.startswith("temperature scaling fitted on validation")
    shown = page.analyse(tmp_path / "three.png").probabilities
    labels = list(shown)
    np.testing.assert_allclose([shown[label] for label in labels], saved["scores"][3], atol=1e-6)


def test_one_temperature_per_class_is_refused_before_training(tiny_overrides):
    from chest_mnist.config_checks import check_config
    from tests.conftest import compose_train

    overrides = ["data.flag=pathmnist", "calibration=temperature"]
    cfg = compose_train(tiny_overrides + overrides + ["calibration.per_label=true"])
    with pytest.raises(UserError, match="calibration.per_label=false"):
        check_config(cfg, check_devices=False)
    check_config(compose_train(tiny_overrides + overrides), check_devices=False)
    chest = compose_train(
        tiny_overrides + ["calibration=temperature", "calibration.per_label=true"]
    )
    check_config(chest, check_devices=False)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "+bootstrap.resampels=10",
            "bootstrap.resampels is not a key of bootstrap: its keys are resamples, level, seed",
        ),
        ("+calibration.per_labels=true", "calibration.per_labels is not a key of calibration"),
        ("+thresholds.rules=youden", "thresholds.rules is not a key of thresholds"),
        (
            "bootstrap=null",
            "bootstrap=None is not a value but a group of keys (resamples, "
            "level, seed): give bootstrap.resamples=0 for no intervals.",
        ),
        ("bootstrap=0", "bootstrap=0 is not a value"),
        ("bootstrap=false", "bootstrap=False is not a value"),
        (
            "thresholds=fixed",
            "thresholds='fixed' is not a value but a group of keys (rule): "
            "give thresholds.rule=fixed for 0.5 for every label.",
        ),
    ],
)
def test_a_report_key_spelt_wrong_or_null_is_refused_before_training(
    tiny_overrides, override, message
):
    """Added with `+`, a misspelt key was ignored (1,000 resamples where 10 were asked for),
    bootstrap=null drew 1,000 resamples, bootstrap=0 raised a TypeError and thresholds=fixed
    named "thresholds.d": each is refused with what to write instead."""
    from chest_mnist.config_checks import check_config
    from tests.conftest import compose_train

    check_config(compose_train(tiny_overrides), check_devices=False)
    with pytest.raises(UserError, match=re.escape(message)):
        check_config(compose_train([*tiny_overrides, override]), check_devices=False)


def test_a_label_with_one_value_in_validation_keeps_temperature_one():
    """Its NLL falls without bound as T shrinks: fitted, it would push its scores to 0 or 1."""
    logits, targets = calibrated_logits(seed=7)
    targets[:, 2] = 0  # no positives in validation
    temperature = fit_temperature(2 * logits, targets, MULTI_LABEL_TASK, per_label=True)
    assert temperature[2].item() == 1.0
    np.testing.assert_allclose(temperature[:2].numpy(), [2.0, 2.0], rtol=0.12)
    test = (2 * logits, targets)
    scaling = temperature_scaling(test, test, MULTI_LABEL_TASK, per_label=True)
    report = build_report(
        (scale(test[0], scaling.temperature).sigmoid(), targets),
        (scale(test[0], scaling.temperature).sigmoid(), targets),
        LABELS,
        torch.tensor([0.5, 0.3, 0.1]),
        scaling=scaling,
    )
    assert "kept at 1 for c (one value only in validation" in markdown(report, [], None, "x", {})


def test_each_temperature_is_the_least_nll_in_the_range_and_a_bound_is_named():
    """Each label's temperature is the one of least validation NLL in T_RANGE (scipy's bounded
    search on that label alone agrees). A label its scores say nothing about wants T beyond the
    top (every score towards 0.5, where float32 ties them), one that validation separates T
    below the bottom: each gets the bound, and report.md names both. (L-BFGS on log T ran to
    T = 28,530 for the first; for the second it stopped short of the bound, unnamed.)"""
    from scipy.optimize import minimize_scalar

    from chest_mnist.calibration import T_RANGE, at_bound

    logits, targets = calibrated_logits(seed=8, prevalence=(0.5, 0.3, 0.1, 0.5, 0.4))
    g = torch.Generator().manual_seed(9)
    targets[:, 3] = (torch.rand(len(targets), generator=g) < 0.5).int()  # unrelated to its logit
    logits[:, 3] = 0.05 * torch.randn(len(targets), generator=g)  # about 0 for every image
    logits[:, 4] = (2 * targets[:, 4] - 1) * (1 + torch.rand(len(targets), generator=g))
    logits = 2 * logits
    temperature = fit_temperature(logits, targets, MULTI_LABEL_TASK, per_label=True)
    assert temperature[3:].tolist() == pytest.approx([T_RANGE[1], T_RANGE[0]], rel=1e-7)
    assert at_bound(temperature).tolist() == [False, False, False, True, True]
    for k in range(3):
        z, y = logits[:, k].double().numpy(), targets[:, k].double().numpy()

        def nll(t, z=z, y=y):
            return float(np.mean(np.logaddexp(0, z / t) - y * z / t))

        best = minimize_scalar(nll, bounds=T_RANGE, method="bounded", options={"xatol": 1e-9})
        assert temperature[k].item() == pytest.approx(best.x, rel=1e-5), k
    scaling = temperature_scaling(
        (logits, targets), (logits, targets), MULTI_LABEL_TASK, per_label=True
    )
    report = build_report(
        (scale(logits, scaling.temperature).sigmoid(), targets),
        (scale(logits, scaling.temperature).sigmoid(), targets),
        ["a", "b", "c", "d", "e"],
        torch.tensor([0.5, 0.3, 0.1, 0.5, 0.4]),
        scaling=scaling,
    )
    assert "at a bound of 0.05 to 20.0 for d, e (the fit would go further)" in markdown(
        report, [], None, "x", {}
    )


def test_a_softmax_temperature_changes_auroc_and_the_report_says_by_how_much():
    """One temperature keeps each image's arg-max class, so ACC, but not a class's order of
    scores across images: the report gives the macro AUROC and AP before and after, and does
    not say they are kept (it once did)."""
    g = torch.Generator().manual_seed(10)
    logits = torch.randn(3000, 4, generator=g) * torch.tensor([0.5, 1.0, 2.0, 4.0])
    classes = torch.multinomial((logits / 3).softmax(1), 1, generator=g)
    val, test = (logits[:1500], classes[:1500]), (logits[1500:], classes[1500:])
    scaling = temperature_scaling(val, test, MULTI_CLASS_TASK, per_label=False)
    assert scaling.temperature.item() == pytest.approx(3.0, rel=0.15)
    t, names = scaling.temperature, ["w", "x", "y", "z"]
    report = build_report(
        (scale(val[0], t).softmax(1), val[1]),
        (scale(test[0], t).softmax(1), test[1]),
        names,
        torch.full((4,), 0.25),
        task=MULTI_CLASS_TASK,
        scaling=scaling,
    )
    s = report.scalars
    unscaled = evaluate_predictions(test[0].softmax(1), test[1], names, task=MULTI_CLASS_TASK)
    assert s["auroc_before"] == pytest.approx(unscaled["scalars"]["auroc"])
    assert s["ap_macro_before"] == pytest.approx(unscaled["scalars"]["ap_macro"])
    assert abs(s["auroc"] - s["auroc_before"]) > 1e-3  # the classes' orders moved
    assert s["acc"] == unscaled["scalars"]["acc"]  # the arg-max did not
    text = markdown(report, [], None, "x", {})
    assert (
        f"but not a class's order of scores across images: AUROC {s['auroc_before']:.4f} -> "
        f"{s['auroc']:.4f}, macro AP {s['ap_macro_before']:.4f} -> {s['ap_macro']:.4f}"
    ) in text
    assert "so AUROC, AP and ACC" not in text
