"""The host's time per training step of `python -m chest_mnist.train` with the whole step as one
CUDA graph (model.cuda_graph=step), without the GPU's: what Lightning's loop, the callbacks and
the module cost around a replay. The graph is replaced by a stand-in whose call returns the
same loss tensor and computes nothing, so on any machine (a CPU here) a step's time is the
host's alone: on a GPU, a replay that takes longer than this keeps the GPU busy all the time.

The default config (the protocol: batch 128, its callbacks, loggers and progress bar) on the
data file given, training only (no validation, no test), `--steps` steps of the first epoch;
the step time is the median gap between consecutive batch starts after the first 50.

    python benchmarks/step_host_time.py DATA.npz [--steps 400] [OVERRIDE ...]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

import chest_mnist
from chest_mnist import cuda_graphs
from chest_mnist.config import register
from chest_mnist.train import train


class FreeStep:
    """cuda_graphs.StepGraph without a graph: its call costs what the module's own code around a
    replay costs (copying nothing, computing nothing)."""

    def __init__(self, network, loss, optimizer, x, targets):
        self.shape = x.shape
        self.loss = torch.zeros((), device=x.device)

    def fits(self, x: torch.Tensor) -> bool:
        return x.shape == self.shape

    def __call__(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss

    def portable(self, optimizer_state: dict) -> None:
        pass

    def close(self) -> None:
        pass


class BatchStarts(L.Callback):
    """The time each training batch starts, in `BatchStarts.starts` (one run per process)."""

    starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        BatchStarts.starts.append(time.perf_counter())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="a ChestMNIST-format .npz (python -m chest_mnist.synthetic)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides")
    args = parser.parse_intermixed_args()

    from hydra import compose, initialize_config_dir

    register()
    cuda_graphs.StepGraph = FreeStep
    cuda_graphs.wanted = lambda *a, **k: True  # as on one GPU
    conf = Path(chest_mnist.__file__).parent / "conf"
    with tempfile.TemporaryDirectory() as out, initialize_config_dir(str(conf), version_base="1.3"):
        cfg = compose(
            "train",
            [
                "data=synthetic",
                f"data.path={args.data}",
                "model.cuda_graph=step",
                "trainer=cpu",
                f"+trainer.limit_train_batches={args.steps}",
                "+trainer.limit_val_batches=0",
                "trainer.max_epochs=1",
                "test=false",
                f"paths.output_dir={out}",
                "+callbacks.batch_starts._target_=__main__.BatchStarts",
                *args.overrides,
            ],
        )
        train(cfg)
    starts = BatchStarts.starts
    gaps = [b - a for a, b in zip(starts[50:], starts[51:], strict=False)]
    if len(gaps) < 10:
        raise SystemExit(
            f"{len(starts)} steps ran: too few to time after the first 50. Give --steps 100 or "
            f"more, and a data file with at least that many batches of 128 training images."
        )
    print(
        f"host time per step (model.cuda_graph=step, the replay a stand-in): median "
        f"{statistics.median(gaps) * 1e3:.3f} ms over {len(gaps)} steps "
        f"(min {min(gaps) * 1e3:.3f}, max {max(gaps) * 1e3:.3f}); overrides: {args.overrides}"
    )


if __name__ == "__main__":
    main()
