"""The `report/` folder of a run, written the same way by `train` and `evaluate`.

From the validation and test predictions of one checkpoint: per-label thresholds are tuned
on validation (never on test) and applied to test; every decision metric is reported at 0.5
(MedMNIST's ACC) and at the tuned thresholds, next to the all-negative baseline.

    metrics.json       every test number, and the run's facts (checkpoint, epochs)  } formats:
    thresholds.json    the tuned thresholds and their weights, for `predict`     } run_files.py
    per_class.csv      one row per label
    predictions.npz    val and test scores and labels
    report.md          a summary to read, with the figures:
    confusion_matrices.png, roc_curves.png, pr_curves.png, loss_curves.png
    <flag>_test_[AUC]..._[ACC]...@<run>.csv   MedMNIST's standard result file
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import numpy as np
import torch
from torchmetrics.functional.classification import binary_precision_recall_curve, binary_roc

from chest_mnist import run_files
from chest_mnist.metrics import (
    DECISIONS,
    MULTI_LABEL,
    THRESHOLD,
    evaluate_predictions,
    is_multiclass,
    majority_accuracy,
    tune_thresholds,
)
from chest_mnist.npz import size_suffix
from chest_mnist.plots import (
    plot_class_confusion,
    plot_confusion_matrices,
    plot_loss_curves,
    plot_pr_curves,
    plot_roc_curves,
)

log = logging.getLogger(__name__)

LOSS_CURVES = ("train/loss", "val/loss")
# scalars that no threshold changes: reported once, not again as "<name>_tuned"
THRESHOLD_FREE = (
    "auroc",
    "auroc_labels",
    "ap_macro",
    "ap_macro_labels",
    "acc_all_negative",
    "n_images",
)


def read_loss_curves(tensorboard_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Per-epoch train and val loss from a run's TensorBoard event files, as {tag: (epochs, values)}.

    Lightning logs an `epoch` scalar at each step where it logs, which maps steps to epochs.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not Path(tensorboard_dir).is_dir():
        raise FileNotFoundError(f"{tensorboard_dir} does not exist")
    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # it logs every file it opens
    events = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0}).Reload()
    tags = set(events.Tags()["scalars"])
    missing = [tag for tag in (*LOSS_CURVES, "epoch") if tag not in tags]
    if missing:
        raise FileNotFoundError(f"{tensorboard_dir} has no TensorBoard scalars {missing}")
    epoch_at_step = {event.step: int(event.value) for event in events.Scalars("epoch")}
    curves = {}
    for tag in LOSS_CURVES:
        points = {
            epoch_at_step.get(e.step, e.step): e.value for e in events.Scalars(tag)
        }  # last write wins
        epochs = sorted(points)
        curves[tag] = (epochs, [points[e] for e in epochs])
    return curves


def read_loss_curves_csv(metrics_csv: Path) -> dict[str, tuple[list[int], list[float]]]:
    """The same curves from the metrics.csv of `logger=csv` (one row per logging step, with
    its `epoch`); for an epoch logged twice (a resumed run), the last row wins."""
    if not Path(metrics_csv).is_file():
        raise FileNotFoundError(f"{metrics_csv} does not exist")
    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0]) if rows else set()
    missing = [tag for tag in (*LOSS_CURVES, "epoch") if tag not in columns]
    if missing:
        raise FileNotFoundError(f"{metrics_csv} has no columns {missing}")
    curves = {}
    for tag in LOSS_CURVES:
        try:
            points = {
                int(float(row["epoch"])): float(row[tag])
                for row in rows
                if row[tag] and row["epoch"]
            }
        except (TypeError, ValueError) as e:  # an edited or cut file: no curves, the rest stays
            raise FileNotFoundError(
                f"{metrics_csv} has a {tag} or epoch that is no number ({e})"
            ) from e
        epochs = sorted(points)
        curves[tag] = (epochs, [points[e] for e in epochs])
    return curves


def read_run_loss_curves(run_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """A run's loss curves from its TensorBoard log (`<run>/tensorboard`), else from its CSV
    log (`<run>/csv/metrics.csv`, `logger=csv`)."""
    run_dir = Path(run_dir)
    try:
        return read_loss_curves(run_dir / "tensorboard")
    except FileNotFoundError as no_tensorboard:
        try:
            return read_loss_curves_csv(run_dir / "csv" / "metrics.csv")
        except FileNotFoundError as no_csv:
            raise FileNotFoundError(f"{no_tensorboard}; {no_csv}") from None


def build_report(
    val: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    labels: list[str],
    prevalence_train: torch.Tensor,
    rule: str = "f1",
    task: str = MULTI_LABEL,
) -> dict:
    """Every metric on `test` = (scores, targets): at 0.5 and at thresholds tuned on `val`, or
    at the arg-max class for a multi-class task (no thresholds to tune). The constant baseline
    is chosen on the training split's `prevalence_train`."""
    multiclass = is_multiclass(task)
    thresholds, kept = (None, {}) if multiclass else tune_thresholds(*val, rule=rule)
    threshold_notes = {labels[k]: reason for k, reason in kept.items()}
    for label, reason in threshold_notes.items():
        log.warning("%s keeps the threshold %s: %s.", label, THRESHOLD, reason)
    at_half = evaluate_predictions(*test, labels, task=task)
    tuned = None if multiclass else evaluate_predictions(*test, labels, thresholds, task=task)
    scalars = dict(at_half["scalars"])
    scalars["acc_majority"] = majority_accuracy(test[1], prevalence_train, task)
    for name, value in (tuned["scalars"] if tuned else {}).items():
        if name not in THRESHOLD_FREE:
            scalars[f"{name}_tuned"] = value
    rows = []
    for k, half in enumerate(at_half["per_label"]):
        row = {"label": half["label"], "prevalence_train": float(prevalence_train[k])}
        row |= {
            "prevalence_test": half["prevalence"],
            "support": half["support"],
            "auroc": half["auroc"],
            "ap": half["ap"],
        }
        row |= {name: half[name] for name in DECISIONS}
        counts = half
        if tuned:
            best = counts = tuned["per_label"][k]
            row["threshold"] = best["threshold"]
            row |= {f"{name}_tuned": best[name] for name in DECISIONS}
        row |= {
            name: counts[name] for name in ("tn", "fp", "fn", "tp")
        }  # at the tuned threshold, if any
        rows.append(row)
    return {
        "scalars": scalars,
        "per_label": rows,
        "task": task,
        "thresholds": thresholds,
        "rule": "argmax" if multiclass else rule,
        "threshold_notes": threshold_notes,
        "confusion_tuned": tuned["confusion"] if tuned else None,
        "confusion": at_half["confusion"],
    }


