"""logger=csv: Lightning's CSV log, continued (not deleted) by a resumed run, and the loss
curves of the report read from it when there is no TensorBoard log."""

import csv

import pytest

from chest_mnist.loggers import AppendingCSVLogger, read_loss_curves_csv, read_run_loss_curves


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def log_epochs(run, epochs, extra_key=None):
    """What a run logs per epoch: train/loss, val/loss and the epoch, one step each."""
    logger = AppendingCSVLogger(save_dir=run, name="csv", version="")
    for epoch, (train_loss, val_loss) in epochs.items():
        values = {"train/loss": train_loss, "val/loss": val_loss, "epoch": epoch}
        if extra_key:
            values[extra_key] = 1.0
        logger.log_metrics(values, step=10 * epoch + 9)
    logger.finalize("success")
    return run / "csv" / "metrics.csv"


def test_a_resumed_run_appends_to_its_metrics_csv(tmp_path):
    path = log_epochs(tmp_path, {0: (0.9, 0.8), 1: (0.7, 0.75)})
    assert len(rows(path)) == 2
    # the resumed process: a new logger on the same folder, logging a column not seen before
    log_epochs(tmp_path, {1: (0.6, 0.7), 2: (0.5, 0.65)}, extra_key="test/auroc")
    kept = rows(path)
    assert [(r["epoch"], r["train/loss"]) for r in kept] == [
        ("0", "0.9"),
        ("1", "0.7"),  # the interrupted run's epoch 1 stays...
        ("1", "0.6"),  # ...and its rerun follows: the last row counts
        ("2", "0.5"),
    ]
    assert [r["test/auroc"] for r in kept] == ["", "", "1.0", "1.0"]  # the header widened
    epochs, values = read_loss_curves_csv(path)["train/loss"]
    assert epochs == [0, 1, 2] and values == pytest.approx([0.9, 0.6, 0.5])
    assert read_loss_curves_csv(path)["val/loss"][1] == pytest.approx([0.8, 0.7, 0.65])


def test_loss_curves_come_from_csv_without_tensorboard(tmp_path):
    log_epochs(tmp_path, {0: (0.9, 0.8), 1: (0.7, 0.75)})
    curves = read_run_loss_curves(tmp_path)
    assert curves["val/loss"] == ([0, 1], pytest.approx([0.8, 0.75]))
    with pytest.raises(FileNotFoundError, match="tensorboard does not exist.*metrics.csv does not"):
        read_run_loss_curves(tmp_path / "elsewhere")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "csv").mkdir()
    (tmp_path / "other" / "csv" / "metrics.csv").write_text("epoch,step,val/auroc\n0,9,0.5\n")
    with pytest.raises(FileNotFoundError, match=r"no columns \['train/loss', 'val/loss'\]"):
        read_run_loss_curves(tmp_path / "other")
    (tmp_path / "other" / "csv" / "metrics.csv").write_text(
        "epoch,train/loss,val/loss\n0,0.5,oops\n"
    )
    with pytest.raises(FileNotFoundError, match="val/loss or epoch that is no number"):
        read_run_loss_curves(tmp_path / "other")


def test_a_kill_while_the_header_widens_keeps_the_rows_already_logged(tmp_path, monkeypatch):
    """A new column rewrites metrics.csv; Lightning's writer truncates it first, so a kill in
    between lost every earlier row (seen once in the SIGKILL resume test). Ours writes beside it
    and renames."""
    path = log_epochs(tmp_path, {0: (0.9, 0.8), 1: (0.7, 0.75)})
    before = path.read_text()
    logger = AppendingCSVLogger(save_dir=tmp_path, name="csv", version="")
    logger.log_metrics({"epoch": 2, "test/auroc": 0.5}, step=29)  # a column not seen before

    def killed(self, rows):
        raise KeyboardInterrupt  # stands for the SIGKILL, mid-rewrite

    monkeypatch.setattr(csv.DictWriter, "writerows", killed)
    with pytest.raises(KeyboardInterrupt):
        logger.save()
    assert path.read_text() == before
    assert [p.name for p in path.parent.iterdir()] == ["metrics.csv"]  # no temporary file left


def hparams_content(folder):
    """The HPARAMS plugin's summaries in a TensorBoard folder, by tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    try:
        return EventAccumulator(str(folder)).Reload().PluginTagToContent("hparams")
    except KeyError:  # no summary of that plugin
        return {}


def test_the_hparams_row_puts_the_command_lines_keys_first_and_a_resume_adds_none(tmp_path):
    """The row's experiment marks the keys the command line set (TensorBoard shows those
    columns first), links the metrics without a value for them, and says nothing of how the
    run ended; a resumed run's config is in hparams.yaml only."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    from chest_mnist.loggers import HPARAMS_METRICS, log_config

    config = {
        "seed": 1,
        "ckpt_path": None,
        "model": {"optimizer": {"lr": 0.003, "betas": [0.9, 0.999]}, "tta_flip": False},
        "data": {"flag": "chestmnist", "subset": None},
    }
    logger = TensorBoardLogger(tmp_path, "first", "", default_hp_metric=False)  # as configured
    log_config([logger], config, ["model.optimizer.lr=0.003", "+data.subset=null", "seed=1"])
    logger.finalize("success")
    content = hparams_content(tmp_path / "first")
    assert set(content) == {metadata.EXPERIMENT_TAG, metadata.SESSION_START_INFO_TAG}
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    differs = {info.name: info.differs for info in experiment.hparam_infos}
    assert differs == {
        "seed": True,
        "ckpt_path": False,
        "model.optimizer.lr": True,
        "model.optimizer.betas": False,
        "model.tta_flip": False,
        "data.flag": False,
        "data.subset": True,
    }
    assert [m.name.tag for m in experiment.metric_infos] == list(HPARAMS_METRICS)
    row = metadata.parse_session_start_info_plugin_data(
        content[metadata.SESSION_START_INFO_TAG]
    ).hparams
    assert row["model.optimizer.betas"].string_value == "[0.9, 0.999]"
    assert row["data.subset"].string_value == "null" and row["seed"].number_value == 1
    assert EventAccumulator(str(tmp_path / "first")).Reload().Tags()["scalars"] == []

    resumed = TensorBoardLogger(tmp_path, "resumed", "", default_hp_metric=False)
    log_config([resumed], config | {"ckpt_path": "last.ckpt"}, ["ckpt_path=last.ckpt"])
    resumed.finalize("success")
    assert hparams_content(tmp_path / "resumed") == {}
    assert "ckpt_path: last.ckpt" in (tmp_path / "resumed" / "hparams.yaml").read_text()
