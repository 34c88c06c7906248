"""A run directory's layout, and the files other commands read back, with the names of the
facts metrics.json keeps beside the test metrics (the metrics themselves are named
`<split>/<metric>[/<label>]` by the report that writes them).

    <run>/.hydra/config.yaml      the composed config (Hydra writes it); read by compare
    <run>/.hydra/overrides.yaml   the command line's overrides (Hydra writes it); read by the
                                  sweep summary
    <run>/.hydra/job_status       a multirun job's end as Hydra gave it (COMPLETED, FAILED);
                                  written and read by the sweep summary (sweep.py)
    <run>/checkpoints/            epochNNN-val_auroc*.ckpt (the best), last.ckpt
    <run>/report/metrics.json     every test number (test/auroc, test/f1/<label>, ...) and the
                                  run's facts under the names below; written by the report,
                                  read by evaluate, predict and the web page (a run's best
                                  checkpoint: checkpoints.py), by the sweep summary and by compare
    <run>/report/thresholds.json  the per-label thresholds tuned on validation, the temperatures
                                  of `calibration=temperature`, and the weights they were tuned
                                  for; written by the report, read by predict and the web page

The report's other files (per_class.csv, predictions.npz, report.md, the figures) are for
people and other tools; no command of ours reads them back.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from chest_mnist import UserError

CHECKPOINTS = "checkpoints"
CONFIG = Path(".hydra") / "config.yaml"
OVERRIDES = Path(".hydra") / "overrides.yaml"
JOB_STATUS = Path(".hydra") / "job_status"
REPORT = "report"
METRICS = "metrics.json"
THRESHOLDS = "thresholds.json"


def ckpt_path_given(value: object) -> bool:
    """Whether a command's `ckpt_path` names a checkpoint: a number does too (a sweep's job
    folders are 0, 1, ...; Hydra reads `ckpt_path=0` as one), only null and "" do not."""
    return value not in (None, "")


# metrics.json: the facts beside the test metrics
BEST_CHECKPOINT = "best_checkpoint"  # train: the checkpoint validation chose (a path, or null)
CHOSEN_BY = "best_checkpoint_chosen_by"  # train: the metric it was chosen by (val/auroc)
CHECKPOINT = "checkpoint"  # the checkpoint the numbers come from (null: weights in no file)
WEIGHTS_SHA256 = "weights_sha256"  # chest_mnist.checkpoints.weights_digest of those weights
EPOCHS_TRAINED = "epochs_trained"
TRAIN_SECONDS = "train_seconds"


DEFAULT_MONITOR = "val/auroc"  # the MedMNIST model-selection metric (callbacks/default.yaml)


def best_score_key(monitor: str) -> str:
    """metrics.json's name for the best value of the metric the checkpoint was chosen by
    (best_val/auroc by default)."""
    return f"best_{monitor}"


def best_score(metrics: dict) -> tuple[str, float | None]:
    """(the metric a run's best checkpoint was chosen by, its best value) from its metrics.json.
    A report written before CHOSEN_BY was names it only in its one best_<metric> key."""
    monitor = metrics.get(CHOSEN_BY)
    if monitor is None:
        named = [
            k for k in metrics if k.startswith("best_") and k not in (BEST_CHECKPOINT, CHOSEN_BY)
        ]
        monitor = named[0].removeprefix("best_") if len(named) == 1 else DEFAULT_MONITOR
    return monitor, metrics.get(best_score_key(monitor))


def run_of(path: Path) -> Path:
    """The run directory that holds `path`: a run, its checkpoints/, or a checkpoint in it."""
    path = Path(path)
    if path.name == CHECKPOINTS:
        return path.parent
    if path.parent.name == CHECKPOINTS:
        return path.parent.parent
    return path


def holds_a_run(folder: Path) -> bool:
    """Whether a training run has trained in `folder`: a checkpoint or a report is there. A
    run refused, or failed, before its first checkpoint leaves nothing a new run there could
    spoil but its logs (the loggers' folders are made before any data is read)."""
    folder = Path(folder)
    return any((folder / CHECKPOINTS).glob("*.ckpt")) or (folder / REPORT / METRICS).exists()


def write_metrics(report_dir: Path, metrics: dict) -> Path:
    path = Path(report_dir) / METRICS
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    return path


def read_metrics(run: Path) -> dict:
    """A run's metrics.json; FileNotFoundError or ValueError when it has none or a damaged one."""
    metrics = json.loads((Path(run) / REPORT / METRICS).read_text())
    if not isinstance(metrics, dict):
        raise ValueError(f"{Path(run) / REPORT / METRICS} holds no mapping")
    return metrics


@dataclass
class Thresholds:
    """thresholds.json: the decision rule, the per-label thresholds (None for a multi-class
    task: arg-max), the labels that kept the default and why, the temperature of each output
    when `calibration=temperature` scaled the scores the thresholds were tuned on (None: no
    scaling), and the weights they were tuned for (checkpoint file name and digest; None in
    files written before they were)."""

    rule: str
    default: float
    labels: dict[str, float] | None
    checkpoint: str | None = None
    weights_sha256: str | None = None
    kept_at_default: dict[str, str] = field(default_factory=dict)
    chosen_on: str | None = "val"
    temperatures: dict[str, float] | None = None  # the scores' scaling, one per output


def write_thresholds(report_dir: Path, thresholds: Thresholds) -> Path:
    path = Path(report_dir) / THRESHOLDS
    path.write_text(json.dumps(asdict(thresholds), indent=2) + "\n")
    return path


def read_thresholds(path: Path, labels: list[str]) -> Thresholds:
    """The thresholds.json at `path`, checked against the model's `labels`: a UserError names
    the file and what to do when it is missing or is not one for these labels. `labels` and
    `temperatures` are in the model's order; `labels` is None for a multi-class model's file."""
    try:
        data = json.loads(Path(path).read_text())
        table, temperatures = data["labels"], data.get("temperatures")
        for named in (table, temperatures):  # another model's file may hold these labels too
            if named is not None and set(named) != set(labels):
                raise ValueError(f"its labels are {', '.join(named)}")
        if temperatures is not None:
            temperatures = {label: float(temperatures[label]) for label in labels}
            if not all(0 < t < math.inf for t in temperatures.values()):
                raise ValueError("a temperature is not a finite number above 0")
        if table is not None:  # JSON allows NaN: `score > NaN` would never predict the label
            table = {label: float(table[label]) for label in labels}
            if not all(math.isfinite(t) for t in table.values()):
                raise ValueError("a threshold is not a finite number")
        return Thresholds(
            rule=data.get("rule", "f1"),
            default=float(data.get("default", 0.5)),
            labels=table,
            checkpoint=data.get("checkpoint"),
            weights_sha256=data.get("weights_sha256"),
            kept_at_default=data.get("kept_at_default") or {},
            chosen_on=data.get("chosen_on"),
            temperatures=temperatures,
        )
    except FileNotFoundError:
        raise UserError(f"thresholds={path} does not exist.") from None
    except OSError as e:  # a folder, no permission
        raise UserError(
            f"thresholds={path} cannot be read ({e.strerror}). Give the thresholds.json in the "
            f"checkpoint run's report/, or thresholds=null for 0.5."
        ) from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(
            f"thresholds={path} is not a thresholds.json for this model's labels "
            f"({', '.join(labels)}): {type(e).__name__}: {e}. Use the one in the checkpoint "
            f"run's report/, or thresholds=null for 0.5."
        ) from None