def flat_metrics(report: dict, split: str = "test") -> dict[str, float]:
    """The report's numbers under TensorBoard-style names: test/auroc, test/f1/<label>, ..."""
    metrics = {f"{split}/{name}": value for name, value in report["scalars"].items()}
    for row in report["per_label"]:
        for name, value in row.items():
            if name not in (
                "label",
                "support",
                "prevalence_train",
                "prevalence_test",
                "tn",
                "fp",
                "fn",
                "tp",
            ):
                metrics[f"{split}/{name}/{row['label']}"] = value
    return metrics


def medmnist_result_name(flag: str, size: int, split: str, auc: float, acc: float, run: str) -> str:
    """The file name `medmnist.Evaluator` writes and `python -m medmnist evaluate` parses."""
    return f"{flag}{size_suffix(size)}_{split}_[AUC]{auc:.3f}_[ACC]{acc:.3f}@{run}.csv"


def write_medmnist_result(path: Path, scores: np.ndarray) -> Path:
    """One row per image: its index, then its scores; no header (MedMNIST's format)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        for index, row in enumerate(scores.astype(np.float64)):
            writer.writerow([index, *(repr(float(v)) for v in row)])
    return path


def _undefined(row: dict, metric: str) -> str:
    """Why a label's AUROC or AP is undefined on test."""
    if row["support"] == 0:
        return "undefined: no positives in test"
    return "undefined: no negatives in test" if metric == "auroc" else ""


