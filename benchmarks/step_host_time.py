"""The host's time per training step of `python -m chest_mnist.train` with the whole step as one
CUDA graph (model.cuda_graph=step, what auto takes on one GPU), without the GPU's: what
Lightning's loop, the callbacks and the module cost around a replay. The graph is replaced by
a stand-in whose call returns the same loss tensor and computes nothing, so on any machine (a
CPU here) a step's time is the host's alone: on a GPU, a replay that takes longer than this
keeps the GPU busy all the time.

The default config (the protocol: batch 128, its callbacks, loggers and progress bar) on the
data file given, `--steps` steps an epoch; the step time is the median gap between consecutive
batch starts of an epoch, after its first 50. No test.

With `--epochs E` (2 or more), validation runs after every epoch, as in the protocol, on the
file's whole validation split, with the network's evaluation forward a stand-in too (random
scores, computing nothing): the host's time per epoch outside the training steps (the
validation loop, its metrics, the logs, the checkpoints, the next epoch's start) is the gap
between the end of an epoch's last training batch and the start of the next epoch's first,
a median over the E - 1 gaps. On a GPU, each epoch of the protocol pays it once.

    python benchmarks/step_host_time.py DATA.npz [--steps 400] [--epochs 1] [OVERRIDE ...]
"""

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

import chest_mnist
from chest_mnist import cuda_graphs
from chest_mnist.config import register
from chest_mnist.model import MedMNISTClassifier
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


def free_eval_logits(model: MedMNISTClassifier, x: torch.Tensor) -> torch.Tensor:
    """MedMNISTClassifier._eval_logits without the network: random logits, one per label."""
    return torch.randn(len(x), model.head.out_features, device=x.device)


class Times(L.Callback):
    """When each training batch starts and ends, by epoch, in `Times.starts` and `Times.ends`
    ({epoch: [seconds, ...]}; one run per process)."""

    starts: dict[int, list[float]] = {}
    ends: dict[int, list[float]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        Times.starts.setdefault(trainer.current_epoch, []).append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        Times.ends.setdefault(trainer.current_epoch, []).append(time.perf_counter())


def summary(values: list[float], scale: float, unit: str) -> str:
    return (
        f"median {statistics.median(values) * scale:.3f} {unit} "
        f"(min {min(values) * scale:.3f}, max {max(values) * scale:.3f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="a ChestMNIST-format .npz (python -m chest_mnist.synthetic)")
    parser.add_argument("--steps", type=int, default=400, help="training steps an epoch")
    parser.add_argument(
        "--epochs", type=int, default=1, help="2 or more: validate after each, and time that"
    )
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides")
    args = parser.parse_intermixed_args()

    from hydra import compose, initialize_config_dir

    register()
    cuda_graphs.StepGraph = FreeStep
    cuda_graphs.wanted = lambda *a, **k: True  # as on one GPU
    MedMNISTClassifier._eval_logits = free_eval_logits
    validate = [] if args.epochs > 1 else ["+trainer.limit_val_batches=0"]
    conf = Path(chest_mnist.__file__).parent / "conf"
    with tempfile.TemporaryDirectory() as out, initialize_config_dir(str(conf), version_base="1.3"):
        cfg = compose(
            "train",
            [
                "data=synthetic",
                f"data.path={args.data}",
                "model.cuda_graph=step",
                "model.compile=false",  # the stand-in calls no network: nothing to compile
                "trainer=cpu",
                f"+trainer.limit_train_batches={args.steps}",
                *validate,
                f"trainer.max_epochs={args.epochs}",
                "test=false",
                f"paths.output_dir={out}",
                "+callbacks.times._target_=__main__.Times",
                *args.overrides,
            ],
        )
        train(cfg)
    gaps = [b - a for starts in Times.starts.values() for a, b in itertools.pairwise(starts[50:])]
    if len(gaps) < 10:
        raise SystemExit(
            f"{sum(map(len, Times.starts.values()))} steps ran: too few to time after the first "
            f"50 of an epoch. Give --steps 100 or more, and a data file with at least that many "
            f"batches of 128 training images."
        )
    print(
        f"host time per step (model.cuda_graph=step, the replay a stand-in): "
        f"{summary(gaps, 1e3, 'ms')} over {len(gaps)} steps; overrides: {args.overrides}"
    )
    if args.epochs > 1:
        epochs = sorted(Times.starts)
        between = [Times.starts[b][0] - Times.ends[a][-1] for a, b in itertools.pairwise(epochs)]
        print(
            f"host time between epochs (validation, its metrics, logs and checkpoints; the "
            f"evaluation forward a stand-in): {summary(between, 1, 's')} over {len(between)} "
            f"epoch ends, {sum(between):.2f} s in all; overrides: {args.overrides}"
        )


if __name__ == "__main__":
    main()
