"""Batches cut from whole uint8 splits by one indexing operation, made model-ready on the device.

No PIL and no per-sample Python: a shuffle is one `randperm`, a batch one gather, and float
conversion, normalisation, gray -> RGB and the optional random shift run per batch on the
device. Under DDP each rank takes its own slice: equal ones for training, every image exactly
once for evaluation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

log = logging.getLogger(__name__)


class SplitDataset(Dataset):
    """One split as two tensors. `__getitems__` returns a whole batch with one indexing
    operation, which DataLoader calls in place of `__getitem__` per sample."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices)
        return self.images[index], self.labels[index]


class DeviceBatches:
    """Batches cut from a split that sits whole in one place (GPU memory, or host memory when
    training on the CPU): a shuffle is one `randperm` there, a batch one indexing operation.

    Under DDP each rank takes its own slice of the (shared, seeded) permutation. Training
    slices are equal (the last `len % world_size` images of a shuffled epoch sit out, as
    with DistributedSampler(drop_last=True)); evaluation slices cover every image exactly
    once, so no test image is counted twice or dropped. `drop_last` (for training) leaves out
    the epoch's last, partial batch, so that every step has the same shape.

    A shuffled one is resumable inside an epoch: Lightning keeps its `state_dict` (the epoch's
    permutation and `batches_done()`, the batches training is through) in each checkpoint and
    gives it back to `load_state_dict` on resume, so the resumed epoch goes on through the same
    permutation rather than a new one, each image once.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        shuffle: bool,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        batches_done: Callable[[], int] | None = None,
    ):
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle = batch_size, shuffle
        self.rank, self.world_size = rank, world_size
        self.drop_last = drop_last
        self.batches_done = batches_done
        self.order: torch.Tensor | None = None  # the permutation being iterated (shuffled only)
        self._resume: dict | None = None  # an interrupted epoch to go on with (load_state_dict)

    def __len__(self) -> int:
        n = len(self.images)
        start, stop = shard_bounds(n, self.rank, self.world_size)
        per_rank = n // self.world_size if self.shuffle else stop - start
        if self.drop_last:
            return per_rank // self.batch_size
        return math.ceil(per_rank / self.batch_size)

    def __iter__(self):
        n, device, first = len(self.images), self.images.device, 0
        if not self.shuffle:
            indices = torch.arange(*shard_bounds(n, self.rank, self.world_size), device=device)
        else:
            if self._resume:  # the interrupted epoch's permutation, from its next batch
                self.order, first = self._resume["order"].to(device), self._resume["batches_done"]
                self._resume = None
            else:  # the same permutation on every rank: the global seed is the same everywhere
                self.order = torch.randperm(n, device=device)
            indices = self.order[: n - n % self.world_size].view(-1, self.world_size)[:, self.rank]
        for start in range(first * self.batch_size, len(self) * self.batch_size, self.batch_size):
            index = indices[start : start + self.batch_size]
            yield self.images[index], self.labels[index]

    def state_dict(self) -> dict:
        """Inside a shuffled epoch: its permutation, how many of its batches training is
        through, and what they were cut with; at an epoch's end nothing (the next epoch
        shuffles afresh)."""
        done = _done(self.batches_done)
        if self.order is None or not done:
            return {}
        return {
            "order": self.order.cpu(),
            "batches_done": done,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """The next iteration goes on with the epoch `state` describes. One saved by the
        DataLoader, or with other data, batches or number of processes, cannot be: that
        epoch's rest is shuffled afresh, and a warning says so."""
        if not state:
            return
        if "order" not in state:
            _shuffled_afresh("by the DataLoader (data.on_device=false), which keeps no order")
            return
        n, size, world = len(state["order"]), state["batch_size"], state["world_size"]
        if (n, size, world) != (len(self.images), self.batch_size, self.world_size):
            _shuffled_afresh(
                f"of {n} training images in batches of {size} in {world} process(es); this run "
                f"has {len(self.images)} in batches of {self.batch_size} in {self.world_size}"
            )
            return
        self._resume = state


class TrainingDataLoader(DataLoader):
    """The training DataLoader (data.on_device=false): it cannot go on with an interrupted
    epoch's order, so resumed inside one it shuffles the rest afresh and says so. Stateful for
    Lightning all the same, as DeviceBatches is: Lightning refuses a checkpoint that holds
    another number of loader states than the run has stateful loaders, and either kind of
    checkpoint must resume with either loader. `batches_done`: as DeviceBatches'."""

    def __init__(self, *args, batches_done: Callable[[], int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches_done = batches_done

    def state_dict(self) -> dict:
        done = _done(self.batches_done)
        return {"batches_done": done} if done else {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            _shuffled_afresh("and data.on_device=false (a DataLoader) keeps no order")


def _done(batches_done: Callable[[], int] | None) -> int:
    """The training batches of this epoch done, per the loader's `batches_done` (none without)."""
    return batches_done() if batches_done else 0


def _shuffled_afresh(why: str) -> None:
    log.warning(
        "The checkpoint was saved inside an epoch %s: the rest of that epoch is shuffled "
        "afresh, not in the interrupted run's order.",
        why,
    )


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous slice [start, stop) of n items that rank `rank` evaluates: every item once."""
    return n * rank // world_size, n * (rank + 1) // world_size


class ShardSampler(DistributedSampler):
    """Evaluation under DDP for the DataLoader path: each rank reads its own contiguous slice,
    with no padding (Lightning's default DistributedSampler repeats images to even out the
    ranks, and interleaves them). Being a DistributedSampler, Lightning leaves it in place."""

    def __init__(self, dataset: Dataset, rank: int, world_size: int):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=False)
        self.start, self.stop = shard_bounds(len(dataset), rank, world_size)
        self.num_samples = self.total_size = self.stop - self.start

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def keep_batch(batch):
    """collate_fn for SplitDataset: the batch is already stacked."""
    return batch


def to_model_input(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 (B, H, W) gray or (B, H, W, C) colour -> float (B, 3, H, W), normalised,
    channels_last. Gray is repeated to three identical channels, as ResNet-18 expects RGB."""
    x = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
    x = (x.float() / 255.0 - mean) / std
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous(memory_format=torch.channels_last)


def random_shift(
    x: torch.Tensor, max_shift: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Translate each image by its own random offset in [-max_shift, max_shift] pixels per axis,
    filling the border by replication. One gather for the whole batch."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (max_shift,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b, 1), device=x.device, generator=generator)
    rows = dy + torch.arange(h, device=x.device)  # (B, H)
    cols = dx + torch.arange(w, device=x.device)  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    shifted = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return shifted.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