def _number(value: float, undefined: str = "undefined") -> str:
    return undefined if math.isnan(value) else f"{value:.4f}"


def _coverage(count: int, rows: list[dict], metric: str) -> str:
    """What a macro mean covers when it leaves labels out: " (over 13 of 14; undefined for
    hernia)"."""
    if count == len(rows):
        return ""
    left_out = ", ".join(r["label"] for r in rows if math.isnan(r[metric]))
    return f" (over {count} of {len(rows)}; undefined for {left_out})"


def _summary(report: dict, figures: list[str], loss_note: str | None, context: dict) -> str:
    s, rows = report["scalars"], report["per_label"]
    multiclass = report["thresholds"] is None
    lines = [f"# Report: {context.get('flag', '')} test split ({s['n_images']:,} images)", ""]
    if digest := context.get(run_files.WEIGHTS_SHA256):
        source = (
            f"checkpoint `{context[run_files.CHECKPOINT]}`"
            if context.get(run_files.CHECKPOINT)
            else "the weights at the end of training, in no checkpoint file"
        )
        lines += [f"Weights: {source} (SHA-256 `{digest[:16]}…`).", ""]
    lines += ["## Summary", ""]
    if multiclass:
        lines += ["| | arg-max class |", "| --- | --- |", f"| ACC (MedMNIST) | {s['acc']:.4f} |"]
        lines += [
            f"| {name} macro / micro | {s[name + '_macro']:.4f} / {s[name + '_micro']:.4f} |"
            for name in ("f1", "precision", "recall")
        ]
    else:
        lines += [
            "| | at threshold 0.5 | at thresholds tuned on validation |",
            "| --- | --- | --- |",
            f"| ACC (MedMNIST) | {s['acc']:.4f} | {s['acc_tuned']:.4f} |",
        ]
        lines += [
            f"| {name} macro / micro | {s[name + '_macro']:.4f} / {s[name + '_micro']:.4f} | "
            f"{s[name + '_macro_tuned']:.4f} / {s[name + '_micro_tuned']:.4f} |"
            for name in ("f1", "precision", "recall")
        ]
    constant = (
        "the class most frequent in training"
        if multiclass
        else "each label's more frequent value in training"
    )
    if "acc_all_negative" in s and abs(s["acc_all_negative"] - s["acc_majority"]) < 1e-12:
        constant = "no finding for every label (each label's more frequent value in training)"
    over = "classes, one against the rest" if multiclass else "labels"
    gap = round(s["acc"] - s["acc_majority"], 4)
    versus = "the same (to 4 decimals)" if gap == 0 else f"{gap:+.4f} from it"  # never "-0.0000"
    lines += [
        "",
        f"AUC (MedMNIST, macro over {over}): **{_number(s['auroc'])}**"
        f"{_coverage(s['auroc_labels'], rows, 'auroc')}; macro average precision: "
        f"{_number(s['ap_macro'])}{_coverage(s['ap_macro_labels'], rows, 'ap')}.",
        "",
        f"**Baseline:** a model that always answers {constant} scores ACC **{s['acc_majority']:.4f}** on this "
        f"split. This model's ACC is {versus}: where the answers are "
        f"imbalanced, ACC says little; read AUROC, AP and the per-label recall.",
        "",
    ]
    if not multiclass:
        lines += [
            f"Thresholds were chosen per label on the validation split (rule: {report['rule']}) and only "
            f"then applied to test.",
            "",
        ]
        lines += [
            f"**Kept at {THRESHOLD}:** {label}: {reason}; nothing was tuned for it."
            for label, reason in report["threshold_notes"].items()
        ]
        if report["threshold_notes"]:
            lines.append("")
    lines += ["## Per label", ""]
    if multiclass:
        lines += [
            "| class | test prevalence | support | AUROC | AP | precision | recall | F1 |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {r['label']} | {r['prevalence_test']:.4f} | {r['support']} | {_number(r['auroc'], _undefined(r, 'auroc'))} | "
            f"{_number(r['ap'], _undefined(r, 'ap'))} | {r['precision']:.4f} | {r['recall']:.4f} | {r['f1']:.4f} |"
            for r in rows
        ]
    else:
        lines += [
            "| label | test prevalence | support | AUROC | AP | F1 @0.5 | threshold | precision | recall | F1 |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {r['label']} | {r['prevalence_test']:.4f} | {r['support']} | {_number(r['auroc'], _undefined(r, 'auroc'))} | "
            f"{_number(r['ap'], _undefined(r, 'ap'))} | {r['f1']:.4f} | {r['threshold']:.4f} | {r['precision_tuned']:.4f} | {r['recall_tuned']:.4f} | "
            f"{r['f1_tuned']:.4f} |"
            for r in rows
        ]
    weakest = sorted((r for r in rows if not math.isnan(r["auroc"])), key=lambda r: r["auroc"])[:3]
    lines += ["", "## Where the model is weak", ""]
    lines.append(
        "Lowest AUROC: " + ", ".join(f"{r['label']} ({r['auroc']:.3f})" for r in weakest) + "."
        if weakest
        else "Lowest AUROC: none; it is undefined for every label on this split."
    )
    silent = [r["label"] for r in rows if r["recall"] == 0 and r["support"] > 0]
    if silent:
        lines.append(
            f"Never found{'' if multiclass else ' at threshold 0.5'}: {', '.join(silent)}."
        )
    never = [r["label"] for r in rows if r["tp"] + r["fp"] == 0]
    if never and not multiclass:
        lines.append(f"Never predicted even at the tuned threshold: {', '.join(never)}.")
    lines += ["", "## Figures", ""]
    lines += [f"- [{name}]({name})" for name in figures]
    if loss_note:
        lines.append(f"- loss curves: not drawn ({loss_note})")
    return "\n".join(lines) + "\n"


