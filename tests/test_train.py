"""train() through the real Hydra config, and the command line."""

import csv
import json
import logging
import math
import subprocess
import sys

import numpy as np
import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from matplotlib.image import imread
from medmnist import INFO
from omegaconf import OmegaConf

from chest_mnist import UserError
from chest_mnist.train import train
from tests.conftest import compose_train, run_here, run_module, tiny_training_overrides

LABELS = [INFO["chestmnist"]["label"][str(i)] for i in range(14)]


REPORT_FILES = (
    "metrics.json",
    "per_class.csv",
    "thresholds.json",
    "predictions.npz",
    "report.md",
    "loss_curves.png",
    "confusion_matrices.png",
    "roc_curves.png",
    "pr_curves.png",
    "reliability.png",
    "heatmaps.png",
)


def check_report(report_dir, n_test, loss_curves=True):
    """Every file of report/ exists and is well formed."""
    metrics = json.loads((report_dir / "metrics.json").read_text())
    for key in (
        "test/auroc",
        "test/acc",
        "test/f1_macro",
        "test/f1_micro",
        "test/precision_micro",
        "test/recall_macro",
        "test/ap_macro",
        "test/acc_all_negative",
        "test/f1_macro_tuned",
        "test/recall_micro_tuned",
        "test/auroc/hernia",
        "test/threshold/hernia",
        "test/auroc_low",
        "test/auroc_high",
        "test/acc_tuned_low",
        "test/ece",
        "test/ece/hernia",
        "test/ap_high/effusion",
    ):
        assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), key
    assert 0.0 <= metrics["test/auroc"] <= 1.0 and metrics["test/n_images"] == n_test

    with open(report_dir / "per_class.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["label"] for row in rows] == LABELS
    for row in rows:
        values = {k: float(v) for k, v in row.items() if k != "label"}
        assert all(math.isfinite(v) for v in values.values())
        assert values["tn"] + values["fp"] + values["fn"] + values["tp"] == n_test
        assert values["support"] == values["tp"] + values["fn"]
        assert values["f1_tuned"] == pytest.approx(
            2 * values["tp"] / max(2 * values["tp"] + values["fp"] + values["fn"], 1)
        )
        assert metrics[f"test/auroc/{row['label']}"] == pytest.approx(values["auroc"])
        assert 0 < values["prevalence_train"] < 1

    thresholds = json.loads((report_dir / "thresholds.json").read_text())
    assert thresholds["chosen_on"] == "val" and list(thresholds["labels"]) == LABELS
    predictions = np.load(report_dir / "predictions.npz")
    assert predictions["scores"].shape == (n_test, 14) and predictions["labels"].shape == (
        n_test,
        14,
    )
    assert ((predictions["scores"] >= 0) & (predictions["scores"] <= 1)).all()
    assert list(predictions["label_names"]) == LABELS
    (result,) = report_dir.glob("chestmnist_test_[[]AUC[]]*_[[]ACC[]]*@*.csv")
    assert f"[AUC]{metrics['test/auroc']:.3f}_[ACC]{metrics['test/acc']:.3f}" in result.name

    summary = (report_dir / "report.md").read_text()
    assert f"{metrics['test/acc_all_negative']:.4f}" in summary and "## Per label" in summary
    assert all(f"| {label} |" in summary for label in LABELS)
    figures = {
        "confusion_matrices.png": (800, 1200),
        "roc_curves.png": (800, 1200),
        "pr_curves.png": (800, 1200),
        "reliability.png": (400, 1000),
        "heatmaps.png": (14 * 150, 400),
    }
    if loss_curves:
        figures["loss_curves.png"] = (400, 600)
    for name, min_size in figures.items():
        image = imread(report_dir / name)
        assert image.shape[0] >= min_size[0] and image.shape[1] >= min_size[1], name
        assert image.std() > 0.01, f"{name} is blank"
        assert f"]({name})" in summary
    return metrics


@pytest.mark.slow
def test_fit_test_and_report(tiny_overrides, tmp_path):
    metrics = train(compose_train(tiny_overrides + ["figures=true"]))
    assert {"train/loss", "val/loss", "val/auroc", "test/auroc"} <= set(metrics)
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints and any(
        name.startswith("epoch000-val_auroc") for name in checkpoints
    )
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    reported = check_report(tmp_path / "report", n_test=256)
    assert reported["test/auroc"] == pytest.approx(metrics["test/auroc"])


def test_without_figures_the_report_keeps_its_numbers_and_says_so(cfg_tiny, tmp_path):
    """figures=false (the tests' tiny runs): no PNG at all, heatmaps.png included, none in
    TensorBoard, and report.md says why; every number is still written. An earlier report's
    figures in the same folder (a resumed run's) are removed, not left to show other weights."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert cfg_tiny.figures is False
    report = tmp_path / "report"
    report.mkdir()
    for earlier in ("roc_curves.png", "heatmaps.png", "loss_curves.png"):
        (report / earlier).write_bytes(b"an earlier report's figure")
    metrics = train(cfg_tiny)
    assert not list(report.glob("*.png"))
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert events.Tags()["images"] == [] and "test/auroc" in events.Tags()["scalars"]
    assert "## Figures\n\n- none drawn (figures=false)\n" in (report / "report.md").read_text()
    written = json.loads((report / "metrics.json").read_text())
    assert written["test/auroc"] == pytest.approx(metrics["test/auroc"])
    for name in REPORT_FILES:
        assert name.endswith(".png") or (report / name).stat().st_size > 50, name


def test_metrics_json_names_the_metric_the_best_checkpoint_was_chosen_by(tiny_overrides, tmp_path):
    """With the checkpoint chosen by val/loss (lowest), metrics.json says so and keeps that
    metric's best: the lowest val/loss of the epochs, as TensorBoard logged them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from chest_mnist import run_files

    cfg = compose_train(
        tiny_overrides
        + [
            "trainer.max_epochs=3",
            "callbacks.model_checkpoint.monitor=val/loss",
            "callbacks.model_checkpoint.mode=min",
        ]
    )
    train(cfg)
    written = run_files.read_metrics(tmp_path)
    losses = [
        e.value
        for e in EventAccumulator(str(tmp_path / "tensorboard")).Reload().Scalars("val/loss")
    ]
    assert len(losses) == 3
    assert run_files.best_score(written) == ("val/loss", pytest.approx(min(losses)))
    assert "best_val/auroc" not in written


def test_without_a_checkpoint_callback_the_end_of_training_is_tested(tiny_overrides, tmp_path):
    """No model_checkpoint (nor last.ckpt): no best checkpoint, so the report is of the weights
    at the end of training, and metrics.json names no metric a checkpoint was chosen by."""
    from chest_mnist import run_files

    cfg = compose_train(
        tiny_overrides
        + [
            "~callbacks.model_checkpoint",
            "~callbacks.last_checkpoint",
            "+trainer.enable_checkpointing=false",
        ]
    )
    metrics = train(cfg)
    written = run_files.read_metrics(tmp_path)
    assert written[run_files.BEST_CHECKPOINT] is None and written[run_files.CHECKPOINT] is None
    assert written[run_files.CHOSEN_BY] is None and 0 <= metrics["test/auroc"] <= 1
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_learning_happens(tiny_overrides, tmp_path):
    """A short run (64 steps on 1,000 images) reaches a val AUROC that guessing (0.5) and a
    broken pipeline cannot."""
    cfg = compose_train(
        tiny_overrides
        + [
            "trainer.max_epochs=4",
            "trainer.limit_train_batches=1.0",
            "data.batch_size=64",
            "data.path=" + str(tmp_path / "learn.npz"),
            "+data.synthetic={n_train: 1000, n_val: 500, n_test: 500, seed: 1}",
        ]
    )
    metrics = train(cfg)
    assert metrics["val/auroc"] > 0.85
    assert metrics["test/auroc"] > 0.85
    assert metrics["train/loss"] < 0.2


def test_unknown_config_key_is_refused():
    with pytest.raises(ConfigCompositionException, match="Could not override 'data.colour'"):
        compose_train(["data.colour=red"])


@pytest.mark.slow
def test_cli_writes_the_full_run_directory(tmp_path, synthetic_npz):
    """The README's offline command, with the default cifar stem, 2 epochs. Its console carries
    what a user watches: no Lightning advertisement, no deprecation from inside Lightning, no
    note on how the last checkpoint was saved (which read as if checkpoints were loaded
    unsafely), and a model summary whose FLOPs are counted (they were all 0 without an example
    input)."""
    result = run_module(
        "chest_mnist.train",
        "data=synthetic",
        f"data.path={synthetic_npz}",
        "data.subset=128",
        "data.batch_size=64",
        "trainer.max_epochs=2",
        f"paths.log_dir={tmp_path}",
    )
    console = result.stdout + result.stderr
    assert result.returncode == 0, console[-3000:]
    quiet = ("litlogger", "LeafSpec", "Trainer already configured", "Total FLOPs: 0")
    for chatter in (*quiet, "`weights_only` was not set"):
        assert chatter not in console, chatter
    assert "Total FLOPs: 913 M" in console  # ResNet-18, cifar stem, one 28px image
    assert "Test AUC" in console and "report.md" in console
    (run,) = list((tmp_path / "train" / "runs").iterdir())
    assert (run / ".hydra" / "config.yaml").exists() and (
        run / ".hydra" / "overrides.yaml"
    ).exists()
    assert (run / "checkpoints" / "last.ckpt").exists()
    metrics = check_report(run / "report", n_test=128)
    assert len(list((run / "report").glob(f"chestmnist_test_*@{run.name}.csv"))) == 1
    assert metrics["epochs_trained"] == 2 and metrics["best_checkpoint"].startswith(
        str(run / "checkpoints")
    )
    best = metrics["best_val/auroc"]  # named after the metric the checkpoint was chosen by
    assert 0 < best <= 1 and f"val_auroc{best:.4f}" in metrics["best_checkpoint"]

    from chest_mnist.loggers import read_loss_curves

    curves = read_loss_curves(run / "tensorboard")
    assert curves["train/loss"][0] == [0, 1] and curves["val/loss"][0] == [0, 1]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set(EventAccumulator(str(run / "tensorboard")).Reload().Tags()["scalars"])
    assert {
        "val/auroc",
        "val/acc",
        "val/f1_macro",
        "test/auroc",
        "test/auroc/hernia",
        "test/f1_tuned/effusion",
        "lr-Adam",
    } <= tags

    # the report's figures and a precision-recall curve per label, in TensorBoard too
    from PIL import Image
    from tensorboard.util import tensor_util

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    figures = sorted(p.stem for p in (run / "report").glob("*.png"))
    assert len(figures) == 6 and {f"report/{f}" for f in figures} == set(events.Tags()["images"])
    shown = events.Images("report/roc_curves")[-1]
    with Image.open(run / "report" / "roc_curves.png") as png:
        assert (shown.width, shown.height) == png.size
    assert {f"test/pr_curve/{label}" for label in LABELS} <= set(events.Tags()["tensors"])
    saved = np.load(run / "report" / "predictions.npz")
    for k in (LABELS.index("effusion"), LABELS.index("hernia")):
        (event,) = events.Tensors(f"test/pr_curve/{LABELS[k]}")
        tp, fp, tn, fn, precision, recall = tensor_util.make_ndarray(event.tensor_proto)
        positives = int(saved["labels"][:, k].sum())
        assert (tp + fn == positives).all() and (tp + fp + tn + fn == 128).all()
        predicted = int((saved["scores"][:, k] >= 0.5).sum())  # TensorBoard counts score >= t
        assert tp[63] + fp[63] == predicted  # threshold 63 of 127 is 0.5

    # the HPARAMS tab: the config by its Hydra keys beside the metrics, whose values are the
    # run's own scalars (none logged for them at step 0)
    from tensorboard.plugins.hparams import metadata

    from chest_mnist.loggers import HPARAMS_METRICS

    content = events.PluginTagToContent("hparams")
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    assert [m.name.tag for m in experiment.metric_infos] == list(HPARAMS_METRICS)
    shown_first = {info.name for info in experiment.hparam_infos if info.differs}
    assert shown_first == {
        "data.path",
        "data.subset",
        "data.batch_size",
        "trainer.max_epochs",
        "paths.log_dir",
    }
    row = metadata.parse_session_start_info_plugin_data(
        content[metadata.SESSION_START_INFO_TAG]
    ).hparams
    assert row["model.optimizer.lr"].number_value == 1e-3
    assert row["data.path"].string_value == str(synthetic_npz)
    assert row["data.augment"].string_value == "false"
    assert row["model.scheduler.milestones"].string_value == "[1, 1]"
    assert [e.step for e in events.Scalars("val/auroc")] == [1, 3]


@pytest.mark.slow
def test_cli_without_network_fails_fast_with_the_message(tmp_path):
    # a proxy that refuses: offline even where the machine has a network. A process of its own:
    # urllib reads the proxies once per process
    result = run_module(
        "chest_mnist.train",
        f"data.root={tmp_path}",
        f"paths.log_dir={tmp_path}",
        env={"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"},
        timeout=120,
    )
    assert result.returncode == 2
    assert "error: Could not download chestmnist.npz" in result.stderr
    assert INFO["chestmnist"]["MD5"] in result.stderr and "data=synthetic" in result.stderr
    assert "Traceback" not in result.stderr
    (log,) = (tmp_path / "train" / "runs").glob("*/train.log")  # the run's log says why it stopped
    assert "[ERROR] - error: Could not download chestmnist.npz (" in log.read_text()


def test_cli_bad_size_names_the_key(tmp_path):
    result = run_here("chest_mnist.train", "data.size=100", f"paths.log_dir={tmp_path}")
    assert result.returncode == 2
    assert (
        "error: data.size=100 is not a MedMNIST size" in result.stderr
        and "Traceback" not in result.stderr
    )


def test_cli_unknown_key(tmp_path):
    result = run_here("chest_mnist.train", "data.colour=red", f"paths.log_dir={tmp_path}")
    assert result.returncode != 0 and "Could not override 'data.colour'" in result.stderr


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:No positive samples in targets")  # rare labels, 128 images
def test_training_from_memory_mapped_data(tmp_path, synthetic_npz):
    npz = tmp_path / "chest.npz"
    npz.write_bytes(synthetic_npz.read_bytes())
    overrides = tiny_training_overrides(npz, tmp_path) + ["data.mmap=true", "data.subset=128"]
    metrics = train(compose_train(overrides))
    assert (tmp_path / "chest_npy" / "train_images.npy").exists()
    assert math.isfinite(metrics["test/auroc"]) and metrics["test/n_images"] == 128


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stop", "groups", "steps"),
    [
        (["trainer.max_epochs=2"], [], 6),
        (["trainer.max_epochs=3", "+trainer.max_steps=4"], [], 4),
        # no improvement can beat 1.0: the second epoch stops the run (should_stop)
        (
            [
                "trainer.max_epochs=5",
                "callbacks.early_stopping.patience=0",
                "callbacks.early_stopping.min_delta=1.0",
            ],
            ["early_stopping"],
            6,
        ),
    ],
    ids=["max_epochs", "max_steps", "early_stopping"],
)
def test_ema_last_checkpoint_resumes_from_the_raw_weights(
    tmp_path, synthetic_npz, stop, groups, steps
):
    """The end's last.ckpt of callbacks=ema holds the training (raw) weights to resume from, as
    the same run without EMA ends with them, and the average apart. Saved at on_train_end it
    would hold the average twice: Lightning runs checkpoint callbacks after EMA's, which copies
    the average into the model there. No epoch-end save here (min_interval_s 3600); 3 steps an
    epoch, 2 epochs, a stop by max_steps inside the second of 3, or early stopping after 2."""
    import torch

    from chest_mnist.checkpoints import load_checkpoint

    def run(name: str, callbacks: str, *extra: str) -> dict:
        overrides = tiny_training_overrides(synthetic_npz, tmp_path / name, min_interval_s=3600)
        chosen = f"callbacks=[{','.join([callbacks, *groups])}]"
        common = ["trainer.deterministic=true", "test=false", chosen, *stop]
        train(compose_train(overrides + common + list(extra)))
        return load_checkpoint(tmp_path / name / "checkpoints" / "last.ckpt")

    plain = run("plain", "default")
    ema = run("ema", "ema", "callbacks.ema.update_starting_at_step=1")
    assert ema["global_step"] == plain["global_step"] == steps
    assert ema["current_model_state"].keys() == plain["state_dict"].keys()
    for name, value in plain["state_dict"].items():
        assert torch.equal(ema["current_model_state"][name], value), name
    name = "backbone.layer1.0.conv1.weight"
    assert not torch.equal(ema["state_dict"][name], ema["current_model_state"][name])


