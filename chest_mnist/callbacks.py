"""Lightning callbacks that make a long run safe to stop and to resume (chest_mnist/conf/callbacks/default.yaml).

- `LastCheckpoint`: `checkpoints/last.ckpt` at the end of an epoch once `min_interval_s` has
  passed since the last save (a SIGKILL loses at most that and one epoch), at the end, and when
  the run is stopped with Ctrl-C or SIGTERM. It is
  Lightning's ModelCheckpoint with `save_on_exception`, except that it saves nothing after
  any other error (a non-finite loss, say), so the last good checkpoint stays as it was.
- `StopOnSigterm`: a SIGTERM stops training after an update or a validation, the same one in
  every process under DDP (Lightning 2.6 alone stops each process where it sees the signal:
  a DDP run can hang, a validation can be cut short, accumulated gradients lost).
- `StopOnNonFiniteLoss`: stops training at the first NaN or infinite training loss, with the
  epoch and step, before a checkpoint of the broken weights can be written.
- `RestoreRNG`: puts every process's random generator states in every checkpoint and each
  process restores its own on resume, so a resumed run shuffles (and augments) as the
  uninterrupted run would have, under DDP too (the order of an epoch stopped midway is the
  training batches' own state: chest_mnist.batches.DeviceBatches).
- `ProgressBar`: Lightning's RichProgressBar, reading the training loss from the GPU about
  once a second instead of after every step.

And one Trainer plugin (chest_mnist/conf/trainer/default.yaml):

- `AtomicCheckpointIO`: every checkpoint is written whole or not at all, so a kill during a
  save leaves the previous `last.ckpt` as it was.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.types import STEP_OUTPUT
from typing_extensions import override

from chest_mnist import UserError

log = logging.getLogger(__name__)


def step_loss(outputs: STEP_OUTPUT) -> torch.Tensor | None:
    """The loss a training step returned: alone, or as the "loss" of a dict."""
    return outputs["loss"] if isinstance(outputs, dict) else outputs


class LastCheckpoint(ModelCheckpoint):
    """`dirpath/last.ckpt` every `every_n_epochs` epochs, skipping the epochs that end less than
    `min_interval_s` seconds after the last save, at the end of training, and when the run is
    interrupted (Ctrl-C, SIGTERM). An epoch of the protocol takes seconds on a GPU, and a save
    of the 134 MB a good part of one (BENCHMARKS.md has both); an epoch longer than
    `min_interval_s` (a ChestMNIST epoch on the CPU) is saved every time."""

    def __init__(
        self,
        dirpath: str,
        filename: str = "last",
        every_n_epochs: int = 1,
        min_interval_s: float = 0.0,
        **kwargs: Any,
    ):
        if not min_interval_s >= 0:
            raise UserError(
                f"callbacks.last_checkpoint.min_interval_s={min_interval_s} must be 0 or more "
                f"(seconds; 0 saves at every epoch's end)."
            )
        kwargs = {"monitor": None, "save_top_k": 1, "enable_version_counter": False} | kwargs
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            every_n_epochs=every_n_epochs,
            save_on_exception=True,
            **kwargs,
        )
        self.min_interval_s = min_interval_s
        self._saved_at = -math.inf

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._saved_at = time.monotonic()  # the run's start, or its resume, counts as a save

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._when_due(super().on_train_epoch_end, trainer, pl_module)
        if _last_epoch(trainer):  # the end's save, here: before on_train_end (see there)
            self._save_unsaved(trainer)

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._when_due(super().on_validation_end, trainer, pl_module)

    def _when_due(self, save, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """ModelCheckpoint's epoch-end hook `save`, unless the last save is too recent. Under
        DDP the first process's clock decides for all: a save is a collective operation."""
        due = time.monotonic() - self._saved_at >= self.min_interval_s
        if not trainer.strategy.broadcast(due, src=0):
            return
        before = self._last_global_step_saved
        save(trainer, pl_module)
        if self._last_global_step_saved != before:
            self._saved_at = time.monotonic()

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the steps since the last save, should the last epoch's end not have saved them. Saved
        # there, not here: Lightning runs checkpoint callbacks last, so callbacks=ema has by now
        # copied the average into the model, and a save here would resume from the average
        self._save_unsaved(trainer)

    def _save_unsaved(self, trainer: L.Trainer) -> None:
        """last.ckpt now, unless it holds this step: the last epochs when their count is not a
        multiple of every_n_epochs or they ended within min_interval_s, or a stop inside an
        epoch (trainer.max_steps, max_time). Every rank calls it (a save is collective)."""
        if trainer.global_step != self._last_global_step_saved:
            trainer.save_checkpoint(self.format_checkpoint_name({}), weights_only=False)
            self._last_global_step_saved = trainer.global_step
            self._saved_at = time.monotonic()

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, KeyboardInterrupt | SIGTERMException):
            return  # an error, not a stop: the weights now may be broken; keep the last good ones
        super().on_exception(trainer, pl_module, exception)
        what = "Ctrl-C" if isinstance(exception, KeyboardInterrupt) else "SIGTERM"
        path = self.format_checkpoint_name({})
        if trainer.is_global_zero:
            log.warning(
                "Stopped by %s at epoch %d, step %d; %s holds this state. Resume with the same "
                "command and ckpt_path=%s",
                what,
                trainer.current_epoch,
                trainer.global_step,
                path,
                path,
            )


