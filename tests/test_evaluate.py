"""evaluate: thresholds tuned on val, the report, MedMNIST's evaluator, and bad checkpoints."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from medmnist import INFO
from medmnist.evaluator import Evaluator

from chest_mnist import UserError
from chest_mnist.batches import to_model_input
from chest_mnist.checkpoints import load_checkpoint, model_from_checkpoint, resolve_checkpoint
from chest_mnist.evaluate import evaluate
from chest_mnist.metrics import evaluate_predictions, tune_thresholds
from chest_mnist.model import MedMNISTClassifier
from chest_mnist.report_content import build_report
from chest_mnist.report_markdown import markdown
from chest_mnist.report_tables import write_medmnist_result
from chest_mnist.synthetic import LABELS
from tests.conftest import compose_train
from tests.test_train import check_report


def _predictions(n, seed):
    g = torch.Generator().manual_seed(seed)
    targets = (torch.rand(n, 14, generator=g) < 0.1).int()
    targets[:2] = 1
    scores = torch.sigmoid(
        1.5 * targets + torch.randn(n, 14, generator=g) - 2.5
    )  # rarely above 0.5
    return scores, targets


def _rule_value(decided: torch.Tensor, truth: torch.Tensor, rule: str) -> float:
    """F1, or Youden's J (TPR - FPR), of the decisions `decided` against `truth`."""
    tp = (decided & truth).sum().item()
    if rule == "f1":
        return 2 * tp / (decided.sum().item() + truth.sum().item())
    fp = (decided & ~truth).sum().item()
    return tp / truth.sum().item() - fp / (~truth).sum().item()


def _best_by_brute_force(column: torch.Tensor, truth: torch.Tensor, rule: str) -> float:
    """The rule's highest value over every decision `score >= cut` of the label's own scores."""
    return max(_rule_value(column >= cut, truth, rule) for cut in column.unique())


def _best_f1_by_brute_force(column: torch.Tensor, truth: torch.Tensor) -> float:
    return _best_by_brute_force(column, truth, "f1")


@pytest.mark.parametrize("rule", ["f1", "youden"])
def test_tuned_thresholds_reach_their_rules_best_cut(rule):
    scores, targets = _predictions(400, seed=0)
    thresholds, kept = tune_thresholds(scores, targets, rule=rule)
    assert thresholds.shape == (14,) and ((thresholds > 0) & (thresholds < 1)).all()
    assert not (scores == thresholds).any() and kept == {}  # below its cut, here on no score
    for k in range(14):
        truth = targets[:, k] == 1
        reached = _rule_value(scores[:, k] > thresholds[k], truth, rule)
        assert reached == pytest.approx(_best_by_brute_force(scores[:, k], truth, rule), abs=1e-9)
    other = "youden" if rule == "f1" else "f1"  # the two rules choose differently here
    assert not torch.equal(thresholds, tune_thresholds(scores, targets, rule=other)[0])


def test_decisions_at_a_tuned_threshold_are_the_decisions_tuning_chose():
    """The cut and the next lower score are neighbouring float32 values: a threshold halfway
    between them in float64, stored as float32, rounds onto the cut (0.5 here, an even
    mantissa), and `score > threshold` then drops the cut's own images."""
    g = torch.Generator().manual_seed(7)
    scores, targets = torch.rand(200, 3, generator=g), torch.zeros(200, 3, dtype=torch.int)
    for k, cut in enumerate((0.5, 0.25, 0.75)):
        cut = torch.tensor(cut)
        scores[:, k] *= 0.99 * cut  # the negatives below the cut
        scores[:3, k] = torch.tensor([0.9, 0.95, cut.item()])  # the positives, lowest at the cut
        scores[3, k] = torch.nextafter(cut, torch.tensor(0.0))  # a negative just below it
        targets[:3, k] = 1
    thresholds, _ = tune_thresholds(scores, targets, "f1")
    tuned = evaluate_predictions(scores, targets, ["a", "b", "c"], thresholds)
    for k, row in enumerate(tuned["per_label"]):
        assert row["tp"] == 3 and row["fp"] == 0, (row, thresholds[k].item())
        assert row["f1"] == pytest.approx(_best_f1_by_brute_force(scores[:, k], targets[:, k] == 1))


def test_tuned_thresholds_never_lose_f1_on_val_and_reach_the_best_cut():
    scores, targets = _predictions(500, seed=1)
    at_half = evaluate_predictions(scores, targets, LABELS)
    thresholds, _ = tune_thresholds(scores, targets, "f1")
    tuned = evaluate_predictions(scores, targets, LABELS, thresholds)
    for k, (half, best) in enumerate(zip(at_half["per_label"], tuned["per_label"], strict=True)):
        assert best["f1"] >= half["f1"] - 1e-7, half["label"]
        brute = _best_f1_by_brute_force(scores[:, k], targets[:, k] == 1)
        assert best["f1"] == pytest.approx(brute, abs=1e-6), half["label"]
    assert (
        tuned["scalars"]["f1_macro"] > at_half["scalars"]["f1_macro"] + 0.1
    )  # and here gains a lot