@pytest.mark.slow
def test_a_run_averaged_by_ema_resumed_without_it_goes_on_from_the_raw_weights(
    tmp_path, synthetic_npz, caplog
):
    """Resumed without callbacks.ema, a run goes on from its raw weights (the ones its optimizer
    state belongs to), not from the average its checkpoint holds as the weights: it ends with
    the weights of the same run trained without EMA and resumed alike. It once went on from the
    average, with nothing but Lightning's generic warning about a callback's state."""
    import torch

    from chest_mnist.checkpoints import load_checkpoint

    def run(name: str, callbacks: str, *extra: str) -> dict:
        overrides = tiny_training_overrides(synthetic_npz, tmp_path / name)
        common = ["trainer.deterministic=true", "test=false", f"callbacks=[{callbacks}]"]
        train(compose_train(overrides + common + list(extra)))
        return load_checkpoint(tmp_path / name / "checkpoints" / "last.ckpt")

    run("plain", "default")
    averaged = run("ema", "ema", "callbacks.ema.update_starting_at_step=1")
    name = "backbone.layer1.0.conv1.weight"
    assert not torch.equal(averaged["state_dict"][name], averaged["current_model_state"][name])
    caplog.set_level(logging.WARNING, logger="chest_mnist.model")
    ends = [
        run(
            folder,
            "default",
            "trainer.max_epochs=2",
            f"ckpt_path={tmp_path / folder}/checkpoints/last.ckpt",
        )
        for folder in ("plain", "ema")
    ]
    assert ends[0]["global_step"] == ends[1]["global_step"] == 6
    assert "current_model_state" not in ends[1]
    for key, value in ends[0]["state_dict"].items():
        assert torch.equal(ends[1]["state_dict"][key], value), key
    warned = [r.getMessage() for r in caplog.records if "averaged its weights" in r.getMessage()]
    assert len(warned) == 1 and str(tmp_path / "ema") in warned[0]


