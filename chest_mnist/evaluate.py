"""Evaluate a checkpoint: test metrics, thresholds tuned on validation, the full report.

    python -m chest_mnist.evaluate ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt
    python -m chest_mnist.evaluate ckpt_path=logs/train/runs/<run>      # its best checkpoint
    python -m chest_mnist.evaluate ckpt_path=... data.root=/mnt/medmnist   # the data moved
    python -m chest_mnist.evaluate ckpt_path=... data=synthetic        # other data, same labels
    python -m chest_mnist.evaluate ckpt_path=... thresholds.rule=youden

The data and model config travel inside the checkpoint: any key of its data config can be
replaced on the command line (`data.root=DIR`), or the whole data with a group (`data=...`).
The report goes to this evaluation's own run directory (logs/evaluate/runs/<time>/report/), so
a training run's report is never overwritten; `evaluate_model` is also what `train` calls at
its end: one code path for both.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from chest_mnist import UserError, run_files
from chest_mnist.calibration import scale, temperature_scaling
from chest_mnist.checkpoints import load_model, weights_digest
from chest_mnist.cli import freeze_for_exit, quiet_lightning, report_user_errors
from chest_mnist.config import register
from chest_mnist.data import MedMNISTDataModule
from chest_mnist.model import MedMNISTClassifier, concat_outputs
from chest_mnist.report import write_report
from chest_mnist.report_content import Report, ReportOptions, Split, build_report
from chest_mnist.report_figures import FIGURES, log_to_tensorboard, remove_figures
from chest_mnist.report_heatmaps import HEATMAPS, write_heatmap_figure
from chest_mnist.report_tables import flat_metrics

log = logging.getLogger(__name__)
register()  # before Hydra composes the config (hydra.run.dir uses the resolvers)

LogitsSplit = tuple[torch.Tensor, torch.Tensor]  # (logits, labels) of a whole split


def gather_in_rank_order(trainer: L.Trainer, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every rank's predictions, concatenated in rank order, on every rank. Each rank predicted
    its own contiguous slice of the split (DeviceBatches, or ShardSampler for a DataLoader), so
    this is the split, in order, each image once."""
    if trainer.world_size == 1:
        return tensors
    import torch.distributed as dist

    parts: list = [None] * trainer.world_size
    dist.all_gather_object(parts, tensors)
    return tuple(torch.cat([part[i] for part in parts]) for i in range(len(tensors)))


def predict_splits(
    trainer: L.Trainer, model: MedMNISTClassifier, datamodule: MedMNISTDataModule
) -> tuple[LogitsSplit, LogitsSplit]:
    """(logits, labels) of the validation and the test split, whole and in order, on every
    rank: one pass over each, with the model's weights as they are."""
    val, test = trainer.predict(model, datamodule=datamodule)
    return tuple(gather_in_rank_order(trainer, *concat_outputs(split)) for split in (val, test))


def evaluate_model(
    trainer: L.Trainer,
    model: MedMNISTClassifier,
    datamodule: MedMNISTDataModule,
    out_dir: Path,
    checkpoint: Path | None = None,
    options: ReportOptions | None = None,
    run_dir: Path | None = None,
    facts: dict | None = None,
) -> dict:
    """Predict validation and test with `model` as it is, write the report from them, and
    return its flat metrics. `checkpoint`: the file the weights are from (None: in no file);
    the report names it, with the digest of the weights evaluated. `options`: the thresholds'
    rule, the intervals, the calibration (the defaults when None). `run_dir`: the training
    run, whose TensorBoard or CSV log holds the loss curves. `facts`: the run's, for
    metrics.json (`write_report`)."""
    options = options or ReportOptions()
    check_same_labels(model, datamodule)
    val, test = predict_splits(trainer, model, datamodule)
    with torch.no_grad():
        test_loss = model.loss(test[0].to(model.device), test[1].to(model.device)).item()
    scaling = None
    if options.calibration == "temperature":
        scaling = temperature_scaling(val, test, model.task, options.per_label_temperature)
    temperature = scaling.temperature if scaling else None
    # the bootstrap's sums on the run's GPU where it had one (the model is back on the CPU)
    device = trainer.strategy.root_device
    report = build_report(
        *((model.scores(scale(logits, temperature)), labels) for logits, labels in (val, test)),
        datamodule.labels,
        datamodule.prevalence("train"),
        rule=options.rule,
        task=datamodule.task,
        loss=test_loss,
        bootstrap=options.bootstrap,
        scaling=scaling,
        bins=options.bins,
        device=device if device.type == "cuda" else "cpu",
    )
    if trainer.is_global_zero:
        remove_figures(out_dir, (*FIGURES, HEATMAPS))
        weights = {
            run_files.CHECKPOINT: str(checkpoint) if checkpoint else None,
            run_files.WEIGHTS_SHA256: weights_digest(model.state_dict()),
        }
        write_report(
            out_dir,
            report,
            datamodule.hparams.flag,
            datamodule.hparams.size,
            run_dir=run_dir,
            facts=(facts or {}) | weights,
            figures=options.figures,
            drawn=draw_heatmaps(model, datamodule, report, out_dir) if options.figures else (),
        )
        report_to_tensorboard(trainer, out_dir, report.test, datamodule)
    metrics = flat_metrics(report)
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
    log_summary(report.scalars, checkpoint, out_dir)
    return metrics


