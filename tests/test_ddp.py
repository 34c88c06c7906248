"""Lightning DDP on the CPU (two processes, gloo): exact test metrics, each image once."""

import json

import numpy as np
import pytest

from chest_mnist.checkpoints import load_checkpoint
from chest_mnist.evaluate import evaluate
from tests.conftest import DDP_ON_TWO_CPUS, compose_train, run_module


@pytest.mark.slow
@pytest.mark.parametrize("on_device", ["true", "false"], ids=["device_batches", "dataloader"])
def test_two_process_ddp_report_equals_single_process_evaluation(
    tmp_path, synthetic_npz, on_device
):
    """201 images on 2 ranks: a padding sampler would count one twice (Lightning's default).
    Training with data.drop_last: 100 images per rank in batches of 32 are 3 steps, not 4."""
    result = run_module(
        "chest_mnist.train",
        *DDP_ON_TWO_CPUS,
        "data=synthetic",
        f"data.path={synthetic_npz}",
        "data.subset=201",
        f"data.on_device={on_device}",
        "data.batch_size=32",
        "data.drop_last=true",
        "data.eval_batch_size=64",
        "model.stem=imagenet",
        "trainer.max_epochs=1",
        # one of the two draws the figures: on rank 0, while rank 1 waits
        f"figures={str(on_device == 'device_batches').lower()}",
        f"paths.log_dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in result.stderr + result.stdout
    (run,) = (tmp_path / "train" / "runs").iterdir()
    distributed = json.loads((run / "report" / "metrics.json").read_text())
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 3

    cfg = compose_train(
        [
            f"ckpt_path={distributed['best_checkpoint']}",
            "trainer=cpu",
            "+trainer.enable_progress_bar=false",
            "figures=false",
            f"paths.output_dir={tmp_path}/single",
        ],
        config_name="evaluate",
    )
    single = evaluate(cfg)
    assert (
        distributed["test/n_images"] == single["test/n_images"] == 201
    )  # none twice, none dropped
    for name, value in single.items():
        assert distributed[name] == pytest.approx(value, abs=1e-6), name
    ours = np.load(run / "report" / "predictions.npz")
    again = np.load(tmp_path / "single" / "report" / "predictions.npz")
    np.testing.assert_array_equal(ours["labels"], again["labels"])  # same images, same order
    np.testing.assert_allclose(ours["scores"], again["scores"], atol=1e-6)