def test_only_a_fit_without_weight_averaging_takes_the_raw_weights():
    """The raw weights replace the average only to go on training without the averaging:
    not in a fit that averages, nor where a checkpoint is loaded to test or validate."""
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import EMAWeightAveraging

    from chest_mnist.model import MedMNISTClassifier

    model = MedMNISTClassifier(labels=["a"], stem="imagenet")
    for fn, callbacks, taken in (
        ("fit", [], "raw"),
        ("fit", [EMAWeightAveraging()], "average"),
        ("test", [], "average"),
        ("validate", [], "average"),
    ):
        model._trainer = SimpleNamespace(
            state=SimpleNamespace(fn=fn), callbacks=callbacks, is_global_zero=True, ckpt_path="c"
        )
        checkpoint = {"state_dict": "average", "current_model_state": "raw"}
        model.on_load_checkpoint(checkpoint)
        assert checkpoint["state_dict"] == taken, (fn, callbacks)
    model._trainer = None  # LightningModule.load_from_checkpoint: no trainer
    checkpoint = {"state_dict": "average", "current_model_state": "raw"}
    model.on_load_checkpoint(checkpoint)
    assert checkpoint["state_dict"] == "average"


@pytest.mark.slow
def test_ema_callback_config_runs(tiny_overrides, tmp_path, synthetic_npz):
    cfg = compose_train(
        tiny_overrides + ["callbacks=ema", "callbacks.ema.update_starting_at_step=1"]
    )
    assert cfg.callbacks.ema.decay == 0.999
    metrics = train(cfg)
    assert math.isfinite(metrics["test/auroc"])
    # the best checkpoint (what test, evaluate and predict use) holds the averaged weights,
    # the ones validation chose it by, and the raw ones apart
    import torch

    from chest_mnist.checkpoints import load_checkpoint

    report = json.loads((tmp_path / "report" / "metrics.json").read_text())
    best = load_checkpoint(report["best_checkpoint"])
    averaged, raw = best["state_dict"], best["current_model_state"]
    assert averaged.keys() == raw.keys()
    name = "backbone.layer1.0.conv1.weight"
    assert not torch.equal(averaged[name], raw[name])

    # the report (its scores, thresholds and numbers) describes the averaged weights, the ones
    # validation chose and evaluate and predict load, not the raw ones (it once did: Lightning's
    # averaging callback, restored for the test stage, loaded the raw weights back in)
    from chest_mnist.batches import to_model_input
    from chest_mnist.checkpoints import model_from_checkpoint, weights_digest

    data = best["datamodule_hyper_parameters"]
    with np.load(synthetic_npz) as npz:
        x = to_model_input(torch.from_numpy(npz["test_images"]), data["mean"], data["std"])
    saved = np.load(tmp_path / "report" / "predictions.npz")["scores"]
    model = model_from_checkpoint(best).eval()
    with torch.no_grad():
        np.testing.assert_allclose(saved, model.probabilities(x).numpy(), atol=1e-6)
        model.load_state_dict(raw)
        assert np.abs(saved - model.probabilities(x).numpy()).max() > 1e-3
    assert report["weights_sha256"] == weights_digest(averaged)


