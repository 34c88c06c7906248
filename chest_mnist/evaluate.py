"""Evaluate a checkpoint: test metrics, thresholds tuned on validation, the full report.

    python -m chest_mnist.evaluate ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt
    python -m chest_mnist.evaluate ckpt_path=... data=synthetic        # other data, same labels
    python -m chest_mnist.evaluate ckpt_path=... thresholds.rule=youden

The data and model config travel inside the checkpoint; `data=...` replaces the data. The
report goes to this evaluation's own run directory (logs/evaluate/runs/<time>/report/), so a
training run's report is never overwritten; `evaluate_model` is also what `train` calls at
its end: one code path for both.
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig

from chest_mnist import UserError
from chest_mnist.config import report_user_errors
from chest_mnist.data import MedMNISTDataModule
from chest_mnist.model import MedMNISTClassifier, concat_outputs
from chest_mnist.report import build_report, flat_metrics, log_to_tensorboard, write_report

log = logging.getLogger(__name__)

CHECKPOINT_KEYS = ("state_dict", "hyper_parameters", "datamodule_hyper_parameters")


def _first_error_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if "Unsupported global" in line]
    return lines[0] if lines else str(error).splitlines()[0]


def resolve_checkpoint(path: str | Path) -> Path:
    """`ckpt_path` as given when it is a file; for a run directory (or its checkpoints/) the
    run's best checkpoint: the one its report names, else its only epochNNN-*.ckpt."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return path
    run = path.parent if path.name == "checkpoints" else path
    folder = run / "checkpoints"
    try:  # by name: the report holds the path of when it was written; the run may have moved
        named = json.loads((run / "report" / "metrics.json").read_text()).get("best_checkpoint")
    except (OSError, ValueError, AttributeError):
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


def model_from_checkpoint(checkpoint: dict) -> MedMNISTClassifier:
    """The trained model, uncompiled: torch.compile pays off over a training run, not for one
    pass of evaluation or prediction (and the weights' names are the same either way)."""
    model = MedMNISTClassifier(**(checkpoint["hyper_parameters"] | {"compile": False}))
    model.load_state_dict(checkpoint["state_dict"])
    return model


def gather_in_rank_order(trainer: L.Trainer, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every rank's predictions, concatenated in rank order, on every rank. Each rank predicted
    its own contiguous slice of the split (DeviceBatches, or ShardSampler for a DataLoader), so this is the split, in order, each
    image once."""
    if trainer.world_size == 1:
        return tensors
    import torch.distributed as dist

    parts: list = [None] * trainer.world_size
    dist.all_gather_object(parts, tensors)
    return tuple(torch.cat([part[i] for part in parts]) for i in range(len(tensors)))


def evaluate_model(
    trainer: L.Trainer,
    model: MedMNISTClassifier,
    datamodule: MedMNISTDataModule,
    out_dir: Path,
    ckpt_path: str | None = None,
    rule: str = "f1",
    run_dir: Path | None = None,
    extra: dict | None = None,
) -> dict:
    """Test `model` (or the weights at `ckpt_path`), predict val, write the report from the
    test run's and val's probabilities; return the report's flat metrics. `run_dir`: the
    training run, whose TensorBoard or CSV log holds the loss curves."""
    if list(model.hparams.labels) != list(datamodule.labels):
        raise UserError(
            f"The model predicts {len(model.hparams.labels)} labels ({', '.join(model.hparams.labels)}) but "
            f"data.flag={datamodule.hparams.flag} has {len(datamodule.labels)} ({', '.join(datamodule.labels)}): "
            f"evaluate a checkpoint on the task it was trained for."
        )
    # one pass over each split: test metrics, test/loss and the test half of the report come
    # from trainer.test; validation (for the thresholds) from trainer.predict
    trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path)
    test = gather_in_rank_order(trainer, *model.test_predictions())
    datamodule.predict_splits = ("val",)
    try:
        val_batches = trainer.predict(model, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        datamodule.predict_splits = ("val", "test")
    val = gather_in_rank_order(trainer, *concat_outputs(val_batches))
    report = build_report(
        val,
        test,
        datamodule.labels,
        datamodule.prevalence("train"),
        rule=rule,
        task=datamodule.task,
    )
    if trainer.is_global_zero:
        write_report(
            out_dir,
            report,
            val,
            test,
            datamodule.labels,
            datamodule.hparams.flag,
            datamodule.hparams.size,
            run_dir=run_dir,
            extra=extra,
        )
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
    metrics = flat_metrics(report)
    per_label = {k: v for k, v in metrics.items() if k.count("/") == 2 or k.endswith("_tuned")}
    for (
        logger
    ) in trainer.loggers:  # per-label and tuned numbers: to TensorBoard, not the printed table
        logger.log_metrics(per_label, step=trainer.global_step)
    return metrics


def evaluate(cfg: DictConfig) -> dict:
    if not cfg.get("ckpt_path"):
        raise UserError(
            "ckpt_path is missing: python -m chest_mnist.evaluate ckpt_path=<run>/checkpoints/<file>.ckpt "
            "(or ckpt_path=<run>: its best checkpoint)"
        )
    ckpt_path = resolve_checkpoint(cfg.ckpt_path)
    log.info("Evaluating %s", ckpt_path)
    checkpoint = load_checkpoint(ckpt_path)
    if cfg.get("data"):
        datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    else:
        datamodule = MedMNISTDataModule(**checkpoint["datamodule_hyper_parameters"])
    model = model_from_checkpoint(checkpoint)
    del checkpoint
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, logger=False, enable_checkpointing=False
    )
    run_dir = ckpt_path.parent.parent
    return evaluate_model(
        trainer,
        model,
        datamodule,
        Path(cfg.paths.output_dir) / "report",
        rule=cfg.thresholds.rule,
        run_dir=run_dir,
        extra={"checkpoint": str(ckpt_path)},
    )


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    report_user_errors(lambda: evaluate(cfg))


if __name__ == "__main__":
    main()
