"""Train ResNet-18 on ChestMNIST, test the best checkpoint, write the report.

    python -m chest_mnist.train                                  # MedMNIST v2 protocol, 100 epochs
    python -m chest_mnist.train data=synthetic trainer.max_epochs=2   # offline
    python -m chest_mnist.train -m model.optimizer.lr=1e-4,1e-3       # a learning-rate sweep

Hydra composes chest_mnist/conf/train.yaml; a run writes into its own directory under logs/train/:
.hydra/ (the composed config), checkpoints/ (best val AUROC and last), tensorboard/, and
report/ (metrics.json, per_class.csv, thresholds.json, report.md, figures, predictions: see
chest_mnist/report.py).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, ListConfig, OmegaConf

from chest_mnist import UserError, run_files
from chest_mnist.checkpoints import load_checkpoint, load_weights
from chest_mnist.cli import quiet_lightning, report_user_errors
from chest_mnist.config import register_resolvers
from chest_mnist.evaluate import evaluate_model

log = logging.getLogger(__name__)
register_resolvers()  # before Hydra composes the config (hydra.run.dir uses them)


def _instantiate_all(group: DictConfig | None) -> list:
    """Each entry of a config group with a `_target_` (callbacks, loggers), in order."""
    if not group:
        return []
    return [
        hydra.utils.instantiate(entry) for entry in group.values() if entry and "_target_" in entry
    ]


def check_config(cfg: DictConfig, check_devices: bool = True) -> None:
    """Values that would fail later, or silently do nothing, refused before any data is loaded.
    (The data module and the model check their own keys, e.g. data.size, when they are built:
    `check_job` builds them too.)"""
    lr = cfg.model.get("optimizer", {}).get("lr")
    if lr is not None and not (isinstance(lr, int | float) and lr > 0):
        raise UserError(
            f"model.optimizer.lr={lr!r} must be a number above 0 (the protocol's is 1e-3)."
        )
    epochs = cfg.trainer.get("max_epochs")
    if epochs is not None and epochs != -1 and (not isinstance(epochs, int) or epochs < 1):
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


def check_devices_exist(accelerator: str, devices: int | str | list) -> None:
    """`trainer.devices` asks for no more GPUs (or CPU processes) than this machine has."""
    if isinstance(devices, str) and devices != "auto":  # Lightning's "2", "-1" or "0,1"
        if "," in devices:
            devices = [d for d in devices.split(",") if d.strip()]
        else:
            devices = int(devices) if devices.lstrip("-").isdigit() else [devices]
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
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and gpus > 0)
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
        cfg.model, labels=datamodule.labels, task=datamodule.task, _convert_="all"
    )


def check_resumable(ckpt_path: str, cfg: DictConfig | None = None) -> None:
    """Refuse, before any data is made, a checkpoint that training cannot continue from; say
    when its learning-rate steps are not those of `cfg` (which the resumed run will not use)."""
    checkpoint = load_checkpoint(ckpt_path)
    if "optimizer_states" not in checkpoint or "loops" not in checkpoint:
        raise UserError(
            f"ckpt_path={ckpt_path} holds the weights only (the best checkpoint is saved that "
            f"way), not the optimizer and loop state that training continues from. Resume from "
            f"{Path(ckpt_path).parent / 'last.ckpt'}; to evaluate these weights, use "
            f"python -m chest_mnist.evaluate ckpt_path={ckpt_path}."
        )
    scheduler = cfg.model.get("scheduler") if cfg is not None else None
    states = checkpoint.get("lr_schedulers") or [{}]
    if not scheduler or "milestones" not in scheduler or "milestones" not in states[0]:
        return
    saved, configured = sorted(states[0]["milestones"].elements()), sorted(scheduler.milestones)
    if saved != configured:
        log.warning(
            "Resuming continues the learning-rate schedule saved in %s: lr steps at epochs %s, "
            "not at %s as this config (trainer.max_epochs=%s) would set for a new run.",
            ckpt_path,
            saved,
            configured,
            cfg.trainer.get("max_epochs"),
        )


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, test the best checkpoint, write `report/`; return the logged metrics.

    The order is fixed: datamodule, model, callbacks, loggers, trainer. Tests call this directly.
    """
    started = time.perf_counter()
    check_config(cfg)
    if cfg.get("ckpt_path"):  # resuming: a missing, damaged or unsafe file is refused up front
        check_resumable(cfg.ckpt_path, cfg)
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)

    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data, _convert_="all")
    model: L.LightningModule = hydra.utils.instantiate(
        cfg.model, labels=datamodule.labels, task=datamodule.task, _convert_="all"
    )
    callbacks = _instantiate_all(cfg.get("callbacks"))
    loggers = _instantiate_all(cfg.get("logger"))
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}

    if cfg.get("test"):
        checkpoint = trainer.checkpoint_callback
        best = checkpoint.best_model_path if checkpoint else ""
        if not best:
            log.warning(
                "No best checkpoint (no validation ran?): testing the weights at the end of training."
            )
        extra = {
            run_files.BEST_CHECKPOINT: best or None,
            run_files.EPOCHS_TRAINED: trainer.current_epoch,
            run_files.TRAIN_SECONDS: round(time.perf_counter() - started, 1),
        }
        if best and checkpoint.best_model_score is not None:
            score = float(checkpoint.best_model_score)
            extra[run_files.best_score_key(checkpoint.monitor)] = score
        metrics |= {name: value for name, value in extra.items() if isinstance(value, float)}
        if best:  # the weights validation chose, as saved (with EMA: the average)
            load_weights(model, best)
        metrics |= evaluate_model(
            trainer,
            model,
            datamodule,
            output_dir / run_files.REPORT,
            checkpoint=Path(best) if best else None,
            rule=cfg.thresholds.rule,
            run_dir=output_dir,
            extra=extra,
        )
    for logger in loggers:  # the report's last TensorBoard writes: flush and close the files
        logger.finalize("success")
    _end_distributed()
    return metrics


def _end_distributed() -> None:
    """Under DDP, wait for every rank (rank 0 writes the report), then close the process group:
    a rank that exits with gloo's threads still up can abort ("terminate called without an
    active exception") and take the others down with it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    quiet_lightning()
    try:
        metrics = report_user_errors(lambda: train(cfg))
    except SIGTERMException:  # a SystemExit with no code: it would exit 0
        raise SystemExit(128 + signal.SIGTERM) from None  # last.ckpt is saved (LastCheckpoint)
    # the value a Hydra sweeper (e.g. Optuna) optimises: the best epoch's, when the
    # checkpoint was chosen by that metric, else the last epoch's
    name = cfg.get("optimized_metric")
    return metrics.get(run_files.best_score_key(name), metrics.get(name)) if name else None


if __name__ == "__main__":
    main()