@pytest.mark.slow
def test_early_stopping_joins_the_default_callbacks(tiny_overrides, tmp_path):
    """min_delta=1 (AUROC can never improve by 1): the first epoch sets the best, the second
    does not improve, and patience=1 stops the run there, 2 epochs of 5, with its report."""
    cfg = compose_train(
        tiny_overrides
        + [
            "callbacks=[default,early_stopping]",
            "callbacks.early_stopping.patience=1",
            "callbacks.early_stopping.min_delta=1.0",
            "trainer.max_epochs=5",
        ]
    )
    assert (
        cfg.callbacks.early_stopping.monitor == "val/auroc" and "model_checkpoint" in cfg.callbacks
    )
    train(cfg)
    report = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert report["epochs_trained"] == 2 and math.isfinite(report["test/auroc"])
    from chest_mnist.checkpoints import load_checkpoint

    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["epoch"] == 1
    assert (tmp_path / "report" / "report.md").exists()


def test_early_stopping_alone_is_refused_with_the_way_to_add_it(tmp_path):
    from chest_mnist.config_checks import check_config

    cfg = compose_train(["callbacks=early_stopping", f"paths.output_dir={tmp_path}"])
    with pytest.raises(UserError, match=r"callbacks=\[default,early_stopping\]"):
        check_config(cfg, check_devices=False)


