"""What the command line entry points share: the device option, turning a UserError into one
clear line on stderr and exit code 2, a console without Lightning's chatter, and a quick exit."""

from __future__ import annotations

import gc
import logging
import sys
import warnings
from collections.abc import Callable

import torch

from chest_mnist import UserError


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
        _to_log_files(f"error: {user_error}")
        if _in_multirun():
            raise user_error from None
        raise SystemExit(2) from None


def _to_log_files(line: str) -> None:
    """`line` into the log files (Hydra's <task>.log in the run's folder), not the console,
    which has it already: the log of a run that stopped says why."""
    record = logging.makeLogRecord(
        {"name": __name__, "levelno": logging.ERROR, "levelname": "ERROR", "msg": line}
    )
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


# Lines Lightning prints that tell a user of this project nothing: an advertisement, and a
# note that it did not add a second model summary next to ours
LIGHTNING_CHATTER = ("💡 Tip:", "Trainer already configured with model summary callbacks")


class _DropChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(LIGHTNING_CHATTER)


def quiet_lightning() -> None:
    """Keep the console for what a user watches (the progress bar, the results, the report's
    path): Lightning's chatter and a deprecation inside Lightning itself (`_pytree`: nothing a
    user of this project can act on) are left out. Call it once logging is set up (Hydra's)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropChatter())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def freeze_for_exit() -> None:
    """Call as a command's last line: collect the garbage there is now (its finalizers run, as
    at any exit), then freeze what is still alive, so that the interpreter's own collections
    while it shuts down skip it (about 540,000 objects of torch's, Lightning's and ours after a
    training run). On 2 cores a small training run ended 1.6 to 2.2 s after its last log line,
    and 0.6 to 0.7 s frozen (BENCHMARKS.md, "A command's exit"). What is alive at the call is
    not collected at the exit, so nothing may rely on a collection then to finish a file: the
    commands have written theirs by now (train finalizes its loggers), and logging's handlers
    and other atexit handlers run as before."""
    gc.collect()
    gc.freeze()
