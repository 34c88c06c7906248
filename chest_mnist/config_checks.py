"""What a training config is checked for before any data is made: values that would fail
later or silently do nothing, the rules that span several keys, the devices asked for, and a
checkpoint to resume from. The data module and the model check their own keys when they are
built (`check_job` builds them, reading no data). `train` calls `check_before_training`; a
sweep calls `check_job` on every job before it starts one."""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path

import hydra
import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, ListConfig, OmegaConf

from chest_mnist import UserError, cuda_graphs
from chest_mnist.checkpoints import holds_training_state, load_checkpoint, saved_milestones
from chest_mnist.config import uses_gpu
from chest_mnist.model import OPTIMIZER_CLASS, check_compile
from chest_mnist.run_files import CHECKPOINTS, ckpt_path_given, holds_a_run, run_of

log = logging.getLogger(__name__)


def check_before_training(cfg: DictConfig) -> None:
    """`check_config`, and for a resumed run (`ckpt_path`) `check_resumable`: a missing,
    damaged or unsafe checkpoint is refused up front."""
    check_config(cfg)
    check_new_run_folder(cfg)
    if ckpt_path_given(cfg.get("ckpt_path")):
        check_resumable(str(cfg.ckpt_path), cfg)


def check_new_run_folder(cfg: DictConfig) -> None:
    """A run into a folder where another has trained (`hydra.run.dir=` an earlier run's) is
    refused: its checkpoints, TensorBoard events and report would mix with that run's (the
    loss curves drew both). Resuming that run there is what ckpt_path= does. Checked by the
    first process only: under DDP the others start when it has begun the run."""
    folder = Path(cfg.paths.output_dir).expanduser()
    if rank_zero_only.rank != 0 or not holds_a_run(folder):
        return
    ckpt_path = cfg.get("ckpt_path")
    resumed = run_of(Path(str(ckpt_path)).expanduser()) if ckpt_path_given(ckpt_path) else None
    if resumed is not None and resumed.resolve() == folder.resolve():
        return  # the run resumed in its own folder
    last = folder / CHECKPOINTS / "last.ckpt"
    raise UserError(
        f"{folder} holds a run already (its checkpoints or report): a new run there would "
        f"mix its files with that one's. "
        + (f"Resume that run with ckpt_path={last}, or give" if last.exists() else "Give")
        + " the new one a folder of its own (each run, and each sweep, gets a new one unless "
        "hydra.run.dir or hydra.sweep.dir says otherwise)."
    )


def check_report_options(cfg: DictConfig) -> None:
    """The report's thresholds, bootstrap and calibration keys, refused before training rather
    than after it (one temperature per output needs a sigmoid task)."""
    from medmnist import INFO

    from chest_mnist.calibration import check_per_label
    from chest_mnist.report_content import ReportOptions
    from chest_mnist.task import Task

    options = ReportOptions.from_config(cfg)
    flag = cfg.get("data", {}).get("flag")
    if options.calibration == "temperature" and flag in INFO:
        check_per_label(Task.from_medmnist(INFO[flag]["task"]), options.per_label_temperature)


