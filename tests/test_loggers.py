"""logger=csv: Lightning's CSV log, continued (not deleted) by a resumed run, and the loss
curves of the report read from it when there is no TensorBoard log."""

import csv

import pytest

from chest_mnist.loggers import AppendingCSVLogger
from chest_mnist.report import read_loss_curves_csv, read_run_loss_curves


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
