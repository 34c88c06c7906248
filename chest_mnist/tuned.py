"""What a run's report tuned for one set of weights, as `predict` and the web page use it: the
per-label thresholds (report/thresholds.json) and the temperatures of `calibration=temperature`
(report/calibration.json). Both files name the weights they were made for (checkpoint and
SHA-256 of the weights): beside a checkpoint, they are used only for those weights; a
thresholds file given by hand (`thresholds=PATH`) is used as given, with the calibration.json
beside it. Thresholds tuned on temperature-scaled scores are never used without their
temperatures."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from chest_mnist import UserError
from chest_mnist.run_files import (
    CALIBRATION,
    REPORT,
    THRESHOLDS,
    read_calibration,
    read_thresholds,
    run_of,
)
from chest_mnist.task import THRESHOLD, Task


def choose_thresholds(
    cfg_thresholds: str | None,
    ckpt_path: Path,
    digest: str,
    labels: list[str],
    task: Task,
) -> tuple[list[float] | None, str]:
    """(thresholds, where they come from). The thresholds tuned for these weights (`digest`):
    the checkpoint run's report/thresholds.json when it was tuned for them, else 0.5 for every
    label, and why. A file given as `thresholds=` is used whatever it was tuned for (the
    source says when that was other weights). None for a task that tunes none (arg-max)."""
    if not task.tunes_thresholds:
        return None, "arg-max class (multi-class task)"
    if cfg_thresholds:
        path = Path(cfg_thresholds).expanduser()
        tuned = read_thresholds(path, labels)
        values = list(tuned.labels.values())  # in the model's label order
        if tuned.weights_sha256 == digest:
            return values, f"tuned on validation ({path})"
        weights = (
            f"other weights ({tuned.checkpoint or 'in no checkpoint file'})"
            if tuned.weights_sha256
            else "weights it does not name (an older thresholds.json)"
        )
        return values, f"tuned on validation for {weights}, given as thresholds={path}"
    beside = run_of(ckpt_path) / REPORT / THRESHOLDS
    if not beside.is_file():
        return [THRESHOLD] * len(labels), (
            f"{THRESHOLD} for every label (no thresholds.json next to the checkpoint: "
            f"run python -m chest_mnist.evaluate, or give thresholds=PATH)"
        )
    tuned = read_thresholds(beside, labels)
    if tuned.weights_sha256 == digest:
        return list(tuned.labels.values()), f"tuned on validation ({beside})"
    why = (
        f"{beside} was tuned for other weights ({tuned.checkpoint or 'in no checkpoint file'}), "
        f"not {ckpt_path.name}"
        if tuned.weights_sha256
        else f"{beside} does not say which weights it was tuned for"
    )
    print(
        f"warning: {why}: every label at {THRESHOLD}. To use those thresholds anyway, give "
        f"thresholds={beside}; for this checkpoint's own, python -m chest_mnist.evaluate "
        f"ckpt_path={ckpt_path}, then thresholds=<its report>/thresholds.json.",
        file=sys.stderr,
    )
    return [THRESHOLD] * len(labels), f"{THRESHOLD} for every label ({why})"


def choose_temperature(
    cfg_thresholds: str | None, ckpt_path: Path, digest: str, labels: list[str]
) -> tuple[torch.Tensor | None, str]:
    """(one temperature per output, or None; where it comes from): the calibration.json beside
    the thresholds in use (the checkpoint run's report/, or the folder of `thresholds=PATH`),
    under the same rule as `choose_thresholds`. A UserError when those thresholds were tuned
    on temperature-scaled scores and their calibration.json is missing."""
    if cfg_thresholds:
        folder, given = Path(cfg_thresholds).expanduser().parent, True
    else:
        folder, given = run_of(ckpt_path) / REPORT, False
    path = folder / CALIBRATION
    if not path.is_file():
        thresholds = folder / THRESHOLDS
        if thresholds.is_file() and _calibrated(thresholds, labels):
            raise UserError(
                f"{thresholds} was tuned on temperature-scaled scores, but {path} is missing: "
                f"restore it, or evaluate the checkpoint again (calibration=temperature)."
            )
        return None, "none (the model's own probabilities)"
    calibration = read_calibration(path, labels)
    if given or calibration.weights_sha256 == digest:
        temperatures = torch.tensor(list(calibration.temperatures.values()))
        return temperatures, f"temperature scaling fitted on validation ({path})"
    return None, f"none ({path} was fitted for other weights, not {Path(ckpt_path).name})"


def _calibrated(path: Path, labels: list[str]) -> bool:
    try:
        return read_thresholds(path, labels).calibrated
    except UserError:  # not one for these labels: choose_thresholds says so, or it is unused
        return False