def test_labels_with_nothing_to_tune_keep_one_half_and_say_why():
    scores, targets = _predictions(100, seed=5)
    scores[:, 0] = 0.3  # constant: nothing to rank
    scores[7, 1] = float("nan")
    targets[:, 2] = 0  # no positives
    thresholds, kept = tune_thresholds(scores, targets, "f1")
    assert thresholds[:3].tolist() == [0.5, 0.5, 0.5] and (thresholds[3:] != 0.5).all()
    assert kept == {
        0: "every validation score is 0.3: nothing to rank",
        1: "1 validation scores are not finite",
        2: "no positives in validation",
    }


def test_fixed_rule_keeps_one_half_and_unknown_rule_is_refused():
    scores, targets = _predictions(100, seed=2)
    assert torch.equal(tune_thresholds(scores, targets, "fixed")[0], torch.full((14,), 0.5))
    with pytest.raises(UserError, match="thresholds.rule='best' is unknown"):
        tune_thresholds(scores, targets, "best")


def test_test_labels_never_influence_thresholds():
    val, test = _predictions(300, seed=3), _predictions(300, seed=4)
    prevalence = val[1].float().mean(0)
    report = build_report(val, test, LABELS, prevalence)
    flipped = (test[0], 1 - test[1])
    assert torch.equal(build_report(val, flipped, LABELS, prevalence).thresholds, report.thresholds)
    assert not torch.equal(
        build_report(flipped, test, LABELS, prevalence).thresholds, report.thresholds
    )


def test_a_fixed_rule_report_says_nothing_was_tuned():
    """thresholds.rule=fixed: 0.5 for every label. report.md said "Thresholds were chosen per
    label on the validation split" and showed an "at thresholds tuned" column equal to 0.5's."""
    val, test = _predictions(300, seed=3), _predictions(300, seed=4)
    prevalence = val[1].float().mean(0)
    fixed = markdown(build_report(val, test, LABELS, prevalence, rule="fixed"), [], None, "x", {})
    assert "Thresholds: 0.5 for every label (thresholds.rule=fixed); none was tuned." in fixed
    assert "tuned" not in fixed.replace("none was tuned", "")
    assert "| threshold |" not in fixed  # the per-label table has no threshold column
    tuned = markdown(build_report(val, test, LABELS, prevalence, rule="f1"), [], None, "x", {})
    assert "at thresholds tuned on validation" in tuned and "(rule: f1)" in tuned
    assert "| threshold |" in tuned
    assert "in the table above." in tuned and "reliability.png" not in tuned  # none drawn
    drawn = build_report(val, test, LABELS, prevalence)
    assert "in the table above and in reliability.png." in markdown(
        drawn, ["reliability.png"], None, "x", {}
    )


def test_a_second_report_in_the_same_folder_replaces_medmnists_result_file(tmp_path):
    """A resumed run writes its report into report/ again: MedMNIST's result file, named by
    the scores, would otherwise stay beside the new one with other weights' numbers."""
    val = _predictions(300, seed=3)
    prevalence = val[1].float().mean(0)
    (tmp_path / "notes.csv").write_text("the user's own file\n")
    names = []
    for seed in (4, 5):
        report = build_report(val, _predictions(300, seed=seed), LABELS, prevalence)
        names.append(write_medmnist_result(report, tmp_path, "chestmnist", 28, "run1").name)
    assert names[0] != names[1]  # other scores, another name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names[1], "notes.csv"])


BLOOD = [INFO["bloodmnist"]["label"][str(k)] for k in range(8)]  # one of them 67 characters


def _overlapping(fig, boxes: dict) -> list:
    """The pairs of `boxes` (a name: a Bbox in the figure's pixels) that overlap, and the
    names of those that leave the figure."""
    names = list(boxes)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    out = [a for a in names if not fig.bbox.contains(boxes[a].x0, boxes[a].y0)]
    out += [a for a in names if not fig.bbox.contains(boxes[a].x1, boxes[a].y1)]
    return [(a, b) for a, b in pairs if boxes[a].overlaps(boxes[b])] + out


def _letters(text: str) -> str:
    """`text` less its spaces and line breaks: a name wrapped (or broken in a word) or not."""
    return "".join(text.split())


