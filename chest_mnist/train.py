"""Train ResNet-18 on ChestMNIST, test the best checkpoint, write the report.

    python -m chest_mnist.train                                  # MedMNIST v2 protocol, 100 epochs
    python -m chest_mnist.train data=synthetic trainer.max_epochs=2   # offline
    python -m chest_mnist.train -m model.optimizer.lr=1e-4,1e-3       # a learning-rate sweep

Hydra composes conf/train.yaml; a run writes into its own directory under logs/train/:
.hydra/ (the composed config), checkpoints/ (best val AUROC and last), tensorboard/, and
report/ (metrics.json, per_class.csv, loss_curves.png, confusion_matrices.png, predictions.npz).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from chest_mnist import UserError
from chest_mnist.report import write_report

log = logging.getLogger(__name__)


def _precision_for(accelerator: str) -> str:
    """bf16 mixed precision where a GPU will be used, full fp32 on the CPU."""
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if on_gpu else "32-true"


def _epochs_at(total: int, *fractions: float) -> list[int]:
    """Epoch numbers at fractions of the run: MultiStepLR milestones that follow max_epochs."""
    return [int(total * fraction) for fraction in fractions]


OmegaConf.register_new_resolver("precision_for", _precision_for, replace=True)
OmegaConf.register_new_resolver("epochs_at", _epochs_at, replace=True)


def _instantiate_all(group: DictConfig | None) -> list:
    """Each entry of a config group with a `_target_` (callbacks, loggers), in order."""
    if not group:
        return []
    return [
        hydra.utils.instantiate(entry) for entry in group.values() if entry and "_target_" in entry
    ]


def find_user_error(error: BaseException | None) -> UserError | None:
    """The UserError behind `error`, also when Hydra's instantiate wrapped it."""
    while error is not None and not isinstance(error, UserError):
        error = error.__cause__ or error.__context__
    return error


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, test the best checkpoint, write `report/`; return the logged metrics."""
    started = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)

    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data, _convert_="all")
    model: L.LightningModule = hydra.utils.instantiate(
        cfg.model, labels=datamodule.labels, _convert_="all"
    )
    callbacks = _instantiate_all(cfg.get("callbacks"))
    loggers = _instantiate_all(cfg.get("logger"))
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}

    if cfg.get("test"):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if not best:
            log.warning(
                "No best checkpoint (no validation ran?): testing the weights at the end of training."
            )
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None)
        metrics.update({name: float(value) for name, value in trainer.callback_metrics.items()})
        if trainer.is_global_zero:
            extra = {
                "test/loss": metrics.get("test/loss"),
                "best_checkpoint": best or None,
                "best_val_auroc": float(trainer.checkpoint_callback.best_model_score)
                if best and trainer.checkpoint_callback.best_model_score is not None
                else None,
                "epochs_trained": trainer.current_epoch,
                "train_seconds": round(time.perf_counter() - started, 1),
            }
            write_report(
                output_dir / "report",
                model.test_report,
                model.test_predictions,
                datamodule.labels,
                tensorboard_dir=output_dir / "tensorboard",
                extra=extra,
            )
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except Exception as e:
        user_error = find_user_error(e)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        raise SystemExit(2) from None
    # the value a Hydra sweeper (e.g. Optuna) optimises
    return metrics.get(cfg.get("optimized_metric")) if cfg.get("optimized_metric") else None


if __name__ == "__main__":
    main()