def draw_heatmaps(
    model: MedMNISTClassifier, datamodule: MedMNISTDataModule, report: Report, out_dir: Path
) -> tuple[str, ...]:
    """heatmaps.png (the file names drawn, for report.md). It needs gradients through the
    model: if that fails (out of GPU memory, say), the rest of the report is still written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return (write_heatmap_figure(model, datamodule, report, out_dir).name,)
    except (RuntimeError, ValueError) as e:
        log.warning(
            "No heatmaps.png (%s: %s); the rest of the report is written.", type(e).__name__, e
        )
        return ()


def check_same_labels(model: MedMNISTClassifier, datamodule: MedMNISTDataModule) -> None:
    """A checkpoint is evaluated only on data with its own labels, in its order."""
    if list(model.hparams.labels) != list(datamodule.labels):
        raise UserError(
            f"The model predicts {len(model.hparams.labels)} labels ({', '.join(model.hparams.labels)}) but "
            f"data.flag={datamodule.hparams.flag} has {len(datamodule.labels)} ({', '.join(datamodule.labels)}): "
            f"evaluate a checkpoint on the task it was trained for."
        )


def report_to_tensorboard(
    trainer: L.Trainer, out_dir: Path, test: Split, datamodule: MedMNISTDataModule
) -> None:
    """The report's figures and the test PR curves (from `test`, the probabilities and labels)
    into each TensorBoard log of `trainer`."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            log_to_tensorboard(
                logger.experiment,
                out_dir,
                test,
                datamodule.labels,
                datamodule.task,
                trainer.global_step,
            )


def log_summary(scalars: dict, checkpoint: Path | None, out_dir: Path) -> None:
    log.info(
        "Test AUC %.4f, ACC %.4f (constant baseline %.4f), from %s. Report: %s",
        scalars["auroc"],
        scalars["acc"],
        scalars["acc_majority"],
        checkpoint or "the weights at the end of training",
        out_dir / "report.md",
    )


def datamodule_for(data: DictConfig, saved: dict) -> MedMNISTDataModule:
    """The data to evaluate on. `data=<group>` (synthetic, chestmnist): that data. Otherwise
    (`data=from_checkpoint`, the default) the checkpoint's own data config, with each key given
    on the command line (`data.root=DIR`) in place of its saved value; but its file is never
    generated anew: a synthetic run's `data.synthetic` says how its config would have made a
    missing file, not which file it trained on, so a moved or mistyped `data.path` is an error
    rather than the report of other, new data."""
    if "_target_" in data:
        return hydra.utils.instantiate(data, _convert_="all")
    values = OmegaConf.to_container(data, resolve=True)
    given = {key: value for key, value in values.items() if not OmegaConf.is_missing(data, key)}
    return MedMNISTDataModule(**(saved | {"synthetic": None} | given))


def evaluate(cfg: DictConfig) -> dict:
    if not run_files.ckpt_path_given(cfg.get("ckpt_path")):
        raise UserError(
            "ckpt_path is missing: python -m chest_mnist.evaluate ckpt_path=<run>/checkpoints/<file>.ckpt "
            "(or ckpt_path=<run>: its best checkpoint)"
        )
    ckpt_path, model, saved_data = load_model(cfg.ckpt_path)
    log.info("Evaluating %s", ckpt_path)
    datamodule = datamodule_for(cfg.data, saved_data)
    trained_at, now = saved_data.get("size"), datamodule.hparams.size
    if trained_at is not None and now != trained_at:
        log.warning(
            "The model was trained on %dpx images and is evaluated on %dpx (data.size=%d): its "
            "numbers here are not those of the resolution it learned at.",
            trained_at,
            now,
            now,
        )
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, logger=False, enable_checkpointing=False
    )
    return evaluate_model(
        trainer,
        model,
        datamodule,
        Path(cfg.paths.output_dir) / run_files.REPORT,
        checkpoint=ckpt_path,
        options=ReportOptions.from_config(cfg),
        run_dir=run_files.run_of(ckpt_path),
    )


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    quiet_lightning()
    report_user_errors(lambda: evaluate(cfg))


if __name__ == "__main__":
    main()
    freeze_for_exit()