@pytest.mark.parametrize("figure", ["roc", "pr"])
def test_a_long_class_name_stays_over_its_own_panel(tmp_path, drawn_figures, figure):
    """BloodMNIST's 67-character class name, in one line, ran over its neighbours' panel
    titles: each title is its name whole, in lines no wider than its panel, and no title
    overlaps another, nor a panel with its tick labels, nor leaves the figure."""
    from matplotlib.transforms import Bbox

    from chest_mnist import plots

    curves = [(np.array([0.0, 1.0]), np.array([0.0, 1.0]))] * len(BLOOD)
    values = [0.5] * len(BLOOD)
    if figure == "roc":
        plots.plot_roc_curves(curves, BLOOD, values, tmp_path / "roc.png")
    else:
        plots.plot_pr_curves(curves, BLOOD, values, values, tmp_path / "pr.png")
    (fig,) = drawn_figures
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    panels = [ax for ax in fig.axes if ax.axison]
    titles = [
        (
            _letters(ax.title.get_text().rsplit("\n", 1)[0]),  # the name, less the area
            ax.title.get_window_extent(renderer).width <= ax.get_window_extent().width,
        )
        for ax in panels
    ]
    assert titles == [(_letters(name), True) for name in BLOOD]
    boxes = {f"title {k}": ax.title.get_window_extent(renderer) for k, ax in enumerate(panels)}
    for k, ax in enumerate(panels):
        parts = [ax.get_window_extent(), ax.xaxis.get_tightbbox(renderer)]
        boxes[f"panel {k}"] = Bbox.union(parts + [ax.yaxis.get_tightbbox(renderer)])
    assert _overlapping(fig, boxes) == []


def test_a_long_class_name_stays_beside_its_own_row_of_heatmaps(tmp_path, drawn_figures):
    """The row label of BloodMNIST's 67-character class name, in one line, ran down three rows
    over the other labels: each row's label is its name whole, in lines no longer than its
    row's images are high, clear of the other labels and the images, inside the figure."""
    from chest_mnist.batches import SplitDataset
    from chest_mnist.report_heatmaps import write_heatmap_figure
    from tests.test_cam import bright_and_dark_model, quadrant_image

    class Data:  # what write_heatmap_figure reads of a MedMNISTDataModule
        hparams = type("H", (), {"mean": 0.5, "std": 0.5})
        splits = {"test": SplitDataset(torch.from_numpy(np.stack([quadrant_image()] * 4)), None)}

    labels = ["bright", BLOOD[3], "not_bright"]
    scores = torch.rand(4, 3, generator=torch.Generator().manual_seed(0))
    split = (scores, (scores > 0.5).int())
    report = build_report(split, split, labels, torch.full((3,), 0.5))
    write_heatmap_figure(bright_and_dark_model(), Data(), report, tmp_path, per_label=2)
    (fig,) = drawn_figures
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    rows = [ax for ax in fig.axes if ax.get_ylabel()]
    names = [
        (
            _letters(ax.get_ylabel()),
            ax.yaxis.label.get_window_extent(renderer).height <= ax.get_window_extent().height,
        )
        for ax in rows
    ]
    assert names == [(_letters(label), True) for label in labels]
    boxes = {f"row {k}": ax.yaxis.label.get_window_extent(renderer) for k, ax in enumerate(rows)}
    boxes |= {f"image {k}": ax.get_window_extent() for k, ax in enumerate(fig.axes)}
    assert _overlapping(fig, boxes) == []


def test_an_empty_heatmap_is_named_in_its_title(tmp_path, drawn_figures, monkeypatch):
    """Grad-CAM keeps only what raises a score: with no such region a map is all zeros, drawn
    as the bare image under a uniform tint. Such a cell's title says "map empty", and the
    figure's title what that means (a figure of four empty maps said nothing)."""
    import chest_mnist.report_heatmaps
    from chest_mnist.batches import SplitDataset
    from chest_mnist.report_heatmaps import heatmaps, write_heatmap_figure
    from tests.test_cam import bright_and_dark_model, quadrant_image

    class Data:  # what write_heatmap_figure reads of a MedMNISTDataModule
        hparams = type("H", (), {"mean": 0.5, "std": 0.5})
        splits = {"test": SplitDataset(torch.from_numpy(np.stack([quadrant_image()] * 4)), None)}

    def first_emptied(*args, **kwargs):
        maps = heatmaps(*args, **kwargs)
        maps[0] = 0
        return maps

    labels = ["bright", "not_bright"]
    scores = torch.rand(4, 2, generator=torch.Generator().manual_seed(0))
    split = (scores, (scores > 0.5).int())
    report = build_report(split, split, labels, torch.full((2,), 0.5))
    model = bright_and_dark_model()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_heatmap_figure(model, Data(), report, tmp_path / "a", per_label=2)
    monkeypatch.setattr(chest_mnist.report_heatmaps, "heatmaps", first_emptied)
    write_heatmap_figure(model, Data(), report, tmp_path / "b", per_label=2)
    drawn, emptied = drawn_figures
    meaning = "map empty: Grad-CAM found no region that raises the score"
    assert not any("map empty" in ax.get_title() for ax in drawn.axes)
    assert _letters(meaning) not in _letters(drawn._suptitle.get_text())  # wrapped: Grad-\nCAM
    titles = [ax.get_title() for ax in emptied.axes]
    assert titles[0].endswith(", map empty") and not any("empty" in t for t in titles[1:])
    assert _letters(meaning) in _letters(emptied._suptitle.get_text())