def _last_epoch(trainer: L.Trainer) -> bool:
    """Whether the fit ends after this epoch, asked in on_train_epoch_end (Lightning's fit loop
    has counted the epoch as processed then, and stops as its `done` says): max_epochs or
    max_steps reached, or a stop asked for (early stopping, max_time) that trainer.min_epochs
    and min_steps no longer hold back."""
    epochs, steps = trainer.current_epoch + 1, trainer.global_step
    can_stop = epochs >= (trainer.min_epochs or 0) and steps >= (trainer.min_steps or 0)
    return (
        (trainer.should_stop and can_stop)
        or (trainer.max_epochs not in (None, -1) and epochs >= trainer.max_epochs)
        or (trainer.max_steps not in (None, -1) and steps >= trainer.max_steps)
    )


class StopOnSigterm(Callback):
    """A SIGTERM stops training after an update or after a validation, at the same one in every
    process under DDP, so that `LastCheckpoint` saves a state from which the resumed run goes
    on as if never stopped.

    Lightning 2.6's own handler sets the stop at once, and each loop acts on it where it is:
    - under DDP each process stops after the batch in which it sees the signal, and the
      handler broadcasts from wherever the signal interrupts (Lightning issue #20806), so a
      process that sees it a batch later, or not at all, waits for the others forever;
    - a stop during a validation (or set by an epoch's last batch, just before it) ends the
      validation after its batch under way, and the resumed run never validates that epoch;
    - with gradient accumulation, the gradients gathered since the last update are lost.
    Here the handler only notes the signal. After each training batch that ends an update, and
    after each validation of the fit, the processes agree on whether any of them saw one (one
    all-reduce, as StopOnNonFiniteLoss's checks), and Lightning then stops them all there; a
    validation that starts with the stop decided runs to its end first."""

    def __init__(self) -> None:
        self._seen = self._stop = False

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._seen = self._stop = False
        if stage == "fit":  # Lightning puts its handler in place after this hook
            trainer._signal_connector._sigterm_notifier_fn = self._note

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # predict and test keep Lightning's own
            trainer._signal_connector.__dict__.pop("_sigterm_notifier_fn", None)

    def _note(self, signum: int, frame: Any) -> None:
        log.info("Received SIGTERM: training stops after the update or validation under way.")
        self._seen = True

    @override
    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if not trainer.fit_loop.epoch_loop._should_accumulate():  # alike in every process
            self._agree(trainer)

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._stop:  # the evaluation loop would stop after its first batch
            trainer._signal_connector.received_sigterm = False

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._agree(trainer)

    def _agree(self, trainer: L.Trainer) -> None:
        """Stop when any process saw the signal; Lightning raises SIGTERMException next, in
        every process, after the validation it may run first, and LastCheckpoint saves."""
        if self._stop or trainer.strategy.reduce_boolean_decision(self._seen, all=False):
            self._stop = trainer._signal_connector.received_sigterm = True


