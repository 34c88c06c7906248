"""The values the configs compute (`${precision_for:...}`, `${epochs_at:...}`, the run
directory of a resumed run), as OmegaConf resolvers. `register()` makes them known, with the
config schemas of `chest_mnist.schema`; every entry point calls it when it is imported (Hydra
resolves `hydra.run.dir` before the command's own code runs), and the tests' conftest calls it
before composing a config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import ListConfig, OmegaConf

from chest_mnist import UserError
from chest_mnist.run_files import CHECKPOINTS, ckpt_path_given, holds_a_run, run_of
from chest_mnist.schema import register_schemas


def uses_gpu(accelerator: str) -> bool:
    """Whether `trainer.accelerator` trains on a CUDA GPU here (auto: where there is one)."""
    return accelerator in ("gpu", "cuda") or (
        accelerator == "auto" and torch.cuda.device_count() > 0
    )


def precision_for(accelerator: str) -> str:
    """bf16 mixed precision where a GPU will be used, full fp32 on the CPU."""
    return "bf16-mixed" if uses_gpu(accelerator) else "32-true"


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
    if task_name != "train" or not ckpt_path_given(ckpt_path):
        return None
    path = Path(str(ckpt_path)).expanduser()
    return str(run_of(path)) if path.parent.name == CHECKPOINTS else None


def run_dir(task_name: str, ckpt_path: str | None, fresh: str) -> str:
    """hydra.run.dir: the resumed run's own directory, else `fresh`."""
    return resumed_run(task_name, ckpt_path) or fresh


# the folders in .hydra/ for a config kept beside the run folder's own: a resume's, and one
# that train refuses (and then removes: train.forget_refused_config)
CONFIG_ASIDE = ("resumed_", "refused_")


def config_subdir(
    task_name: str, ckpt_path: str | None, now: str, mode: Any = None, run: str | None = None
) -> str:
    """hydra.output_subdir: `.hydra`, or `.hydra/resumed_<time>` when a run is resumed in its own
    directory, so the config the run was started with is kept; `.hydra/refused_<time>` for a
    new training run, or a sweep's job, in a directory `run` (the job's own: Hydra's
    runtime.output_dir) where another has trained (`holds_a_run`), which train refuses, and
    removes that folder again. A multirun's jobs (`mode`, Hydra's RunMode) each have a
    directory of their own, resumed from a checkpoint or not: `.hydra`, where the sweep's
    summary and compare read them."""
    resumed, refused = CONFIG_ASIDE
    if resumed_run(task_name, ckpt_path) and not str(mode).endswith("MULTIRUN"):
        return f".hydra/{resumed}{now}"
    if task_name == "train" and run is not None and holds_a_run(Path(run)):
        return f".hydra/{refused}{now}"
    return ".hydra"


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A config's values by their dotted Hydra names (model.optimizer.lr), from nested dicts
    (`OmegaConf.to_container`); an empty mapping has no key."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat |= (
            flatten(value, f"{prefix}{key}.")
            if isinstance(value, dict)
            else {f"{prefix}{key}": value}
        )
    return flat


def synthetic_file(size: int, given) -> str:
    """data=synthetic's default file name: its settings in it, so that other settings (a sweep
    over data.synthetic.seed) make other files (`chest_mnist.synthetic.file_name`)."""
    from chest_mnist.synthetic import file_name

    return file_name(size, {} if given is None else OmegaConf.to_container(given))


RESOLVERS = {
    "precision_for": precision_for,
    "run_dir": run_dir,
    "config_subdir": config_subdir,
    # a ListConfig, not a list: OmegaConf.resolve (`--cfg job --resolve`) cannot put a plain
    # list where the interpolation's string was
    "epochs_at": lambda total, *fractions: ListConfig(epochs_at(total, *fractions)),
    "synthetic_file": synthetic_file,
}


def register() -> None:
    """Make the resolvers above known to OmegaConf and the schemas to Hydra (again: a no-op)."""
    for name, resolver in RESOLVERS.items():
        OmegaConf.register_new_resolver(name, resolver, replace=True)
    register_schemas()