def test_the_reliability_figure_names_what_it_plots_and_each_ece(tmp_path, drawn_figures):
    """The y-axis is the share of positives of a sigmoid task but the top label's accuracy of
    a multi-class one; with temperature scaling the diagram draws the curves before and after,
    and the title gave one ECE (after) without saying which: it gives both, named."""
    from chest_mnist.calibration import scale, temperature_scaling
    from chest_mnist.report_figures import write_reliability
    from chest_mnist.task import MULTI_CLASS_TASK, MULTI_LABEL_TASK

    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(200, 3, generator=g)  # overconfident: a temperature above 1
    truth = {
        MULTI_LABEL_TASK: (torch.rand(200, 3, generator=g) < 0.3).int(),
        MULTI_CLASS_TASK: torch.randint(0, 3, (200, 1), generator=g),
    }
    ylabels, titles = {}, {}
    for task, targets in truth.items():
        scaling = temperature_scaling((logits, targets), (logits, targets), task, per_label=False)
        split = (task.scores(scale(logits, scaling.temperature)), targets)
        report = build_report(
            split, split, ["a", "b", "c"], torch.full((3,), 0.3), task=task, scaling=scaling
        )
        write_reliability(report, tmp_path / "reliability.png")
        fig = drawn_figures[-1]
        ylabels[task.name] = fig.axes[0].get_ylabel()
        before, after = report.scalars["ece_before"], report.scalars["ece"]  # 0.35, 0.19 (sigmoid)
        titles[task.name] = f"ECE {before:.4f} before scaling, {after:.4f} after;" in (
            fig._suptitle.get_text()
        )
    assert ylabels == {
        MULTI_LABEL_TASK.name: "share of positives in the bin",
        MULTI_CLASS_TASK.name: "accuracy of the top label in the bin",
    }
    assert titles == {MULTI_LABEL_TASK.name: True, MULTI_CLASS_TASK.name: True}


def compose_evaluate(overrides):
    return compose_train(overrides, config_name="evaluate")


@pytest.mark.slow
def test_evaluate_writes_the_same_complete_report(trained_run, tmp_path, synthetic_npz):
    cfg = compose_evaluate(
        [
            f"ckpt_path={trained_run}/checkpoints/last.ckpt",
            "trainer=cpu",
            "+trainer.enable_progress_bar=false",
            f"paths.output_dir={tmp_path}",
        ]
    )
    metrics = evaluate(cfg)
    written = check_report(tmp_path / "report", n_test=256)
    assert written["test/auroc"] == pytest.approx(metrics["test/auroc"])
    assert written["checkpoint"] == f"{trained_run}/checkpoints/last.ckpt"
    # last.ckpt of a 2-epoch run is not necessarily the best one: compare with a fresh evaluation of
    # the best checkpoint instead, which train's own report came from (ckpt_path=<run> names it)
    best = json.loads((trained_run / "report" / "metrics.json").read_text())["best_checkpoint"]
    again = evaluate(
        compose_evaluate(
            [
                f"ckpt_path={trained_run}",
                "trainer=cpu",
                "+trainer.enable_progress_bar=false",
                f"paths.output_dir={tmp_path}/best",
            ]
        )
    )
    assert (
        json.loads((tmp_path / "best" / "report" / "metrics.json").read_text())["checkpoint"]
        == best
    )
    trained = json.loads((trained_run / "report" / "metrics.json").read_text())
    for name in ("test/auroc", "test/acc", "test/f1_macro_tuned", "test/threshold/effusion"):
        assert again[name] == pytest.approx(trained[name], abs=1e-6), name

    # MedMNIST's own evaluator reads our result file and agrees with metrics.json
    root = tmp_path / "medmnist_root"
    root.mkdir()
    shutil.copy(synthetic_npz, root / "chestmnist.npz")
    (result,) = (tmp_path / "report").glob("chestmnist_test_*.csv")
    rows = np.loadtxt(result, delimiter=",")
    assert rows.shape == (256, 15) and (rows[:, 0] == np.arange(256)).all()
    auc, acc = Evaluator("chestmnist", "test", root=str(root)).evaluate(rows[:, 1:])
    assert auc == pytest.approx(written["test/auroc"], abs=1e-6)
    assert acc == pytest.approx(written["test/acc"], abs=1e-6)