class StopOnNonFiniteLoss(Callback):
    """Stop at the first NaN or infinite training loss.

    The check runs on the device without waiting for it (no GPU sync per step); the result is
    read every `check_every_n_steps` steps and always before validation and before the end of
    the epoch, so no checkpoint is written after a bad step."""

    def __init__(self, check_every_n_steps: int = 50):
        if isinstance(check_every_n_steps, bool) or not (
            isinstance(check_every_n_steps, int) and check_every_n_steps >= 1
        ):
            raise UserError(
                f"callbacks.nonfinite_loss.check_every_n_steps={check_every_n_steps!r} must be a "
                f"whole number of at least 1 (steps between reads of the loss's check)."
            )
        self.check_every_n_steps = check_every_n_steps
        self._first_bad: torch.Tensor | None = None  # (step, loss) of the first bad step
        self._step: torch.Tensor | None = None

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = pl_module.device
        self._first_bad = torch.tensor([-1.0, 0.0], device=device)
        self._step = torch.tensor(float(trainer.global_step), device=device)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: STEP_OUTPUT, *args: Any
    ) -> None:
        _batch, batch_idx = args  # the hook's last two arguments; the batch itself is not needed
        loss = step_loss(outputs)
        if loss is None:
            return
        loss = loss.detach().float()
        new = ~torch.isfinite(loss) & (self._first_bad[0] < 0)
        self._first_bad = torch.where(new, torch.stack([self._step, loss]), self._first_bad)
        self._step += 1
        if (batch_idx + 1) % self.check_every_n_steps == 0:
            self._check(trainer)

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._check(trainer)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer)

    def _check(self, trainer: L.Trainer) -> None:
        if self._first_bad is None:
            return
        step, loss = self._first_bad.tolist()
        # every rank decides together (DDP): one rank stopping alone would leave the others
        # waiting in the next all-reduce
        if not trainer.strategy.reduce_boolean_decision(step >= 0, all=False):
            return
        where = (
            f"at epoch {trainer.current_epoch}, step {int(step)}"
            if step >= 0
            else "on another rank"
        )
        folder = trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback else "none"
        raise UserError(
            f"The training loss is {loss if step >= 0 else 'not finite'} {where}: training "
            f"stopped. The checkpoints written before it are kept ({folder}). "
            f"Lower model.optimizer.lr, or check the data for broken images."
        )


