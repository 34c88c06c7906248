"""Checkpoints: find a run's best, load one safely, rebuild the model, and name its weights.

Every command goes through here: train (resume, and the best checkpoint it tests), evaluate
and predict. A checkpoint is loaded with `weights_only=True`, so a file that would run code is
refused. `weights_digest` names the weights a number was computed from: the report's
thresholds.json carries it, and predict uses those thresholds only for the same weights.
"""

from __future__ import annotations

import hashlib
import inspect
import pickle
from pathlib import Path
from typing import NoReturn

import torch

from chest_mnist import UserError
from chest_mnist.model import MedMNISTClassifier
from chest_mnist.run_files import BEST_CHECKPOINT, CHECKPOINTS, read_metrics, run_of

CHECKPOINT_KEYS = ("state_dict", "hyper_parameters", "datamodule_hyper_parameters")


def _first_error_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if "Unsupported global" in line]
    return lines[0] if lines else str(error).splitlines()[0]


def resolve_checkpoint(path: str | Path) -> Path:
    """`ckpt_path` as given when it is a file; for a run directory (or its checkpoints/) the
    run's best checkpoint: the one its report names, else its only epochNNN-*.ckpt."""
    path = Path(str(path)).expanduser()  # a number too: a sweep's job folders are 0, 1, ...
    if not path.is_dir():
        return path
    run = run_of(path)
    folder = run / CHECKPOINTS
    try:  # by name: the report holds the path of when it was written; the run may have moved
        named = read_metrics(run).get(BEST_CHECKPOINT)
    except (OSError, ValueError):
        named = None
    if named and (folder / Path(named).name).is_file():
        return folder / Path(named).name
    best = sorted(folder.glob("epoch*.ckpt"))
    if len(best) == 1:
        return best[0]
    found = ", ".join(p.name for p in sorted(folder.glob("*.ckpt"))) or "no .ckpt file"
    raise UserError(
        f"ckpt_path={path} is a folder, and {folder} does not hold one best checkpoint "
        f"(found: {found}). Give a run directory with one epochNNN-*.ckpt, or a file: "
        f"ckpt_path={folder}/<file>.ckpt."
    )


def load_checkpoint(path: str | Path) -> dict:
    """A chest_mnist checkpoint as a dict, loaded with `weights_only=True`: a file that holds
    code to run is refused, not executed."""
    path = Path(path).expanduser()
    if path.is_dir():
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        raise UserError(
            f"ckpt_path={path} is a folder; give a checkpoint file, e.g. "
            f"ckpt_path={folder / 'last.ckpt'} (the latest state, what training resumes from)."
        )
    if not path.is_file():
        raise UserError(
            f"ckpt_path={path} does not exist. Checkpoints are in <run>/checkpoints/ "
            f"(best: epochNNN-val_auroc*.ckpt, latest: last.ckpt)."
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise UserError(
                f"ckpt_path={path} holds objects other than weights and plain values, which are "
                f"refused so that a checkpoint cannot run code ({_first_error_line(e)})."
            ) from e
        raise UserError(
            f"ckpt_path={path} is not a readable PyTorch checkpoint; it may be truncated "
            f"or not a checkpoint at all ({e})."
        ) from e
    except Exception as e:  # a damaged file fails in many ways (zip, pickle, storage errors)
        raise UserError(
            f"ckpt_path={path} is not a readable PyTorch checkpoint; it may be truncated "
            f"or not a checkpoint at all ({type(e).__name__}: {e})."
        ) from e
    missing = [
        key for key in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint
    ]
    if missing:
        raise UserError(
            f"ckpt_path={path} is not a chest_mnist checkpoint (no {', '.join(missing)}); "
            f"use one written by python -m chest_mnist.train."
        )
    return checkpoint


def model_from_checkpoint(checkpoint: dict, path: str | Path = "") -> MedMNISTClassifier:
    """The trained model, uncompiled: torch.compile pays off over a training run, not for one
    pass of evaluation or prediction (and the weights' names are the same either way). Built
    without ImageNet's weights (model.pretrained), which the checkpoint's replace: no download.
    `path`, the checkpoint's file, names it in the error of one that does not fit the model."""
    hparams = checkpoint["hyper_parameters"] | {"compile": False, "pretrained": False}
    unknown = sorted(set(hparams) - set(inspect.signature(MedMNISTClassifier).parameters))
    if unknown:
        _not_this_model(path, f"settings this model does not have: {', '.join(unknown)}")
    model = MedMNISTClassifier(**hparams)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as e:  # missing, unexpected or differently shaped weights
        _not_this_model(path, " ".join(str(e).split())[:300])
    return model


def _not_this_model(path: str | Path, why: str) -> NoReturn:
    raise UserError(
        f"ckpt_path={path or '?'} is not a checkpoint of this version of chest_mnist's model "
        f"({why}); use one written by python -m chest_mnist.train."
    )


def load_model(ckpt_path: str | Path) -> tuple[Path, MedMNISTClassifier, dict]:
    """(the checkpoint file, its model, its data config) for `ckpt_path` as evaluate and predict
    take it: a file, or a run directory (its best checkpoint). The rest of the checkpoint (the
    optimizer's state) is freed on return."""
    path = resolve_checkpoint(ckpt_path)
    checkpoint = load_checkpoint(path)
    return path, model_from_checkpoint(checkpoint, path), checkpoint["datamodule_hyper_parameters"]


def load_weights(model: MedMNISTClassifier, path: str | Path) -> MedMNISTClassifier:
    """`model` with the weights of the checkpoint at `path` (as saved: with EMA, the average)."""
    model.load_state_dict(load_checkpoint(path)["state_dict"])
    return model


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a model's weights: names, dtypes, shapes and values, in name order. The same
    weights give the same digest wherever they are (file, CPU, GPU)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def holds_training_state(checkpoint: dict) -> bool:
    """Whether training can continue from `checkpoint`: the optimizer's and the loops' state
    are in it (last.ckpt), not the weights only (the best checkpoint)."""
    return "optimizer_states" in checkpoint and "loops" in checkpoint


def saved_milestones(checkpoint: dict) -> list[int] | None:
    """The epochs of the learning-rate steps a checkpoint's MultiStepLR will take, or None."""
    states = checkpoint.get("lr_schedulers") or [{}]
    if "milestones" not in states[0]:
        return None
    return sorted(states[0]["milestones"].elements())