@pytest.mark.slow
def test_evaluate_reads_each_split_once(trained_run, tmp_path, synthetic_npz, monkeypatch):
    """The test pass gives both the test metrics and the report's test half: the model sees the
    256 val and 256 test images once each, and the report's test scores are the model's own
    output, in the split's order."""
    from chest_mnist.model import MedMNISTClassifier

    seen = []
    forward = MedMNISTClassifier.forward

    def counted(self, x):
        if not torch.is_grad_enabled():  # predictions; heatmaps.png's Grad-CAM needs gradients
            seen.append(len(x))
        return forward(self, x)

    monkeypatch.setattr(MedMNISTClassifier, "forward", counted)
    metrics = evaluate(
        compose_evaluate(
            [
                f"ckpt_path={trained_run}/checkpoints/last.ckpt",
                "trainer=cpu",
                "+trainer.enable_progress_bar=false",
                f"paths.output_dir={tmp_path}",
            ]
        )
    )
    assert sum(seen) == 256 + 256
    # the test half of the report, in the split's order, is the model's own output
    saved = np.load(tmp_path / "report" / "predictions.npz")
    checkpoint = load_checkpoint(trained_run / "checkpoints" / "last.ckpt")
    model = model_from_checkpoint(checkpoint).eval()
    data = checkpoint["datamodule_hyper_parameters"]
    with np.load(synthetic_npz) as npz:
        images, labels = torch.from_numpy(npz["test_images"]), npz["test_labels"]
    with torch.no_grad():
        expected = model.probabilities(to_model_input(images, data["mean"], data["std"]))
    np.testing.assert_allclose(saved["scores"], expected.numpy(), atol=1e-6)
    assert (saved["labels"] == labels).all()
    assert metrics["test/n_images"] == 256


def test_from_checkpoint_lists_every_key_of_the_data_module():
    """data/from_checkpoint.yaml names each MedMNISTDataModule argument once, so that each one
    can be given on evaluate's command line (data.root=DIR)."""
    import inspect

    import yaml

    from chest_mnist.data import MedMNISTDataModule
    from tests.conftest import CONF

    keys = yaml.safe_load((CONF / "data" / "from_checkpoint.yaml").read_text())
    parameters = list(inspect.signature(MedMNISTDataModule).parameters)
    assert list(keys) == parameters and set(keys.values()) == {"???"}


def test_evaluate_never_makes_up_the_checkpoints_synthetic_data(tmp_path):
    """A run on synthetic data saved how its config generates a missing file; evaluated with a
    data.path that is not there (mistyped, moved), evaluate refuses, naming it, and writes no
    new data to report on. Asked for (data.synthetic given), it generates."""
    from chest_mnist.data import MedMNISTDataModule
    from chest_mnist.evaluate import datamodule_for

    recipe = {"n_train": 64, "n_val": 32, "n_test": 32, "seed": 0}
    saved = dict(MedMNISTDataModule(path="trained_on.npz", synthetic=recipe).hparams)
    gone = tmp_path / "typo.npz"
    data = compose_train(["ckpt_path=x", f"data.path={gone}"], config_name="evaluate").data
    with pytest.raises(UserError, match=f"data.path={gone} does not exist"):
        datamodule_for(data, saved).prepare_data()
    assert not gone.exists()
    data = compose_train(
        ["ckpt_path=x", f"data.path={gone}", f"data.synthetic={recipe}".replace("'", "")],
        config_name="evaluate",
    ).data
    datamodule_for(data, saved).prepare_data()
    assert gone.exists()


@pytest.mark.slow
def test_evaluating_at_another_size_than_trained_says_so(trained_run, tmp_path, caplog):
    from chest_mnist.synthetic import write_synthetic

    larger = write_synthetic(tmp_path / "s64.npz", n_train=32, n_val=32, n_test=32, size=64, seed=0)
    overrides = [f"data.path={larger}", "data.size=64", "data.subset=null", "trainer=cpu"]
    overrides.append("figures=false")
    with caplog.at_level("WARNING", logger="chest_mnist.evaluate"):
        evaluate(
            compose_evaluate(
                [f"ckpt_path={trained_run}", *overrides, f"paths.output_dir={tmp_path}/out"]
            )
        )
    assert "trained on 28px images and is evaluated on 64px (data.size=64)" in caplog.text


@pytest.mark.slow
def test_evaluate_replaces_single_keys_of_the_checkpoints_data(
    trained_run, tmp_path, synthetic_npz
):
    """The data moved: data.root=DIR (and any other key) replaces the checkpoint's value, the
    rest stays as saved. Here a checkpoint that read the official file from a folder that is
    gone, evaluated with the file in another folder."""
    checkpoint = load_checkpoint(trained_run / "checkpoints" / "last.ckpt")
    checkpoint["datamodule_hyper_parameters"] |= {"path": None, "root": "/gone", "subset": 100}
    moved = tmp_path / "run" / "checkpoints" / "last.ckpt"
    moved.parent.mkdir(parents=True)
    torch.save(checkpoint, moved)
    root = tmp_path / "medmnist"
    root.mkdir()
    shutil.copy(synthetic_npz, root / "chestmnist.npz")

    with pytest.raises(UserError, match="data.root=/gone does not exist"):
        evaluate(
            compose_evaluate(
                [f"ckpt_path={moved}", "trainer=cpu", f"paths.output_dir={tmp_path}/a"]
            )
        )
    overrides = [f"data.root={root}", "data.verify_md5=false", "data.eval_batch_size=64"]
    overrides.append("figures=false")
    metrics = evaluate(
        compose_evaluate(
            [f"ckpt_path={moved}", "trainer=cpu", f"paths.output_dir={tmp_path}/b", *overrides]
        )
    )
    assert metrics["test/n_images"] == 100  # data.subset as saved
    metrics = evaluate(
        compose_evaluate(
            [f"ckpt_path={moved}", "trainer=cpu", f"paths.output_dir={tmp_path}/c", *overrides]
            + ["data.subset=null"]  # given as null: all images, not the saved 100
        )
    )
    assert metrics["test/n_images"] == 256


