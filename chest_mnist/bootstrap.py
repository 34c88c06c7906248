"""Confidence intervals for the test numbers: a seeded percentile bootstrap over test images.

Each resample draws N test images with replacement (numpy's `default_rng(seed)`, so the same
seed gives the same resamples); the metric is computed on it exactly as the evaluation computes
it on the whole split (metrics.py): AUROC with ties counted half (the Mann-Whitney statistic,
as torchmetrics and sklearn), average precision as sklearn's step sum, ACC as MedMNIST's. The
interval is the (1 - level)/2 and (1 + level)/2 percentiles of the resampled values (numpy's
default linear interpolation). A label whose resample has no positives (or, for AUROC, no
negatives) has no value in that resample, as in the evaluation: it is left out of that
resample's macro mean and of its own interval, never counted as 0.

Vectorised: a resample is a row of counts (how often each image was drawn), and each metric is
a weighted sum over the images sorted once per label, read only where positives are, so a
chunk of resamples is one (chunk, N) running sum per label and a few smaller tensor operations,
on the device given (the run's GPU where it has one). At ChestMNIST's test size (22,433 x 14)
and 1,000 resamples this took 3.3 s on one core of a 2-core CPU (BENCHMARKS.md has the
numbers; `benchmarks/bootstrap_time.py --device cuda` times a GPU).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from chest_mnist.task import Task

# resamples at a time: on the CPU few, so that a chunk's (chunk, N) arrays stay in the caches
# (10: 1.8 MB of int64 at N = 22,433; 50 took 1.4 times as long on the 2-core machine); on a GPU
# many, for fewer launches. The draws are the same whatever the chunk.
CHUNK_CPU, CHUNK_GPU = 10, 200


@dataclass(frozen=True)
class Bootstrap:
    """How the intervals are drawn (config: `bootstrap.resamples`, `.level`, `.seed`)."""

    resamples: int = 1000
    level: float = 0.95
    seed: int = 0

    def describe(self) -> str:
        return (
            f"{self.level * 100:g}% percentile bootstrap over test images, "
            f"{self.resamples:,} resamples, seed {self.seed}"
        )


def resample_indices(
    n: int, resamples: int, seed: int, chunk: int = CHUNK_CPU
) -> Iterator[np.ndarray]:
    """The images of each resample, (chunk, n) int64 indices, chunk by chunk: the draws behind
    every interval of one `Bootstrap`, for a reference computation to repeat."""
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, chunk):
        yield rng.integers(0, n, size=(min(chunk, resamples - start), n))


def _counts(indices: np.ndarray, n: int, device: torch.device) -> torch.Tensor:
    """(chunk, n) int64 on `device`: how often each image is in each resample."""
    chunk = len(indices)
    flat = torch.from_numpy(indices).to(device) + n * torch.arange(chunk, device=device)[:, None]
    return torch.bincount(flat.ravel(), minlength=chunk * n).reshape(chunk, n)


class _Column:
    """One output's scores and 0/1 truth, sorted once (ascending) for every resample. A group is
    a run of equal scores; only the groups holding a positive image count (AUROC and AP add up
    over positives), so per resample two running sums are read at them, both weighted by how
    often each image was drawn: over all images (the one pass over every image) and over the
    positives alone. Integers, so exact."""

    def __init__(self, scores: np.ndarray, truth: np.ndarray, device: torch.device):
        order = np.argsort(scores, kind="stable")
        ordered = scores[order]
        ends = np.flatnonzero(np.r_[ordered[1:] != ordered[:-1], True])  # each group's last
        group = np.searchsorted(ends, np.arange(len(order)))  # each sorted image's group
        positive_at = np.flatnonzero(truth[order])  # sorted positions of the positives
        groups = np.unique(group[positive_at])  # the groups holding a positive
        # +1: into running sums that start with a 0 (no image yet)
        self.end = ends[groups] + 1  # all images up to a group's end
        self.end_before = np.where(groups > 0, ends[groups - 1] + 1, 0)  # up to the one below
        of_positive = group[positive_at]  # the positives' running sum, at the same places
        self.positive_end = np.searchsorted(of_positive, groups, side="right")
        self.positive_before = np.searchsorted(of_positive, groups, side="left")
        self.order = torch.from_numpy(order).to(device)
        self.positives = torch.from_numpy(order[positive_at]).to(device)
        for name in ("end", "end_before", "positive_end", "positive_before"):
            setattr(self, name, torch.from_numpy(getattr(self, name)).to(device))

    def ranking(self, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(AUROC, AP) per resample, float64, NaN where undefined. AUROC: P(score of a positive
        > score of a negative) + half the ties, from each group's positives times the negatives
        below it and half those beside it. AP: sklearn's, the sum over thresholds (each group's
        score, from the top) of the recall gained there times the precision at it (score >= it)."""
        images = _running_sum(counts, self.order)
        positives = _running_sum(counts, self.positives)
        total_images, total_positives = images[:, -1:], positives[:, -1:]
        # at and below each group holding positives, and up to the group below it
        images_end, images_before = images[:, self.end], images[:, self.end_before]
        positives_end = positives[:, self.positive_end]
        positives_before = positives[:, self.positive_before]
        in_group = positives_end - positives_before
        # negatives below the group, twice, and those in it once: twice the pairs it wins
        beside_and_below = (images_end - positives_end) + (images_before - positives_before)
        twice_pairs = (in_group * beside_and_below).sum(1).double()  # int64: exact
        above = total_images - images_before  # images at or above the group's score
        found = total_positives - positives_before  # positives among them
        precision = found.double() / above.clamp(min=1)  # 0 only where no positive is drawn
        gained = (in_group.double() * precision).sum(1)
        total_positives = total_positives[:, 0].double()
        total_negatives = total_images[:, 0].double() - total_positives
        auroc = twice_pairs / (2.0 * total_positives * total_negatives)
        ap = gained / total_positives
        auroc[(total_positives == 0) | (total_negatives == 0)] = torch.nan
        ap[total_positives == 0] = torch.nan
        return auroc, ap


