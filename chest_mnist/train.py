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
import shutil
import signal
import time
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from chest_mnist import UserError, run_files
from chest_mnist.checkpoints import load_weights
from chest_mnist.cli import freeze_for_exit, quiet_lightning, report_user_errors
from chest_mnist.config import CONFIG_ASIDE, register
from chest_mnist.config_checks import check_before_training
from chest_mnist.evaluate import evaluate_model
from chest_mnist.loggers import log_config
from chest_mnist.report_content import ReportOptions

log = logging.getLogger(__name__)
register()  # before Hydra composes the config (hydra.run.dir uses the resolvers)


def _instantiate_all(group: DictConfig | None) -> list:
    """Each entry of a config group with a `_target_` (callbacks, loggers), in order."""
    if not group:
        return []
    return [
        hydra.utils.instantiate(entry) for entry in group.values() if entry and "_target_" in entry
    ]


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, test the best checkpoint, write `report/`; return the logged metrics.

    The order is fixed: datamodule, model, callbacks, loggers, trainer. Tests call this directly.
    """
    started = time.perf_counter()
    model = None
    try:
        check_before_training(cfg)
        L.seed_everything(cfg.seed, workers=True)
        datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data, _convert_="all")
        model = hydra.utils.instantiate(
            cfg.model, labels=datamodule.labels, task=datamodule.medmnist_task, _convert_="all"
        )
        callbacks = _instantiate_all(cfg.get("callbacks"))
        loggers = _instantiate_all(cfg.get("logger"))
        trainer: L.Trainer = hydra.utils.instantiate(
            cfg.trainer, callbacks=callbacks, logger=loggers
        )
        overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
        log_config(loggers, OmegaConf.to_container(cfg, resolve=True), overrides)
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    except UserError:
        if model is None or not model.began_training:  # refused by its checks, or its data
            forget_refused_config()
        raise
    output_dir = Path(cfg.paths.output_dir)
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}

    if cfg.get("test"):
        checkpoint = trainer.checkpoint_callback
        best = checkpoint.best_model_path if checkpoint else ""
        if not best:
            log.warning(
                "No best checkpoint (no validation ran?): testing the weights at the end of training."
            )
        facts = {
            run_files.BEST_CHECKPOINT: best or None,
            run_files.CHOSEN_BY: checkpoint.monitor if best else None,
            run_files.EPOCHS_TRAINED: trainer.current_epoch,
            run_files.TRAIN_SECONDS: round(time.perf_counter() - started, 1),
        }
        if best and checkpoint.best_model_score is not None:
            score = float(checkpoint.best_model_score)
            facts[run_files.best_score_key(checkpoint.monitor)] = score
        metrics |= {name: value for name, value in facts.items() if isinstance(value, float)}
        if best:  # the weights validation chose, as saved (with EMA: the average)
            load_weights(model, best)
        metrics |= evaluate_model(
            trainer,
            model,
            datamodule,
            output_dir / run_files.REPORT,
            checkpoint=Path(best) if best else None,
            options=ReportOptions.from_config(cfg),
            run_dir=output_dir,
            facts=facts,
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


def forget_refused_config() -> None:
    """The config Hydra saved for a run refused before its first step (by its checks, or by its
    data as the fit begins), where `config.config_subdir` put it beside another run's
    (`.hydra/resumed_<time>` beside the run it resumes, `.hydra/refused_<time>` in a folder
    where another run has trained): removed, so that what is left there is the runs that
    trained. Nothing else: not a run's own `.hydra`, nor an output_subdir the user set."""
    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    subdir = Path(hydra_cfg.output_subdir or ".hydra")
    if subdir.parent == Path(".hydra") and subdir.name.startswith(CONFIG_ASIDE):
        shutil.rmtree(Path(hydra_cfg.runtime.output_dir) / subdir, ignore_errors=True)


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
    freeze_for_exit()