def test_training_on_the_checkpoint_data_placeholder_is_refused(tiny_overrides):
    from chest_mnist.config_checks import check_config

    cfg = compose_train(tiny_overrides + ["data=from_checkpoint"])
    with pytest.raises(UserError, match="data=from_checkpoint is for evaluate"):
        check_config(cfg)


@pytest.mark.slow
def test_lightning_trainer_test_gives_the_reports_numbers(trained_run, tmp_path):
    """trainer.test still works for who calls it, and agrees with the report (which is made
    from one predict pass instead)."""
    import lightning as L

    best = resolve_checkpoint(trained_run)
    metrics = evaluate(
        compose_evaluate(
            [f"ckpt_path={best}", "trainer=cpu", "figures=false", f"paths.output_dir={tmp_path}"]
        )
    )
    checkpoint = load_checkpoint(best)
    from chest_mnist.data import MedMNISTDataModule

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    (logged,) = trainer.test(
        model_from_checkpoint(checkpoint),
        datamodule=MedMNISTDataModule(**checkpoint["datamodule_hyper_parameters"]),
        verbose=False,
    )
    for name in ("test/auroc", "test/acc", "test/loss", "test/f1_macro"):
        assert logged[name] == pytest.approx(metrics[name], abs=1e-5), name


def test_thresholds_that_cannot_be_tuned_are_named_in_the_report(tmp_path):
    from chest_mnist.report import write_report

    val, test = _predictions(300, seed=3), _predictions(300, seed=4)
    val[0][:, 1] = 0.25  # a model that gives every image the same score for cardiomegaly
    val[1][:, 13] = 0  # no hernia in validation
    report = build_report(val, test, LABELS, val[1].float().mean(0))
    write_report(tmp_path, report, "chestmnist", 28)
    text = (tmp_path / "report.md").read_text()
    assert "**Kept at 0.5:** cardiomegaly: every validation score is 0.25: nothing to rank" in text
    assert "**Kept at 0.5:** hernia: no positives in validation" in text
    saved = json.loads((tmp_path / "thresholds.json").read_text())
    assert saved["labels"]["cardiomegaly"] == saved["labels"]["hernia"] == 0.5
    assert set(saved["kept_at_default"]) == {"cardiomegaly", "hernia"}


@pytest.mark.slow
def test_evaluate_without_logs_still_writes_the_rest(trained_run, tmp_path):
    run = tmp_path / "moved_run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(trained_run / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt")
    evaluate(
        compose_evaluate(
            [
                f"ckpt_path={run}/checkpoints/last.ckpt",
                "trainer=cpu",
                "+trainer.enable_progress_bar=false",
                f"paths.output_dir={tmp_path}/out",
            ]
        )
    )
    report = tmp_path / "out" / "report"
    check_report(report, n_test=256, loss_curves=False)
    assert len(list(report.glob("chestmnist_test_*@moved_run.csv"))) == 1  # the run's name
    assert not (report / "loss_curves.png").exists()
    assert (
        f"loss curves: not drawn ({run}/tensorboard does not exist; "
        f"{run}/csv/metrics.csv does not exist)" in (report / "report.md").read_text()
    )


@pytest.mark.slow
def test_evaluate_on_another_task_is_refused(trained_run, tmp_path):
    from tests.conftest import PNEUMONIA_NPZ

    cfg = compose_evaluate(
        [
            f"ckpt_path={trained_run}/checkpoints/last.ckpt",
            "data=chestmnist",
            "data.flag=pneumoniamnist",
            f"data.path={PNEUMONIA_NPZ}",
            "trainer=cpu",
            f"paths.output_dir={tmp_path}",
        ]
    )
    with pytest.raises(
        UserError,
        match=r"The model predicts 14 labels .* but data.flag=pneumoniamnist has 1 \(pneumonia\)",
    ):
        evaluate(cfg)


