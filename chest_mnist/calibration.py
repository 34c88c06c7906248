"""How far the probabilities are from the frequencies they claim, and temperature scaling.

Expected calibration error (ECE) is torchmetrics' (`binary_calibration_error`, norm "l1"):
the scores are put in BINS equal-width bins over [0, 1], and ECE is the mean over the bins,
weighted by their share of the scores, of |mean score - share of positives|. Per label it is
that label's column against its truth (one class against the rest for a multi-class task);
overall it pools every (image, label) pair of a multi-label or binary task, and is the
top-label ECE of a multi-class one (each image's highest score against whether its class is
the true one: what torchmetrics' `multiclass_calibration_error` computes).

Temperature scaling (Guo et al. 2017, https://arxiv.org/abs/1706.04599) divides the logits by
a temperature T > 0 fitted on validation to minimise the task's loss without smoothing (BCE, or
cross-entropy): one T for all outputs, or one per label of a sigmoid task, within T_RANGE. On
a sigmoid task it moves no logit across 0 and keeps each label's ranking, so AUROC, AP and
every decision at 0.5 stay as they are, but for float32 rounding (two nearly equal scores may
tie on one side of the scaling only). On a multi-class task's softmax it keeps each image's
arg-max class (so its decisions and ACC), but not a class's order of scores across images:
AUROC and AP change, and the report gives them before and after. The probabilities, the ECE,
the NLL and the tuned thresholds' values change. `calibration=temperature` turns it on
(conf/calibration/), and the report's thresholds.json carries the temperatures to `predict`
with the thresholds tuned after them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torchmetrics.functional.classification import binary_calibration_error

from chest_mnist import UserError
from chest_mnist.task import Task

BINS = 15  # torchmetrics' default, and Guo et al.'s
# The temperatures a fit may reach, and why it may want to go further: a label its scores say
# nothing about has its least NLL as T runs to infinity (every score towards 0.5), and one that
# validation separates as T runs to 0 (every score towards 0 or 1); there float32 rounding ties
# the scores, and AUROC, AP and the decisions at 0.5 would move. A fit at a bound is named in
# the report. (A model of near-zero logits, trained a step or two, may want T under 0.05.)
T_RANGE = (0.05, 20.0)
METHODS = ("none", "temperature")


def describe_bins(bins: int = BINS) -> str:
    return f"{bins} equal-width bins over [0, 1], weighted by the share of scores in each (L1)"


def pooled(scores: Tensor, targets: Tensor, task: Task) -> tuple[Tensor, Tensor]:
    """The (confidence, truth) pairs the overall ECE bins, on the CPU: the task's
    `calibration_pairs` (every (image, label) score, or each image's top score); in words
    `task.words.pooled`."""
    return task.calibration_pairs(scores.detach().float().cpu(), targets.cpu())


def calibration_errors(
    scores: Tensor, targets: Tensor, task: Task, bins: int = BINS
) -> tuple[float, Tensor]:
    """(overall ECE, (L,) ECE per output) of probabilities `scores` (N, L); see the module's
    docstring for what "overall" pools. NaN for a split with no images."""
    scores = scores.detach().float().cpu()
    truth = task.one_vs_rest(targets.cpu(), scores.shape[1])
    if len(scores) == 0:
        return float("nan"), torch.full((scores.shape[1],), float("nan"))
    per_output = torch.stack(
        [
            binary_calibration_error(
                scores[:, k].contiguous(), truth[:, k].contiguous(), n_bins=bins
            )
            for k in range(scores.shape[1])
        ]
    )
    # for a softmax task, the top-label pairs: what multiclass_calibration_error bins
    overall = binary_calibration_error(*pooled(scores, targets, task), n_bins=bins)
    return overall.item(), per_output.float()


def reliability_bins(scores: Tensor, truth: Tensor, bins: int = BINS) -> dict[str, np.ndarray]:
    """The reliability diagram's points, in the ECE's bins: for each bin with scores, its mean
    score ("confidence"), its share of positives ("frequency") and its number of scores."""
    scores = scores.detach().float().reshape(-1).cpu()
    # torchmetrics' binning: edges in the scores' dtype, a score on an edge in the bin above,
    # a score of exactly 1 in a bin of its own
    edges = torch.linspace(0, 1, bins + 1, dtype=scores.dtype)
    which = (torch.bucketize(scores, edges, right=True) - 1).numpy()
    scores = scores.double().numpy()
    truth = truth.reshape(-1).cpu().numpy().astype(np.float64)
    count = np.bincount(which, minlength=bins + 1)
    used = count > 0
    confidence = np.bincount(which, scores, minlength=bins + 1)[used] / count[used]
    frequency = np.bincount(which, truth, minlength=bins + 1)[used] / count[used]
    return {"confidence": confidence, "frequency": frequency, "count": count[used]}


def negative_log_likelihood(logits: Tensor, targets: Tensor, task: Task) -> float:
    """The task's loss without smoothing or weights: BCE per label, or cross-entropy."""
    with torch.no_grad():
        return task.loss(logits.float(), targets, None, 0.0).item()


def check_per_label(task: Task, per_label: bool) -> None:
    """A UserError for one temperature per output of a softmax, which would reorder classes."""
    if per_label and not task.independent_outputs:
        raise UserError(
            "calibration.per_label=true fits one temperature per sigmoid output; a multi-class "
            "task's softmax takes one temperature: set calibration.per_label=false."
        )


def fit_temperature(logits: Tensor, targets: Tensor, task: Task, per_label: bool) -> Tensor:
    """Temperatures minimising the validation NLL of `logits / T` for T in T_RANGE: (L,) with
    `per_label` (a sigmoid task), else (1,). Exact: each label's NLL is its own and convex in
    1/T, so its slope there is found by bisection, or is of one sign over the whole range and
    the fit is a bound (`at_bound`). With `per_label`, a label
    with no positives or no negatives in validation keeps T = 1 (`kept_at_one`): its NLL falls
    without bound as T shrinks, which would only push its scores to 0 or 1."""
    check_per_label(task, per_label)
    if len(logits) == 0:
        raise UserError(
            "calibration=temperature needs validation images to fit on; there are none."
        )
    logits, targets = logits.detach().float().cpu(), targets.cpu()
    if not per_label:
        return _fit(logits, targets, task, 1)
    temperature = torch.ones(logits.shape[1])
    fitted = ~kept_at_one(targets, task, logits.shape[1])
    if fitted.any():
        temperature[fitted] = _fit(logits[:, fitted], targets[:, fitted], task, int(fitted.sum()))
    return temperature


def kept_at_one(targets: Tensor, task: Task, num_outputs: int) -> Tensor:
    """(L,) bools: the outputs whose validation labels are all one value (no T to fit)."""
    positives, negatives = task.label_counts(targets, num_outputs)
    return (positives == 0) | (negatives == 0)


def _fit(logits: Tensor, targets: Tensor, task: Task, count: int) -> Tensor:
    """The `count` temperatures (1, or one per column of a sigmoid task's `logits`): bisection
    of the NLL's slope in b = 1/T, which rises with b, on log b, in float64."""
    logits = logits.double()
    low = torch.full((count,), -math.log(T_RANGE[1]), dtype=torch.float64)  # log b at T's top
    high = torch.full((count,), -math.log(T_RANGE[0]), dtype=torch.float64)
    rising_at_low = task.temperature_slope(logits, targets, low.exp()) >= 0  # least NLL at T's top
    falling_at_high = task.temperature_slope(logits, targets, high.exp()) <= 0  # at T's bottom
    for _ in range(64):  # log b's range (6.0) halved 64 times: below float64's resolution
        middle = (low + high) / 2
        rising = task.temperature_slope(logits, targets, middle.exp()) > 0
        high, low = torch.where(rising, middle, high), torch.where(rising, low, middle)
    temperature = (-(low + high) / 2).exp().float()
    temperature[rising_at_low] = T_RANGE[1]
    temperature[falling_at_high] = T_RANGE[0]
    return temperature


def at_bound(temperature: Tensor) -> Tensor:
    """Bools, like `temperature`: the fits that stopped at a bound of T_RANGE."""
    return (temperature <= T_RANGE[0]) | (temperature >= T_RANGE[1])


def scale(logits: Tensor, temperature: Tensor | None) -> Tensor:
    """`logits / temperature` (one per output, or one for all); the logits when None."""
    if temperature is None:
        return logits
    return logits / temperature.to(logits.device, logits.dtype)


@dataclass
class TemperatureScaling:
    """What `calibration=temperature` did: the temperatures, and the NLL and the probabilities
    before it (the report's ECE and reliability diagram show both)."""

    temperature: Tensor  # (L,) or (1,)
    per_label: bool
    nll: dict[str, float]  # {"val_before", "val_after", "test_before", "test_after"}
    test_before: Tensor  # test probabilities without scaling


def temperature_scaling(
    val: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], task: Task, per_label: bool
) -> TemperatureScaling:
    """Fit on the validation (logits, labels) `val`, measure on both splits."""
    temperature = fit_temperature(*val, task, per_label)
    nll = {}
    for name, (logits, targets) in (("val", val), ("test", test)):
        nll[f"{name}_before"] = negative_log_likelihood(logits, targets, task)
        nll[f"{name}_after"] = negative_log_likelihood(scale(logits, temperature), targets, task)
    return TemperatureScaling(temperature, per_label, nll, task.scores(test[0].float()))
