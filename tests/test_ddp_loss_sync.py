"""Under DDP the epoch's logged val/loss is the whole validation split's, not rank 0's share,
and train/loss the mean over every process's training images."""

import csv
import json

import numpy as np
import pytest
import torch

from chest_mnist.batches import to_model_input
from chest_mnist.checkpoints import load_checkpoint, model_from_checkpoint
from tests.conftest import DDP_ON_TWO_CPUS, run_module
from tests.test_train_loss import RecordSteps

N = 101  # validation images: 50 on rank 0 and 51 on rank 1, in batches of 32


class RecordStepsToFile(RecordSteps):
    """RecordSteps for a process of its own: each rank's steps as JSON in `folder`."""

    def __init__(self, folder: str):
        self.folder = folder

    def on_train_end(self, trainer, pl_module) -> None:
        with open(f"{self.folder}/steps_rank{trainer.global_rank}.json", "w") as f:
            json.dump(type(self).steps, f)


def logged(metrics_csv, name: str) -> list[float]:
    with open(metrics_csv, newline="") as f:
        return [float(row[name]) for row in csv.DictReader(f) if row.get(name)]


@pytest.mark.slow
def test_two_process_val_loss_is_the_whole_splits(tmp_path, synthetic_npz):
    """Rank 1's share has every label positive, so the two shares' losses are far apart and a
    mean of the ranks' means (50 and 51 images) would miss the whole split's by about 1e-2."""
    arrays = dict(np.load(synthetic_npz))
    arrays["val_labels"][50:N] = 1
    npz = tmp_path / "chest.npz"
    np.savez(npz, **arrays)
    result = run_module(
        "chest_mnist.train",
        *DDP_ON_TWO_CPUS,
        "trainer.max_epochs=1",
        "data=synthetic",
        f"data.path={npz}",
        f"data.subset={N}",
        "data.batch_size=32",
        "data.eval_batch_size=32",
        "model.stem=imagenet",
        "test=false",
        "logger=csv",
        "callbacks.progress_bar.refresh_rate=0",
        f"paths.log_dir={tmp_path}",
        "+callbacks.record._target_=tests.test_ddp_loss_sync.RecordStepsToFile",
        f"+callbacks.record.folder={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (tmp_path / "train" / "runs").iterdir()
    (val_loss,) = logged(run / "csv" / "metrics.csv", "val/loss")

    # the weights that were validated: last.ckpt is written at the epoch's end, after validation
    model = model_from_checkpoint(load_checkpoint(run / "checkpoints" / "last.ckpt")).eval()
    images, labels = (torch.from_numpy(arrays[f"val_{key}"][:N]) for key in ("images", "labels"))
    with torch.no_grad():
        logits = model(to_model_input(images, 0.5, 0.5))
        whole = model.loss(logits, labels).item()
        shares = [
            model.loss(logits[:50], labels[:50]).item(),
            model.loss(logits[50:], labels[50:]).item(),
        ]
    assert val_loss == pytest.approx(whole, abs=1e-5), (
        f"logged {val_loss}; the whole split's {whole}; rank 0's share {shares[0]}, "
        f"the mean of the ranks' means {np.mean(shares)}"
    )

    # train/loss: every process's images, not rank 0's share (the shares' losses differ)
    steps = [json.loads((tmp_path / f"steps_rank{r}.json").read_text()) for r in (0, 1)]
    (train_loss,) = logged(run / "csv" / "metrics.csv", "train/loss")
    both = [step for rank in steps for step in rank]
    expected = sum(loss * n for _, loss, n, _ in both) / sum(n for _, _, n, _ in both)
    rank0 = sum(loss * n for _, loss, n, _ in steps[0]) / sum(n for _, _, n, _ in steps[0])
    assert train_loss == pytest.approx(expected, rel=1e-5), (train_loss, expected, rank0)
    assert abs(rank0 - expected) > 1e-4  # the test can tell the two apart
