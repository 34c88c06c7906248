"""Where the host's time goes in a training step of `python -m chest_mnist.train`: a callback that
runs Python's cProfile over steps [start, start + steps) of the first epoch and writes the
functions with the most time (own and cumulative) to `out`. Add it from the command line:

    PYTHONPATH=. python -m chest_mnist.train ... \
      +callbacks.host_profile._target_=benchmarks.host_profile.ProfileSteps \
      +callbacks.host_profile.out=host_profile.txt
"""

import cProfile
import io
import pstats
import time

import lightning as L
import torch


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class ProfileSteps(L.Callback):
    def __init__(self, out: str, start: int = 100, steps: int = 200, lines: int = 60):
        self.out, self.start, self.steps, self.lines = out, start, steps, lines
        self.profiler = cProfile.Profile()
        self.started = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 0 and batch_idx == self.start:
            sync()
            self.started = time.perf_counter()
            self.profiler.enable()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 0 and batch_idx == self.start + self.steps - 1:
            self.profiler.disable()
            sync()
            wall = time.perf_counter() - self.started
            text = io.StringIO()
            text.write(
                f"{self.steps} steps under cProfile: {wall / self.steps * 1e3:.3f} ms a step\n"
            )
            for key in ("tottime", "cumulative"):
                pstats.Stats(self.profiler, stream=text).sort_stats(key).print_stats(self.lines)
            with open(self.out, "w") as f:
                f.write(text.getvalue())