def test_a_run_directory_means_its_best_checkpoint(trained_run, tmp_path):
    """ckpt_path=<run> or <run>/checkpoints: the checkpoint the run's report names (found by
    name, so a moved run still works), else the one epochNNN-*.ckpt; else a clear refusal."""
    best = Path(
        json.loads((trained_run / "report" / "metrics.json").read_text())["best_checkpoint"]
    )
    assert best.name.startswith("epoch") and best.parent == trained_run / "checkpoints"
    for given in (trained_run, trained_run / "checkpoints"):
        assert resolve_checkpoint(given) == best
    moved = tmp_path / "moved"
    shutil.copytree(trained_run / "checkpoints", moved / "checkpoints")  # no report: by its name
    assert resolve_checkpoint(moved) == moved / "checkpoints" / best.name
    assert (
        resolve_checkpoint(moved / "checkpoints" / "last.ckpt")
        == moved / "checkpoints" / "last.ckpt"
    )
    (moved / "checkpoints" / best.name).unlink()
    with pytest.raises(UserError) as error:
        resolve_checkpoint(moved)
    assert f"{moved / 'checkpoints'} does not hold one best checkpoint (found: last.ckpt)" in str(
        error.value
    )


def test_missing_checkpoint(tmp_path):
    with pytest.raises(UserError, match=f"ckpt_path={tmp_path / 'nope.ckpt'} does not exist"):
        load_checkpoint(tmp_path / "nope.ckpt")