def check_config(cfg: DictConfig, check_devices: bool = True) -> None:
    """Values that would fail later, or silently do nothing, refused before any data is loaded.
    (The data module and the model check their own keys, e.g. data.size, when they are built:
    `check_job` builds them too.)"""
    check_report_options(cfg)
    seed = cfg.get("seed")  # Lightning would fail on "abc", and train with seed 0 for -1
    whole = not isinstance(seed, bool) and str(seed).strip().isdigit()  # "42": ${oc.env:SEED}
    if seed is not None and not (whole and int(str(seed)) < 2**32):
        raise UserError(
            f"seed={seed!r} must be a whole number from 0 to {2**32 - 1} (or null: a random "
            f"one, which the log names)."
        )
    lr = cfg.model.get("optimizer", {}).get("lr")
    # a bool is an int to Python: lr=true would train at 1.0, max_epochs=true for one epoch
    if lr is not None and (isinstance(lr, bool) or not (isinstance(lr, int | float) and lr > 0)):
        raise UserError(
            f"model.optimizer.lr={lr!r} must be a number above 0 (the protocol's is 1e-3)."
        )
    epochs = cfg.trainer.get("max_epochs")  # null: Lightning's 1,000, which no milestone follows
    if epochs != -1 and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise UserError(
            f"trainer.max_epochs={epochs!r} must be a whole number of at least 1 (or -1: no limit)."
        )
    if "_target_" not in cfg.data:
        raise UserError(
            "data=from_checkpoint is for evaluate (the data a checkpoint was trained on); "
            "training needs a dataset: data=chestmnist (the default) or data=synthetic."
        )
    callbacks = cfg.get("callbacks") or {}
    if "early_stopping" in callbacks and "model_checkpoint" not in callbacks:
        raise UserError(
            "callbacks=early_stopping holds only the early-stopping callback: no checkpoints, no "
            "progress bar. Add it to a whole set: callbacks=[default,early_stopping]."
        )
    loggers = [entry for entry in (cfg.get("logger") or {}).values() if entry]
    if not loggers and callbacks.get("lr_monitor"):
        raise UserError(
            "There is no logger (~logger), but callbacks.lr_monitor writes the learning rate "
            "to one. Remove it too (~logger ~callbacks.lr_monitor), or keep a logger: "
            "logger=tensorboard, logger=csv or logger=[tensorboard,csv]."
        )
    if check_devices:
        check_devices_exist(cfg.trainer.get("accelerator", "auto"), cfg.trainer.get("devices", 1))
    check_cuda_graph(cfg, on_this_machine=check_devices)


def check_cuda_graph(cfg: DictConfig, on_this_machine: bool = True) -> None:
    """model.cuda_graph=true or step where the config says no graph can be made (the CPU,
    several processes, accumulated gradients, a compile mode with graphs of its own) or, for
    step, what the whole step would leave out (clipping, 16-bit loss scaling, another
    optimizer): refused before any data or sweep job, by the rules the model applies when
    training begins (`cuda_graphs.wanted`, `why_not_whole_step`). The module's and callbacks'
    gradient hooks are known only then. `on_this_machine`: false for jobs that run elsewhere
    (a sweep's SLURM jobs), whose GPUs are not this machine's: only an accelerator set to the
    CPU and an explicit number of devices count there."""
    model = cfg.get("model") or {}
    setting = model.get("cuda_graph", "auto")
    if setting not in (True, "step"):
        return  # auto and false refuse nothing; a typo is the model's to name
    compile_mode = model.get("compile", False)
    check_compile(compile_mode)  # a typo named as one, not as a compiled network
    trainer = cfg.trainer
    accelerator = trainer.get("accelerator", "auto")
    if not isinstance(accelerator, str):  # an Accelerator object: Lightning's to judge
        on_gpu = True
    else:
        on_gpu = uses_gpu(accelerator) if on_this_machine else accelerator != "cpu"
    devices = _devices(trainer.get("devices", 1))
    if devices in ("auto", -1):
        devices = torch.cuda.device_count() if on_gpu and on_this_machine else 1
    processes = (devices if isinstance(devices, int) else len(devices)) * int(
        trainer.get("num_nodes") or 1
    )
    whole_step = setting == "step"
    cuda_graphs.wanted(
        setting,
        torch.device("cuda" if on_gpu else "cpu"),
        world_size=processes,
        compile_mode=False if compile_mode == "auto" else compile_mode,  # as the model does
        accumulate_grad_batches=trainer.get("accumulate_grad_batches") or 1,
        whole_step=whole_step,
    )
    if whole_step:
        precision = str(trainer.get("precision"))
        cuda_graphs.check_whole_step(
            trainer.get("gradient_clip_val"),
            "16-mixed" if precision == "16" else precision,  # Lightning reads 16 so
            # a class that cannot be found is named when the model is built
            _located((model.get("optimizer") or {}).get("_target_")) or torch.optim.Adam,
        )


def _located(target: str | None) -> type | None:
    """The class `target` ("torch.optim.Adam") names, or None where there is none."""
    module, _, name = str(target).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _devices(devices: int | str | list) -> int | str | list:
    """`trainer.devices` as a number, a list or "auto": Lightning's strings "2", "-1" and "0,1"
    read as it reads them."""
    if isinstance(devices, str) and devices.strip() != "auto":
        devices = devices.strip()
        if "," in devices:
            return [d for d in devices.split(",") if d.strip()]
        return int(devices) if devices.lstrip("-").isdigit() else [devices]
    return devices.strip() if isinstance(devices, str) else devices