class RestoreRNG(Callback):
    """Every process's torch (CPU, and its own GPU's CUDA), numpy and Python random states in
    each checkpoint; each restores its own when training resumes, so a resumed run shuffles
    (and augments) as the uninterrupted run would have, under DDP too. Stored as tensors and
    plain values, so checkpoints still load with `weights_only=True`:

        rng_states = {"world_size": W, "ranks": [states of rank 0, ..., of rank W - 1]}
        states = {"torch": ..., "torch.cuda": the rank's own device's state or None (not on a
                  GPU), "numpy": ..., "python": ...}

    Resumed with another number of processes, every rank restores saved rank 0's states: the
    ranks keep drawing one shared permutation (DeviceBatches), but the data order is not the
    uninterrupted run's, and a warning says so. A checkpoint of the earlier format (one
    process's states, "torch.cuda" a list with every visible GPU's) is read as rank 0's."""

    @override
    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        states = _own_rng_states(trainer.strategy.root_device)
        ranks = [states]
        if trainer.world_size > 1 and _distributed():
            # Trainer.save_checkpoint runs on every rank at the same moment (Lightning's own
            # save ends in a barrier), and this hook within it: a collective is safe here
            ranks = [None] * trainer.world_size
            torch.distributed.all_gather_object(ranks, states)
        checkpoint["rng_states"] = {"world_size": len(ranks), "ranks": ranks}

    @override
    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        saved = checkpoint.get("rng_states")
        if saved is None:
            log.warning(
                "The checkpoint has no random generator states: the data order will differ."
            )
            return
        world_size, device = trainer.world_size, trainer.strategy.root_device
        saved_by = None  # set when this run cannot continue each process's own states
        if "ranks" not in saved:  # the earlier format: the states of the process that saved
            states = _earlier_format(saved, trainer)
            if world_size > 1:
                saved_by = "one process (an earlier format)"
        elif saved["world_size"] == world_size:
            states = saved["ranks"][trainer.global_rank]
        else:
            states, saved_by = saved["ranks"][0], f"{saved['world_size']} processes"
        if saved_by is not None and trainer.is_global_zero:
            log.warning(
                "The checkpoint's random generator states were saved by %s and this run has %d: "
                "every process restores those of saved process 0, so the processes still shuffle "
                "alike, but the data order will differ from a run that was never stopped (each "
                "process's share of every epoch's shuffle, and the random numbers each process "
                "draws, depend on the number of processes).",
                saved_by,
                world_size,
            )
        torch.set_rng_state(states["torch"])
        if states["torch.cuda"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(states["torch.cuda"], device)
        name, keys, pos, has_gauss, gauss = states["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        version, internal, gauss_next = states["python"]
        random.setstate((version, tuple(internal), gauss_next))


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _own_rng_states(device: torch.device) -> dict[str, Any]:
    """This process's generator states; of CUDA's, only its own device's (the one it draws
    its permutations and augmentations from)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "torch.cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "python": random.getstate(),
    }


def _earlier_format(saved: dict[str, Any], trainer: L.Trainer) -> dict[str, Any]:
    """States of the earlier format, which held the saving process's states and every visible
    GPU's CUDA state (`get_rng_state_all`), as one rank's: the CUDA state is the entry of the
    device that drew the data order, this process's own when alone. Under DDP every rank takes
    the entry of rank 0's device, so that the ranks keep agreeing (only rank 0 had saved)."""
    device = trainer.strategy.root_device
    cuda = None
    if device.type == "cuda" and saved.get("torch.cuda"):
        devices = getattr(trainer.strategy, "parallel_devices", None) or [device]
        first = devices[0] if trainer.world_size > 1 else device
        index = first.index if first.index is not None else torch.cuda.current_device()
        if index < len(saved["torch.cuda"]):
            cuda = saved["torch.cuda"][index]
    return {**saved, "torch.cuda": cuda}


class ProgressBar(RichProgressBar):
    """Lightning's RichProgressBar, with the training loss read to the host at most every
    `metrics_interval_s` seconds (and at the end of each epoch); the step counter still moves
    every step.

    Lightning's bar asks for the logged values after every training step, and a value logged
    with `prog_bar=True` is copied to the host each time it is asked for: a GPU sync per step,
    which stops the CPU from queueing the next steps while the GPU works. So this bar shows
    the training step's own loss (what `training_step` returned) as `train/loss_step` when its
    values are due. (`refresh_rate` is Rich's redraws per second, which read nothing from the
    GPU.)
    """

    def __init__(self, refresh_rate: int = 10, metrics_interval_s: float = 1.0, **kwargs: Any):
        super().__init__(refresh_rate=refresh_rate, **kwargs)
        self.metrics_interval_s = metrics_interval_s
        self._last_read = -math.inf
        self._due = True
        self._shown: dict[str, Any] = {}
        self._step_loss: torch.Tensor | None = None

    @override
    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: STEP_OUTPUT,
        batch: Any,
        batch_idx: int,
    ) -> None:
        now = time.monotonic()
        self._due = (
            now - self._last_read >= self.metrics_interval_s
            or batch_idx + 1 >= self.total_train_batches
        )
        if self._due:
            self._step_loss = step_loss(outputs)
        try:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        finally:
            self._due = True  # every other caller (epoch and validation ends) reads now

    @override
    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        if not self._due:
            return self._shown
        self._last_read = time.monotonic()
        metrics = super().get_metrics(trainer, pl_module)
        if self._step_loss is not None:
            metrics["train/loss_step"] = self._step_loss.item()
        self._shown = metrics
        return metrics


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written whole or not at all: into a hidden temporary file beside the
    target, flushed to the disk, then renamed over it (one atomic step on a local file
    system). A SIGKILL or a power cut during a save leaves the previous file as it was.

    Lightning's own writer serialises the checkpoint into memory and writes it through a
    temporary file in the system's temp folder; where that folder is another file system than
    the run's (a local /tmp, runs on a network disk), the final move is a copy that a kill
    can cut short, and the old `last.ckpt` is already gone. Remote paths (`s3://...`) are left
    to Lightning's writer.
    """

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # the umask's permissions
        try:
            with open(temporary, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a process killed mid-save
            stale.unlink(missing_ok=True)