def test_a_seed_in_a_string_and_no_seed_are_accepted():
    from chest_mnist.config_checks import check_config

    check_config(compose_train(["seed='42'"]), check_devices=False)  # ${oc.env:SEED} gives "42"
    check_config(compose_train(["seed=null"]), check_devices=False)  # Lightning draws one


def test_no_logger_with_the_lr_monitor_is_refused_with_both_ways_out(tmp_path):
    from chest_mnist.config_checks import check_config

    cfg = compose_train(["~logger", f"paths.output_dir={tmp_path}"])
    with pytest.raises(
        UserError, match=r"~logger ~callbacks.lr_monitor.*logger=\[tensorboard,csv\]"
    ):
        check_config(cfg, check_devices=False)
    check_config(compose_train(["~logger", "~callbacks.lr_monitor"]), check_devices=False)
    check_config(compose_train(["logger=csv"]), check_devices=False)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.optimizer.lr=0", "model.optimizer.lr=0 must be a number above 0"),
        ("model.optimizer.lr=-0.1", "model.optimizer.lr=-0.1 must be a number above 0"),
        ("trainer.max_epochs=0", "trainer.max_epochs=0 must be a whole number of at least 1"),
        ("data.batch_size=0", "data.batch_size=0 must be a positive whole number"),
        ("model.stem=vit", "model.stem='vit' is unknown"),
        ("trainer.max_epochs=-1", "Give them in epochs, e.g. model.scheduler.milestones=[50,75]"),
        ("trainer.max_epochs=null", "trainer.max_epochs=None must be a whole number"),
        ("trainer.max_epochs=true", "trainer.max_epochs=True must be a whole number"),
        ("model.optimizer.lr=true", "model.optimizer.lr=True must be a number above 0"),
        ("seed=abc", "seed='abc' must be a whole number from 0 to 4294967295"),
        ("seed=-1", "seed=-1 must be a whole number from 0 to 4294967295"),  # Lightning: seed 0
        ("seed=4294967296", "seed=4294967296 must be a whole number from 0 to 4294967295"),
        (
            "callbacks.nonfinite_loss.check_every_n_steps=0",
            "callbacks.nonfinite_loss.check_every_n_steps=0 must be a whole number of at least 1",
        ),
    ],
)
def test_invalid_values_are_refused_before_data_loads(tiny_overrides, tmp_path, override, message):
    bounded = "+trainer.max_steps=3"  # were max_epochs=-1 accepted, the run would still end
    cfg = compose_train(
        tiny_overrides + [bounded, override, f"data.path={tmp_path}/never_written.npz"]
    )
    with pytest.raises(Exception) as error:
        train(cfg)
    from chest_mnist.cli import find_user_error

    assert message in str(find_user_error(error.value))
    assert not (tmp_path / "never_written.npz").exists()  # refused before any data was made