def check_devices_exist(accelerator: str, devices: int | str | list) -> None:
    """`trainer.devices` asks for no more GPUs (or CPU processes) than this machine has."""
    devices = _devices(devices)
    if devices == "auto" or devices == -1:
        return
    if isinstance(devices, bool) or not isinstance(devices, int | list | ListConfig):
        raise UserError(
            f"trainer.devices={devices!r} must be a number of devices, a list of device "
            f"indices, or auto."
        )
    wanted = len(devices) if not isinstance(devices, int) else devices
    if wanted < 1:
        raise UserError(f"trainer.devices={devices!r} must ask for at least one device.")
    gpus = torch.cuda.device_count()
    on_gpu = uses_gpu(accelerator)
    if on_gpu and wanted > gpus:
        raise UserError(
            f"trainer.devices={devices} asks for {wanted} GPUs but this machine has {gpus}. "
            + (
                f"Use trainer.devices={gpus} (or fewer)."
                if gpus
                else "Train on the CPU with trainer=cpu (or trainer.accelerator=cpu)."
            )
        )
    cores = os.cpu_count() or 1
    if not on_gpu and accelerator in ("cpu", "auto") and wanted > cores:
        raise UserError(
            f"trainer.devices={devices} asks for {wanted} CPU processes but this machine has "
            f"{cores} cores. Use trainer.devices={cores} (or fewer)."
        )


def check_job(cfg: DictConfig, check_devices: bool = True) -> None:
    """Everything `train` would refuse before loading data: `check_config`, then build the data
    module and the model (which check their own keys; neither reads data). A sweep runs this on
    each job's values before it starts any job."""
    check_config(cfg, check_devices=check_devices)
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    hydra.utils.instantiate(
        cfg.model, labels=datamodule.labels, task=datamodule.medmnist_task, _convert_="all"
    )


def check_resumable(ckpt_path: str, cfg: DictConfig | None = None) -> None:
    """Refuse, before any data is made, a checkpoint that training cannot continue from; say
    when its learning-rate steps are not those of `cfg` (which the resumed run will not use)."""
    checkpoint = load_checkpoint(ckpt_path)
    if not holds_training_state(checkpoint):
        raise UserError(
            f"ckpt_path={ckpt_path} holds the weights only (the best checkpoint is saved that "
            f"way), not the optimizer and loop state that training continues from. Resume from "
            f"{Path(ckpt_path).parent / 'last.ckpt'}; to evaluate these weights, use "
            f"python -m chest_mnist.evaluate ckpt_path={ckpt_path}."
        )
    if cfg is not None:
        check_same_optimizer(ckpt_path, checkpoint, cfg)
    changed = changed_since(checkpoint, cfg) if cfg is not None else {}
    fixed = [key for key in FIXED_KEYS if key in changed]
    if "model.pos_weight" in changed and None in changed["model.pos_weight"]:
        fixed.append("model.pos_weight")  # the buffer is in the weights, or is not
    if fixed:
        raise UserError(
            f"ckpt_path={ckpt_path} was trained with "
            f"{', '.join(f'{key}={changed[key][0]!r}' for key in fixed)}; its weights cannot "
            f"go on with {', '.join(f'{key}={changed[key][1]!r}' for key in fixed)}. Resume "
            f"with the run's own values, or train a new run (without ckpt_path)."
        )
    if changed:
        log.warning(
            "Resuming %s with other settings than the run it continues: %s. The run is no "
            "longer the one it started as.",
            ckpt_path,
            "; ".join(
                f"{key} {then!r} -> {now!r} "
                + ("(the saved value is kept)" if key.startswith(SAVED_KEPT) else "(takes effect)")
                for key, (then, now) in changed.items()
            ),
        )
    scheduler = cfg.model.get("scheduler") if cfg is not None else None
    saved = saved_milestones(checkpoint)
    if not scheduler or "milestones" not in scheduler or saved is None:
        return
    configured = sorted(scheduler.milestones)
    if saved != configured:
        log.warning(
            "Resuming continues the learning-rate schedule saved in %s: lr steps at epochs %s, "
            "not at %s as this config (trainer.max_epochs=%s) would set for a new run.",
            ckpt_path,
            saved,
            configured,
            cfg.trainer.get("max_epochs"),
        )


