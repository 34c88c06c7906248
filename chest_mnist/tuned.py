"""What a run's report tuned for one set of weights, as `predict` and the web page use it:
report/thresholds.json holds the per-label thresholds and, with `calibration=temperature`, the
temperatures the scores were scaled by before the thresholds were tuned on them. One file, one
set of weights (named by checkpoint and SHA-256): beside a checkpoint it is used only for
those weights; a file given by hand (`thresholds=PATH`) is used as given. The thresholds and
the temperatures always come from the same file, so a threshold is never applied to scores
scaled otherwise than the ones it was tuned on."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from chest_mnist import UserError
from chest_mnist.run_files import REPORT, THRESHOLDS, Thresholds, read_thresholds, run_of
from chest_mnist.task import THRESHOLD, Task

NO_SCALING = "none (the model's own probabilities)"


@dataclass(frozen=True)
class Tuned:
    """The thresholds (None: arg-max), the temperature of each output (None: no scaling), and
    where each comes from, in words for the output."""

    thresholds: list[float] | None
    temperature: torch.Tensor | None
    thresholds_from: str
    calibration_from: str


def choose_tuned(
    cfg_thresholds: str | None, ckpt_path: Path, digest: str, labels: list[str], task: Task
) -> Tuned:
    """The thresholds and temperatures tuned for these weights (`digest`): the checkpoint run's
    report/thresholds.json when it was tuned for them, else 0.5 for every label and no scaling,
    and why. A file given as `thresholds=` is used whatever it was tuned for (the sources say
    when that was other weights). A multi-class task has no thresholds (arg-max), but its
    temperature comes from the same file by the same rule."""
    if cfg_thresholds:
        path = Path(cfg_thresholds).expanduser()
        tuned = read_thresholds(path, labels)
        if tuned.weights_sha256 == digest:
            return _from_file(tuned, path, f"tuned on validation ({path})", task)
        weights = (
            f"other weights ({tuned.checkpoint or 'in no checkpoint file'})"
            if tuned.weights_sha256
            else "weights it does not name (an older thresholds.json)"
        )
        return _from_file(
            tuned, path, f"tuned on validation for {weights}, given as thresholds={path}", task
        )
    beside = run_of(ckpt_path) / REPORT / THRESHOLDS
    if not beside.is_file():
        return _untuned(
            labels,
            task,
            "no thresholds.json next to the checkpoint: run python -m chest_mnist.evaluate, "
            "or give thresholds=PATH",
        )
    tuned = read_thresholds(beside, labels)
    if tuned.weights_sha256 == digest:
        return _from_file(tuned, beside, f"tuned on validation ({beside})", task)
    why = (
        f"{beside} was tuned for other weights ({tuned.checkpoint or 'in no checkpoint file'}), "
        f"not {ckpt_path.name}"
        if tuned.weights_sha256
        else f"{beside} does not say which weights it was tuned for"
    )
    print(
        f"warning: {why}: every label at {THRESHOLD}, no temperature scaling. To use that file "
        f"anyway, give thresholds={beside}; for this checkpoint's own, python -m "
        f"chest_mnist.evaluate ckpt_path={ckpt_path}, then thresholds=<its report>/thresholds.json.",
        file=sys.stderr,
    )
    return _untuned(labels, task, why)


def _from_file(tuned: Thresholds, path: Path, source: str, task: Task) -> Tuned:
    temperature = None
    calibration = NO_SCALING
    if tuned.temperatures is not None:
        temperature = torch.tensor(list(tuned.temperatures.values()))
        calibration = f"temperature scaling fitted on validation ({path})"
    if not task.tunes_thresholds:
        return Tuned(None, temperature, "arg-max class (multi-class task)", calibration)
    if tuned.labels is None:
        raise UserError(
            f"thresholds={path} is a multi-class model's (no thresholds: the arg-max class), not "
            f"one for this model's labels; use the one in the checkpoint run's report/, or "
            f"thresholds=null for 0.5."
        )
    return Tuned(list(tuned.labels.values()), temperature, source, calibration)


def _untuned(labels: list[str], task: Task, why: str) -> Tuned:
    if not task.tunes_thresholds:
        return Tuned(None, None, "arg-max class (multi-class task)", NO_SCALING)
    return Tuned(
        [THRESHOLD] * len(labels), None, f"{THRESHOLD} for every label ({why})", NO_SCALING
    )
