"""The training loss as logged: `train/loss` is the epoch's mean over its images, and
`train/loss_step` the step's own loss on the steps the loggers write. Lightning's `self.log`
is called only then: at batch 128 on a GPU it cost as much host time as the GPU's work for
the step (BENCHMARKS.md), so calling it every step slowed every run."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest

from chest_mnist.model import MedMNISTClassifier
from chest_mnist.synthetic import write_synthetic
from chest_mnist.train import train
from tests.conftest import compose_train, tiny_training_overrides


class RecordSteps(L.Callback):
    """Each training step's (step, loss, images, epoch), as training_step returned it."""

    steps: list[tuple[int, float, int, int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step - 1  # the optimizer has stepped already
        type(self).steps.append(
            (step, float(outputs["loss"]), len(batch[0]), trainer.current_epoch)
        )


@pytest.mark.slow
@pytest.mark.parametrize("every", [2, 50])
def test_train_loss_is_the_epochs_mean_and_logged_once_per_epoch(tmp_path, monkeypatch, every):
    npz = write_synthetic(tmp_path / "chest.npz", n_train=70, n_val=32, n_test=32, seed=0)
    calls: list[str] = []
    original = MedMNISTClassifier.log

    def counted(self, name, *args, **kwargs):
        if name.startswith("train/"):
            calls.append(name)
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(MedMNISTClassifier, "log", counted)
    RecordSteps.steps = []
    overrides = [
        o for o in tiny_training_overrides(npz, tmp_path) if o != "+trainer.limit_train_batches=3"
    ]
    train(
        compose_train(
            overrides
            + [
                "trainer.max_epochs=2",  # 70 images in batches of 32: 32, 32 and 6, twice
                f"trainer.log_every_n_steps={every}",
                "logger=csv",
                "test=false",
                "+callbacks.record._target_=tests.test_train_loss.RecordSteps",
            ]
        )
    )
    steps = RecordSteps.steps
    assert [(s, n, e) for s, _, n, e in steps] == [
        (0, 32, 0), (1, 32, 0), (2, 6, 0), (3, 32, 1), (4, 32, 1), (5, 6, 1)
    ]  # fmt: skip
    with open(tmp_path / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))

    epoch_loss = {int(r["epoch"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
    expected = {
        epoch: sum(loss * n for _, loss, n, e in steps if e == epoch)
        / sum(n for _, _, n, e in steps if e == epoch)
        for epoch in (0, 1)
    }
    assert epoch_loss == pytest.approx(expected, rel=1e-6)
    # the mean over images, not over steps: the 6-image batch counts for 6/70
    unweighted = sum(loss for _, loss, _, e in steps if e == 0) / 3
    assert abs(epoch_loss[0] - unweighted) > 1e-4

    step_loss = {
        int(r["step"]): float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")
    }
    logged_steps = [s for s, *_ in steps if (s + 1) % every == 0]
    assert step_loss == pytest.approx(
        {s: loss for s, loss, *_ in steps if s in logged_steps}, rel=1e-6
    )
    assert sorted(calls) == ["train/loss"] * 2 + ["train/loss_step"] * len(logged_steps)


class StopAtStep(L.Callback):
    """Asks the trainer to stop after step `step` (as a Timer or early stopping does)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step - 1 == self.step:
            trainer.should_stop = True


def run_small(tmp_path: Path, extra: list[str]) -> list[dict]:
    """Train on 70 images in batches of 32 (3 steps an epoch), recording each step; the rows
    of the run's metrics.csv."""
    npz = write_synthetic(tmp_path / "chest.npz", n_train=70, n_val=32, n_test=32, seed=0)
    overrides = [
        o for o in tiny_training_overrides(npz, tmp_path) if o != "+trainer.limit_train_batches=3"
    ]
    RecordSteps.steps = []
    train(
        compose_train(
            overrides
            + ["logger=csv", "test=false"]
            + ["+callbacks.record._target_=tests.test_train_loss.RecordSteps"]
            + extra
        )
    )
    with open(tmp_path / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_a_stop_asked_for_mid_epoch_writes_that_steps_own_loss(tmp_path):
    """Lightning writes the logs of the step where should_stop is set, whatever the cadence:
    the row must hold that step's loss, not an older one."""
    rows = run_small(
        tmp_path,
        [
            "trainer.max_epochs=2",
            "trainer.log_every_n_steps=2",
            "+callbacks.stop._target_=tests.test_train_loss.StopAtStep",
            "+callbacks.stop.step=2",
        ],
    )
    losses = {step: loss for step, loss, *_ in RecordSteps.steps}
    step_loss = {
        int(r["step"]): float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")
    }
    assert step_loss == pytest.approx({1: losses[1], 2: losses[2]}, rel=1e-6)


@pytest.mark.slow
def test_a_run_resumed_inside_an_epoch_trains_and_logs_the_rest_of_it(tmp_path):
    """The checkpoint Ctrl-C or SIGTERM writes is inside an epoch; the resumed run starts
    there, without the epoch's start hook."""
    first = tmp_path / "first"
    run_small(
        first,
        [
            "trainer.max_epochs=2",
            "+callbacks.mid._target_=lightning.pytorch.callbacks.ModelCheckpoint",
            f"+callbacks.mid.dirpath={first}/mid",
            "+callbacks.mid.filename=step4",
            "+callbacks.mid.every_n_train_steps=4",
            "+callbacks.mid.save_on_train_epoch_end=false",
        ],
    )
    resumed = tmp_path / "resumed"
    rows = run_small(resumed, ["trainer.max_epochs=2", f"ckpt_path={first}/mid/step4.ckpt"])
    steps = RecordSteps.steps
    assert [(s, e) for s, _, _, e in steps] == [(4, 1), (5, 1)]  # the rest of epoch 1
    (row,) = [r for r in rows if r.get("train/loss")]
    expected = sum(loss * n for _, loss, n, _ in steps) / sum(n for _, _, n, _ in steps)
    assert (int(row["epoch"]), float(row["train/loss"])) == (1, pytest.approx(expected, rel=1e-6))