def label_truth(targets: torch.Tensor, k: int, multiclass: bool) -> torch.Tensor:
    """0/1 per image for output `k`: its label column, or (multi-class) "is class k", one
    against the rest."""
    return (targets.reshape(-1) == k).int() if multiclass else targets[:, k].int()


def log_to_tensorboard(
    writer,
    report_dir: Path,
    test: tuple[torch.Tensor, torch.Tensor],
    labels: list[str],
    task: str,
    step: int,
) -> None:
    """The report's figures into a TensorBoard run (IMAGES: `report/<figure>`) and one
    precision-recall curve per label on test (PR CURVES: `test/pr_curve/<label>`, TensorBoard's
    own interactive plot, with the counts at each threshold). `writer`: a SummaryWriter."""
    from PIL import Image

    for png in sorted(report_dir.glob("*.png")):
        with Image.open(png) as image:
            pixels = np.asarray(image.convert("RGB"))
        writer.add_image(f"report/{png.stem}", pixels, step, dataformats="HWC")
    scores, targets = test[0].float(), test[1]
    for k, label in enumerate(labels):
        truth = label_truth(targets, k, is_multiclass(task)).bool()
        writer.add_pr_curve(f"test/pr_curve/{label}", truth, scores[:, k], step)
    writer.flush()


