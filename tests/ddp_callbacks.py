"""Test-only callbacks for the DDP resume tests, given to training on the command line:
`+callbacks.rank_noise._target_=tests.ddp_callbacks.RankNoise` (training runs from the
repository root, so `tests` is importable)."""

from __future__ import annotations

import os
import random
import signal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback


class RankNoise(Callback):
    """Each training step, rank r draws 1 + r values from numpy and from Python's random, then
    from torch a number that depends on the rank and on those values.

    On the CPU every rank is seeded alike and draws alike, so the ranks' generator states are
    the same and restoring rank 0's on every rank goes unnoticed. On a GPU they are not (each
    rank draws from its own device's generator); this makes them differ on the CPU too, and
    makes each of the three generators' state change what torch (and so the shuffle) draws
    next."""

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        rank = trainer.global_rank
        from_numpy = np.random.rand(1 + rank)
        from_python = [random.random() for _ in range(1 + rank)]
        torch.rand(1 + rank + int(3 * from_numpy[-1]) + int(3 * from_python[-1]))


class KillAtEpochStart(Callback):
    """Every rank SIGKILLs itself when epoch `epoch` starts (after the previous epoch's
    last.ckpt is written), together: a power cut at a known moment."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.strategy.barrier("kill")  # no rank still waits in a collective for another
            os.kill(os.getpid(), signal.SIGKILL)


class SigtermAfterStep(Callback):
    """Rank r sends itself SIGTERM at the end of the training batch after which the run has made
    `steps[r]` steps (global_step); a rank without an entry (None) is never signalled: as SLURM
    or `kill` may reach the processes at different batches, or reach only one."""

    def __init__(self, steps: list[int | None]):
        self.steps = list(steps)

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        rank = trainer.global_rank
        if rank < len(self.steps) and trainer.global_step == self.steps[rank]:
            os.kill(os.getpid(), signal.SIGTERM)