def test_an_epoch_that_would_end_on_one_image_trains_through(tiny_overrides, tmp_path):
    """65 = 2 x 32 + 1 images with the ImageNet stem at 28 px (layer4's maps are 1x1): batch
    norm cannot train on the last image alone, which stopped the run with a ValueError after
    its whole epoch. That image sits out; the epoch trains its 2 batches."""
    cfg = compose_train(
        [*tiny_overrides, "trainer.limit_train_batches=1.0", "data.subset=65", "test=false"]
    )
    assert cfg.model.stem == "imagenet" and cfg.data.batch_size == 32
    from chest_mnist.checkpoints import load_checkpoint

    train(cfg)
    last = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (0, 2)  # epoch 0 done, in 2 steps


@pytest.mark.parametrize(
    ("epochs", "milestones", "lrs"),
    [
        (1, [1, 1], [1e-3]),  # was [0, 0]: a one-epoch run trained at 1e-5
        (2, [1, 1], [1e-3, 1e-5]),
        (10, [5, 7], [1e-3] * 5 + [1e-4] * 2 + [1e-5] * 3),
        (100, [50, 75], [1e-3] * 50 + [1e-4] * 25 + [1e-5] * 25),  # the MedMNIST v2 protocol
    ],
)
def test_learning_rate_steps_follow_max_epochs_and_never_come_first(epochs, milestones, lrs):
    cfg = compose_train([f"trainer.max_epochs={epochs}"])
    assert cfg.model.scheduler.milestones == milestones
    resolved = cfg.copy()
    OmegaConf.resolve(resolved.model)  # what --cfg job --resolve does (it failed on the list)
    assert OmegaConf.to_container(resolved.model.scheduler.milestones) == milestones
    model = instantiate(cfg.model, labels=LABELS, task=INFO["chestmnist"]["task"], _convert_="all")
    optimizer = model.optimizer_factory(params=model.parameters())
    scheduler = model.scheduler_factory(optimizer=optimizer)
    seen = []
    for _ in range(epochs):  # what Lightning does with interval: epoch
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx(lrs)