def _running_sum(counts: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """(chunk, len(images) + 1) int64: how many of `images` each resample drew, cumulatively in
    their order, after a leading 0."""
    drawn = counts.index_select(1, images)
    running = counts.new_zeros(len(counts), len(images) + 1)
    torch.cumsum(drawn, 1, out=running[:, 1:])
    return running


def _percentiles(values: np.ndarray, level: float) -> np.ndarray:
    """(2, ...) low and high percentile over axis 0, ignoring NaN; NaN where all are NaN."""
    low, high = 50 * (1 - level), 50 * (1 + level)
    defined = ~np.isnan(values).all(0)
    out = np.full((2, *values.shape[1:]), np.nan)
    if defined.any():
        out[:, defined] = np.nanpercentile(values[:, defined], [low, high], axis=0)
    return out


def _macro(per_output: np.ndarray) -> np.ndarray:
    """Mean over the outputs defined in each resample (NaN when none is)."""
    defined = ~np.isnan(per_output)
    count = defined.sum(1)
    total = np.where(defined, per_output, 0.0).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def bootstrap_intervals(
    scores: torch.Tensor,
    targets: torch.Tensor,
    task: Task,
    settings: Bootstrap = Bootstrap(),
    thresholds: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> dict:
    """Intervals of one split's numbers: {"scalars": {"auroc", "ap_macro", "acc", and
    "acc_tuned" when `thresholds` are given: (low, high)}, "per_label": {"auroc", "ap": (2, L)
    arrays, low and high}}. The resamples' sums run on `device`."""
    with _one_thread_on_the_cpu(torch.device(device)):
        return _intervals(scores, targets, task, settings, thresholds, device)


@contextmanager
def _one_thread_on_the_cpu(device: torch.device) -> Iterator[None]:
    """On the CPU, torch's threads wait for each other at every operation: on a 2-core machine
    with one other busy process, the intervals at ChestMNIST's size took 12.7 s on two threads
    against 7.3 s on one (alone: 4.4 and 7.8 s; BENCHMARKS.md). One thread is the safe choice."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _intervals(
    scores: torch.Tensor,
    targets: torch.Tensor,
    task: Task,
    settings: Bootstrap,
    thresholds: torch.Tensor | None,
    device: torch.device | str,
) -> dict:
    scores = scores.detach().double().cpu()
    n, num_outputs = scores.shape
    truth = task.one_vs_rest(targets.cpu(), num_outputs).numpy()
    columns = [_Column(scores[:, k].numpy(), truth[:, k], device) for k in range(num_outputs)]
    correct = {"acc": task.correct_share(scores, targets.cpu())}
    if thresholds is not None:
        correct["acc_tuned"] = task.correct_share(scores, targets.cpu(), thresholds)
    correct = {name: share.double().to(device) for name, share in correct.items()}
    per = {"auroc": [], "ap": []}
    accuracy = {name: [] for name in correct}
    chunk = CHUNK_CPU if torch.device(device).type == "cpu" else CHUNK_GPU
    for indices in resample_indices(n, settings.resamples, settings.seed, chunk):
        counts = _counts(indices, n, device)
        aurocs, aps = zip(*(column.ranking(counts) for column in columns), strict=True)
        per["auroc"].append(torch.stack(aurocs, dim=1))
        per["ap"].append(torch.stack(aps, dim=1))
        for name, share in correct.items():
            accuracy[name].append(counts.double() @ share / n)
    per = {name: torch.cat(chunks).cpu().numpy() for name, chunks in per.items()}
    values = {"auroc": _macro(per["auroc"]), "ap_macro": _macro(per["ap"])}
    values |= {name: torch.cat(chunks).cpu().numpy() for name, chunks in accuracy.items()}
    return {
        "scalars": {
            name: tuple(_percentiles(v, settings.level).tolist()) for name, v in values.items()
        },
        "per_label": {name: _percentiles(v, settings.level) for name, v in per.items()},
    }