def write_report(
    out_dir: Path,
    report: dict,
    val: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    labels: list[str],
    flag: str,
    size: int,
    run_dir: Path | None = None,
    extra: dict | None = None,
) -> Path:
    """Write every report file into `out_dir`. `run_dir`, the training run: its name goes into
    MedMNIST's result file name, its logs (TensorBoard, else CSV) give the loss curves; without
    them only that figure is missing (said in report.md). `extra`: facts for metrics.json;
    its "checkpoint" and "weights_sha256" name the weights evaluated, in thresholds.json and
    report.md too."""
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = extra or {}
    run_files.write_metrics(out_dir, flat_metrics(report) | extra)
    with open(out_dir / "per_class.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(report["per_label"][0]))
        writer.writeheader()
        writer.writerows(report["per_label"])
    multiclass = report["thresholds"] is None
    checkpoint = extra.get(run_files.CHECKPOINT)
    run_files.write_thresholds(
        out_dir,
        run_files.Thresholds(
            rule=report["rule"],
            default=THRESHOLD,
            labels=None
            if multiclass
            else {label: float(t) for label, t in zip(labels, report["thresholds"], strict=True)},
            # the weights they were tuned for: predict uses them for these weights only
            checkpoint=Path(checkpoint).name if checkpoint else None,
            weights_sha256=extra.get(run_files.WEIGHTS_SHA256),
            kept_at_default=report["threshold_notes"],
            chosen_on=None if multiclass else "val",
        ),
    )
    arrays = {
        "scores": test[0].float().numpy(),
        "labels": test[1].numpy().astype(np.uint8),
        "val_scores": val[0].float().numpy(),
        "val_labels": val[1].numpy().astype(np.uint8),
        "label_names": np.array(labels),
    }
    if not multiclass:
        arrays["thresholds"] = report["thresholds"].numpy()
    np.savez_compressed(out_dir / "predictions.npz", **arrays)
    scores, targets = test[0].float(), test[1].int()
    result = medmnist_result_name(
        flag,
        size,
        "test",
        report["scalars"]["auroc"],
        report["scalars"]["acc"],
        Path(run_dir).name if run_dir is not None else "chest_mnist",
    )
    write_medmnist_result(out_dir / result, scores.numpy())

    figures = ["confusion_matrices.png", "roc_curves.png", "pr_curves.png"]
    if multiclass:
        plot_class_confusion(
            report["confusion"].numpy(),
            labels,
            out_dir / "confusion_matrices.png",
            title="test confusion matrix, arg-max class (rows: truth, columns: prediction)",
        )
    else:
        plot_confusion_matrices(
            report["confusion_tuned"].numpy(),
            labels,
            out_dir / "confusion_matrices.png",
            title=f"test confusion matrices at thresholds tuned on validation ({report['rule']}); rows: truth",
        )
    rocs, prs = [], []
    for k in range(len(labels)):
        truth = label_truth(targets, k, multiclass)
        fpr, tpr, _ = binary_roc(scores[:, k], truth)
        precision, recall, _ = binary_precision_recall_curve(scores[:, k], truth)
        rocs.append((fpr.numpy(), tpr.numpy()))
        prs.append((recall.numpy(), precision.numpy()))
    rows = report["per_label"]
    plot_roc_curves(rocs, labels, [r["auroc"] for r in rows], out_dir / "roc_curves.png")
    plot_pr_curves(
        prs,
        labels,
        [r["ap"] for r in rows],
        [r["prevalence_test"] for r in rows],
        out_dir / "pr_curves.png",
    )
    loss_note = None
    if run_dir is None:
        loss_note = "no training run given"
    else:
        try:
            plot_loss_curves(read_run_loss_curves(run_dir), out_dir / "loss_curves.png")
            figures.insert(0, "loss_curves.png")
        except FileNotFoundError as e:
            loss_note = str(e)
            log.warning("No loss curves: %s. The rest of the report is written.", e)
    context = {"flag": flag} | extra
    (out_dir / "report.md").write_text(_summary(report, figures, loss_note, context))
    log.info("Report written to %s", out_dir)
    return out_dir