@pytest.mark.parametrize("experiment", ["pneumonia_cpu", "medmnist_v2", "fast_gpu"])
def test_experiment_configs_compose_and_pass_the_checks(experiment, tmp_path):
    from chest_mnist.config_checks import check_job

    cfg = compose_train([f"experiment={experiment}", f"paths.output_dir={tmp_path}"])
    check_job(cfg, check_devices=False)  # builds the data module and the model: no data read
    assert cfg.trainer.max_epochs in (10, 100)
    if experiment == "fast_gpu":
        assert (cfg.data.batch_size, cfg.model.compile) == (512, "reduce-overhead")
        assert cfg.model.optimizer.fused is True
        import torch
        from hydra.utils import instantiate

        weight = torch.nn.Parameter(torch.ones(3))
        optimizer = instantiate(cfg.model.optimizer)(params=[weight])
        weight.grad = torch.ones(3)
        optimizer.step()  # fused Adam runs on the CPU too (torch >= 2.4), so the CPU tests can use it
        assert optimizer.param_groups[0]["fused"] is True
        torch.testing.assert_close(weight.detach(), torch.full((3,), 1 - 2e-3))
        assert cfg.data.drop_last  # one training shape: one compilation
        assert cfg.model.scheduler.milestones == [50, 75]
        assert cfg.callbacks.last_checkpoint.every_n_epochs == 5
        assert cfg.trainer.max_epochs % 5 == 0  # so the final epoch is saved