def check_same_optimizer(ckpt_path: str, checkpoint: dict, cfg: DictConfig) -> None:
    """Another optimizer class than the checkpoint's is refused: its saved state does not fit
    (SGD fails on Adam's, AdamW would silently take Adam's settings). A checkpoint from before
    the class was saved is not checked."""
    saved, target = (
        checkpoint.get(OPTIMIZER_CLASS),
        OmegaConf.select(cfg, "model.optimizer._target_"),
    )
    if saved is None or target is None:
        return
    try:
        same = hydra.utils.get_class(saved) is hydra.utils.get_class(target)
    except Exception:  # no such class here: Hydra names the key when it builds the optimizer
        same = saved.rsplit(".", 1)[-1] == target.rsplit(".", 1)[-1]
    if not same:
        raise UserError(
            f"ckpt_path={ckpt_path} was trained with the optimizer {saved}; its saved state "
            f"cannot go on with model.optimizer._target_={target}. Resume with the run's own "
            f"optimizer, or train a new run (without ckpt_path)."
        )


# what a resumed run would learn differently with: the keys of the checkpoint's data module and
# model (Lightning saves their hyperparameters), and of its optimizer's saved state
RECIPE_KEYS = {
    "datamodule_hyper_parameters": (
        "data",
        (
            "flag",
            "size",
            "path",
            "subset",
            "batch_size",
            "augment",
            "max_shift",
            "drop_last",
            "mean",
            "std",
        ),
    ),
    "hyper_parameters": ("model", ("stem", "pos_weight", "label_smoothing")),
}
OPTIMIZER_KEYS = {
    "initial_lr": "model.optimizer.lr",
    "weight_decay": "model.optimizer.weight_decay",
}
# how the update is computed, where null lets PyTorch (or the CUDA-graph step) choose: a
# resumed run keeps the saved choice, which is named only where the config makes one
PYTORCH_CHOOSES = ("fused", "foreach", "capturable")
# what the checkpoint restores whatever the config says: the optimizer's settings (its state's
# param_groups), and pos_weight, a buffer of the model's
SAVED_KEPT = ("model.optimizer.", "model.pos_weight")
# what the saved weights cannot go on without: the labels (the head), the first convolution
FIXED_KEYS = ("data.flag", "model.stem")


def changed_since(checkpoint: dict, cfg: DictConfig) -> dict[str, tuple]:
    """{key: (saved, now)} for each setting of the recipe that `cfg` gives another value than
    the run saved in `checkpoint` had (none from a checkpoint without them)."""
    pairs = [
        (f"{group}.{key}", checkpoint[saved][key], OmegaConf.select(cfg, f"{group}.{key}"))
        for saved, (group, keys) in RECIPE_KEYS.items()
        if saved in checkpoint
        for key in keys
        if key in checkpoint[saved]
    ]
    groups = checkpoint.get("optimizer_states", [{}])[0].get("param_groups", [])
    pairs += [
        (key, groups[0][saved], OmegaConf.select(cfg, key))
        for saved, key in OPTIMIZER_KEYS.items()
        if groups and saved in groups[0]
    ]
    optimizer = OmegaConf.select(cfg, "model.optimizer") or {}
    # the rest of its settings (betas, eps, momentum...), restored from its state; "lr" there is
    # the scheduled rate of the moment, not the configured one (initial_lr is)
    pairs += [
        (f"model.optimizer.{key}", groups[0][key], optimizer[key])
        for key in optimizer
        if groups
        and key in groups[0]
        and key not in ("lr", *OPTIMIZER_KEYS)
        and not (key in PYTORCH_CHOOSES and optimizer[key] is None)
    ]
    changed = {}
    for key, then, now in pairs:
        if OmegaConf.is_config(now):  # a ListConfig (pos_weight) as the list the checkpoint holds
            now = OmegaConf.to_object(now)
        if isinstance(then, tuple):  # Adam's betas are a tuple in its state, a list in a config
            then = list(then)
        if then != now:
            changed[key] = (then, now)
    return changed
