"""What every command line entry point shares: the config resolvers, and turning a UserError
into one clear line on stderr and exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf

from chest_mnist import UserError


def precision_for(accelerator: str) -> str:
    """bf16 mixed precision where a GPU will be used, full fp32 on the CPU."""
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if on_gpu else "32-true"


def epochs_at(total: int, *fractions: float) -> list[int]:
    """Epoch numbers at fractions of the run: MultiStepLR milestones that follow max_epochs
    (the epoch in which each fraction falls: 50 and 75 of 100). Never epoch 0: MultiStepLR
    would apply that step before the first batch, and a short run would train at lr x0.01."""
    if total == -1:
        raise UserError(
            "trainer.max_epochs=-1 (no limit), but the learning-rate steps are set at fractions "
            "of max_epochs (model.scheduler.milestones). Give them in epochs, e.g. "
            "model.scheduler.milestones=[50,75], or train without steps: model.scheduler=null."
        )
    return [max(1, int(total * fraction)) for fraction in fractions]


def resumed_run(task_name: str, ckpt_path: str | None) -> str | None:
    """The run directory that `train ckpt_path=<run>/checkpoints/<file>.ckpt` continues, or
    None (a new run). Evaluate and predict always write into a directory of their own."""
    if task_name != "train" or not ckpt_path:
        return None
    path = Path(ckpt_path).expanduser()
    return str(path.parent.parent) if path.parent.name == "checkpoints" else None


def run_dir(task_name: str, ckpt_path: str | None, fresh: str) -> str:
    """hydra.run.dir: the resumed run's own directory, else `fresh`."""
    return resumed_run(task_name, ckpt_path) or fresh


def config_subdir(task_name: str, ckpt_path: str | None, now: str) -> str:
    """hydra.output_subdir: `.hydra`, or `.hydra/resumed_<time>` when a run is resumed, so the
    config the run was started with is kept."""
    return f".hydra/resumed_{now}" if resumed_run(task_name, ckpt_path) else ".hydra"


OmegaConf.register_new_resolver("precision_for", precision_for, replace=True)
OmegaConf.register_new_resolver("run_dir", run_dir, replace=True)
OmegaConf.register_new_resolver("config_subdir", config_subdir, replace=True)
OmegaConf.register_new_resolver("epochs_at", epochs_at, replace=True)


def resolve_device(name: str, option: str = "device=") -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N`, checked against this machine. `option` spells the
    setting in messages: "device=" (Hydra commands) or "--device " (bench)."""
    said = f"{option}{name}"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"{said} is not a device: use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise UserError(
                f"{said}, but this machine has no CUDA GPU that torch can use: "
                f"use {option}cpu or {option}auto."
            )
        if device.index is not None and device.index >= count:
            raise UserError(
                f"{said}, but this machine has {count} GPU(s): cuda:0 to cuda:{count - 1}."
            )
    elif device.type != "cpu":
        raise UserError(f"{said} is not a device for this: use auto, cpu, cuda or cuda:N.")
    return device


def find_user_error(error: BaseException | None) -> UserError | None:
    """The UserError behind `error`, also when Hydra's instantiate wrapped it."""
    while error is not None and not isinstance(error, UserError):
        error = error.__cause__ or error.__context__
    return error


def report_user_errors(run: Callable[[], object]) -> object:
    """Run `run()`; a UserError anywhere inside becomes `error: <message>` and exit code 2.

    In a multirun the error is raised on instead: Hydra marks that job failed and runs the
    others (an exit would end the whole sweep)."""
    try:
        return run()
    except Exception as e:
        user_error = find_user_error(e)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        if _in_multirun():
            raise user_error from None
        raise SystemExit(2) from None


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