def test_checkpoint_that_is_not_one(tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_text("hello")
    with pytest.raises(UserError, match="is not a readable PyTorch checkpoint"):
        load_checkpoint(path)


@pytest.mark.slow
def test_truncated_checkpoint(trained_run, tmp_path):
    path = tmp_path / "cut.ckpt"
    path.write_bytes((trained_run / "checkpoints" / "last.ckpt").read_bytes()[:100_000])
    with pytest.raises(
        UserError, match="is not a readable PyTorch checkpoint; it may be truncated"
    ):
        load_checkpoint(path)


def test_checkpoint_of_something_else(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(UserError, match="is not a chest_mnist checkpoint .*state_dict"):
        load_checkpoint(path)


def _checkpoint_of(model: MedMNISTClassifier) -> dict:
    """What train's checkpoints hold of `model`, for model_from_checkpoint."""
    return {"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}


def test_a_model_trained_from_imagenet_weights_is_rebuilt_offline(monkeypatch):
    """model.pretrained=true chose the initial weights only: evaluate and predict rebuild the
    network without downloading them, then take the checkpoint's."""
    import torchvision.models._api as torchvision_api

    def offline(url, *args, **kwargs):
        raise OSError(f"no network for {url}")

    monkeypatch.setattr(torchvision_api, "load_state_dict_from_url", offline)
    torch.manual_seed(0)
    trained = MedMNISTClassifier(labels=["a", "b"], stem="imagenet")
    checkpoint = _checkpoint_of(trained)
    checkpoint["hyper_parameters"]["pretrained"] = True
    model = model_from_checkpoint(checkpoint)
    assert model.state_dict().keys() == trained.state_dict().keys()
    for name, value in trained.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


@pytest.mark.parametrize("change", ["argument", "weights"])
def test_a_checkpoint_of_another_model_is_named(change):
    checkpoint = _checkpoint_of(MedMNISTClassifier(labels=["a", "b"], stem="imagenet"))
    if change == "argument":  # another project's, or a later version's, hyperparameters
        checkpoint["hyper_parameters"]["dropout"] = 0.5
        said = "settings this model does not have: dropout"
    else:  # three labels' weights for a two-label model
        checkpoint["state_dict"]["head.weight"] = torch.zeros(3, 512)
        said = "size mismatch for head.weight"
    with pytest.raises(UserError, match="ckpt_path=old.ckpt is not a checkpoint of this") as error:
        model_from_checkpoint(checkpoint, "old.ckpt")
    assert said in str(error.value)


class Payload:
    """Unpickling this would run code: a weights_only load must refuse it."""

    def __reduce__(self):
        return (shutil.rmtree, ("/nonexistent-chest-mnist-test",))


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save(
        {"state_dict": {}, "hyper_parameters": Payload(), "datamodule_hyper_parameters": {}}, path
    )
    with pytest.raises(UserError, match="refused so that a checkpoint cannot run code"):
        load_checkpoint(path)


def test_cli_without_ckpt_path(tmp_path):
    from tests.conftest import run_here

    result = run_here("chest_mnist.evaluate", f"paths.log_dir={tmp_path}")
    assert result.returncode == 2 and "error: ckpt_path is missing" in result.stderr


@pytest.mark.parametrize("start", [".", "notebooks"])
def test_the_notebook_finds_the_repository_wherever_jupyter_started(start, monkeypatch):
    """The notebook's ROOT line (where it writes data and looks for runs), run in the
    repository and in notebooks/ (Jupyter's default when the notebook is opened there)."""
    import nbformat

    from tests.conftest import ROOT

    notebook = nbformat.read(ROOT / "notebooks" / "explore.ipynb", as_version=4)
    (line,) = [
        line
        for cell in notebook.cells
        if cell.cell_type == "code"
        for line in cell.source.splitlines()
        if line.startswith("ROOT =")
    ]
    monkeypatch.chdir(ROOT / start)
    found = {"Path": Path}
    exec(line, found)
    assert found["ROOT"] == ROOT


def _multiclass_run(folder: Path) -> tuple[Path, Path]:
    """A BloodMNIST-format file (8 classes, RGB, neutrophil the most frequent) and the report/
    of a tiny run on it, as evaluate writes it: every figure, heatmaps.png included."""
    from chest_mnist.train import train
    from tests.conftest import tiny_training_overrides

    rng = np.random.default_rng(0)
    shares = np.array([1, 1, 1, 1, 1, 1, 3, 1]) / 10
    arrays = {}
    for split, n in (("train", 160), ("val", 64), ("test", 96)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.choice(8, (n, 1), p=shares).astype(np.uint8)
    npz = folder / "blood.npz"
    np.savez(npz, **arrays)
    train(compose_train(tiny_training_overrides(npz, folder) + ["data.flag=bloodmnist"]))
    evaluate(
        compose_evaluate(
            [
                f"ckpt_path={folder}",
                "trainer=cpu",
                "+trainer.enable_progress_bar=false",
                f"paths.output_dir={folder}/evaluate",
            ]
        )
    )
    return npz, folder / "evaluate" / "report"


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["chestmnist", "pneumoniamnist", "bloodmnist"])
def test_notebook_runs_top_to_bottom(request, tmp_path, flag, monkeypatch):
    """Each kind of task: multi-label and binary files with a ChestMNIST run's report, and a
    multi-class file with its own run's report, which has no all-negative ACC and no tuned
    thresholds. A multi-class task's class shares sum to 1 and its constant baseline is the
    class most frequent in training; the report's baseline is its acc_majority; every figure
    in the report's folder is shown."""
    import base64
    import re

    import nbformat
    from nbclient import NotebookClient

    from tests.conftest import PNEUMONIA_NPZ, ROOT

    if flag == "bloodmnist":
        npz, report = _multiclass_run(tmp_path)
    else:
        npz = request.getfixturevalue("synthetic_npz") if flag == "chestmnist" else PNEUMONIA_NPZ
        report = request.getfixturevalue("trained_run") / "report"
    monkeypatch.setenv("CHEST_MNIST_FLAG", flag)
    monkeypatch.setenv("CHEST_MNIST_NPZ", str(npz))
    monkeypatch.setenv("CHEST_MNIST_REPORT", str(report))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(ROOT / "notebooks" / "explore.ipynb", as_version=4)
    NotebookClient(
        notebook,
        timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT / "notebooks")}},
    ).execute()
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    outputs = "".join(o.get("text", "") for cell in code for o in cell.outputs)
    assert "Traceback" not in outputs
    with np.load(npz) as arrays:
        labels = {split: arrays[f"{split}_labels"] for split in ("train", "val", "test")}
    metrics = json.loads((report / "metrics.json").read_text())
    printed = dict(re.findall(r"^(test/\S+) +(\S+)$", outputs, re.MULTILINE))
    assert printed["test/acc_majority"] == f"{metrics['test/acc_majority']:.4f}"
    if flag == "bloodmnist":
        lines = outputs.splitlines()
        at = [line.split() for line in lines].index(["class", "train", "val", "test"])
        rows = [line.rsplit(maxsplit=3)[1:] for line in lines[at + 1 : at + 9]]  # (class, split)
        counted = [np.bincount(y[:, 0], minlength=8) / len(y) for y in labels.values()]
        assert rows == [[f"{share:.4f}" for share in row] for row in np.stack(counted, axis=1)]
        shares = np.array(rows, dtype=float)
        assert shares.sum(0) == pytest.approx([1, 1, 1], abs=5e-4)  # 8 shares, each to 4 places
        majority = (labels["test"][:, 0] == np.bincount(labels["train"][:, 0]).argmax()).mean()
        assert f"majority-class ACC on test: {majority:.4f}" in outputs
        assert printed["test/acc_majority"] == f"{majority:.4f}"  # chosen on train, as here
        assert "all-negative" not in outputs
        assert "test/acc_all_negative" not in printed and "test/f1_macro_tuned" not in printed
    else:
        assert f"all-negative ACC on test: {(labels['test'] == 0).mean():.4f}" in outputs
        assert "majority-class" not in outputs
        assert "test/acc_all_negative" in printed and "test/f1_macro_tuned" in printed
    figures = {path.name: path.read_bytes() for path in report.glob("*.png")}
    assert {"reliability.png", "heatmaps.png"} <= figures.keys()  # the notebook once left out
    names = {image: name for name, image in figures.items()}
    shown = [
        names.get(base64.b64decode(o.data["image/png"]), "an image from elsewhere")
        for o in code[-1].outputs
        if "image/png" in o.get("data", {})
    ]
    assert sorted(shown) == sorted(figures)