@pytest.mark.slow
def test_compiled_training_writes_plain_checkpoints(tiny_overrides, tmp_path):
    """model.compile compiles the backbone in place for training, once: validation, test and
    the report's predictions run eagerly (they would add a graph each). Its checkpoints have the
    plain model's keys, and the uncompiled model that evaluate and predict build from them
    gives the probabilities the compiled run reported. fast_gpu's mode (reduce-overhead: CUDA
    graphs on a GPU, plain inductor here)."""
    import torch
    from torch._dynamo.utils import counters

    from chest_mnist.batches import to_model_input
    from chest_mnist.checkpoints import load_checkpoint, model_from_checkpoint
    from chest_mnist.model import MedMNISTClassifier

    counters.clear()
    train(compose_train(tiny_overrides + ["model.compile=reduce-overhead"]))
    assert counters["stats"]["unique_graphs"] == 1  # the training step's, and no other
    report = json.loads((tmp_path / "report" / "metrics.json").read_text())
    checkpoint = load_checkpoint(report["best_checkpoint"])
    assert checkpoint["hyper_parameters"]["compile"] == "reduce-overhead"
    plain = MedMNISTClassifier(**(checkpoint["hyper_parameters"] | {"compile": False}))
    assert list(checkpoint["state_dict"]) == list(plain.state_dict())

    model = model_from_checkpoint(checkpoint).eval()
    saved = np.load(tmp_path / "report" / "predictions.npz")
    data = checkpoint["datamodule_hyper_parameters"]
    with np.load(data["path"]) as npz:
        images = torch.from_numpy(npz["test_images"])
    with torch.no_grad():
        eager = model.probabilities(to_model_input(images, data["mean"], data["std"]))
    np.testing.assert_allclose(saved["scores"], eager.numpy(), atol=1e-6)


def test_resolvers_and_schemas_are_registered_by_a_call_not_by_an_import():
    """config.py only defines them; the entry points (and conftest) register them."""
    code = (
        "from omegaconf import OmegaConf; from hydra.core.config_store import ConfigStore; "
        "import chest_mnist.config as c; "
        "stored = lambda: 'data.yaml' in ConfigStore.instance().repo.get('schema', {}); "
        "print(OmegaConf.has_resolver('epochs_at'), stored()); c.register(); "
        "print(all(OmegaConf.has_resolver(name) for name in c.RESOLVERS), stored())"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.split() == ["False", "False", "True", "True"], result.stderr
