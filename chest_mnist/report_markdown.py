"""report.md, the report to read, from a `Report` (report_content.py): which weights, the summary at
0.5 and at the tuned thresholds next to the constant baseline, one row per label, where the
model is weak, and links to the figures. Nothing is computed here but the wording; the words
for a task's outputs ("label" or "class", the baseline's answer) are its `Task`'s (task.py),
and the tuned columns appear when it tunes thresholds.
"""

from __future__ import annotations

import math
from pathlib import Path

from chest_mnist import run_files
from chest_mnist.calibration import (
    T_RANGE,
    at_bound,
    describe_bins,
    kept_at_one,
)
from chest_mnist.metrics import THRESHOLD
from chest_mnist.report_content import Report


def _undefined(row: dict, metric: str) -> str:
    """Why a label's AUROC or AP is undefined on test."""
    if row["support"] == 0:
        return "undefined: no positives in test"
    return "undefined: no negatives in test" if metric == "auroc" else ""


def _number(value: float, undefined: str = "undefined") -> str:
    return undefined if math.isnan(value) else f"{value:.4f}"


def _with_interval(values: dict, name: str, undefined: str = "undefined") -> str:
    """ "0.7720 [0.7660, 0.7780]": `values[name]` and its bootstrap interval when it has one."""
    text = _number(values[name], undefined)
    low, high = values.get(f"{name}_low"), values.get(f"{name}_high")
    if low is None or math.isnan(values[name]):
        return text
    if math.isnan(low):
        return f"{text} [no interval]"
    return f"{text} [{low:.4f}, {high:.4f}]"


def _coverage(count: int, rows: list[dict], metric: str) -> str:
    """What a macro mean covers when it leaves labels out: " (over 13 of 14; undefined for
    hernia)"."""
    if count == len(rows):
        return ""
    left_out = ", ".join(r["label"] for r in rows if math.isnan(r[metric]))
    return f" (over {count} of {len(rows)}; undefined for {left_out})"


def _title(report: Report, flag: str, facts: dict) -> list[str]:
    """The split, and the weights: the checkpoint and the digest (`facts`) when known."""
    lines = [f"# Report: {flag} test split ({report.scalars['n_images']:,} images)", ""]
    if digest := facts.get(run_files.WEIGHTS_SHA256):
        source = (
            f"checkpoint `{facts[run_files.CHECKPOINT]}`"
            if facts.get(run_files.CHECKPOINT)
            else "the weights at the end of training, in no checkpoint file"
        )
        lines += [f"Weights: {source} (SHA-256 `{digest[:16]}…`).", ""]
    return lines


def _summary_table(report: Report) -> list[str]:
    """ACC and the micro and macro means: at 0.5 (or the arg-max class), and tuned if tuned."""
    s = report.scalars
    columns = {report.task.words.untuned_rule: ""}  # heading: the suffix of its scalars' names
    if report.tuned:
        columns["at thresholds tuned on validation"] = "_tuned"
    lines = ["## Summary", "", "| | " + " | ".join(columns) + " |"]
    lines.append(_row(*["---"] * (len(columns) + 1)))
    lines.append(_row("ACC (MedMNIST)", *(_with_interval(s, "acc" + c) for c in columns.values())))
    if len(report.labels) == 1:  # a binary task: its one output's, which macro and micro both are
        lines += [
            _row(
                f"{name} of {report.labels[0]}",
                *(f"{s[f'{name}_macro{c}']:.4f}" for c in columns.values()),
            )
            for name in ("f1", "precision", "recall")
        ]
        return lines
    lines += [
        _row(
            f"{name} macro / micro",
            *(
                f"{s[f'{name}_macro{c}']:.4f} / {s[f'{name}_micro{c}']:.4f}"
                for c in columns.values()
            ),
        )
        for name in ("f1", "precision", "recall")
    ]
    return lines


def _row(*cells: str) -> str:
    """One row of a markdown table."""
    return "| " + " | ".join(cells) + " |"


def _ranking_and_baseline(report: Report) -> list[str]:
    """AUC and AP, with the labels they leave out; the constant baseline's ACC beside ours."""
    s, rows = report.scalars, report.per_label
    constant = report.task.words.constant_answer
    if "acc_all_negative" in s and abs(s["acc_all_negative"] - s["acc_majority"]) < 1e-12:
        constant = "no finding for every label (each label's more frequent value in training)"
    over = report.task.words.macro_over
    gap = round(s["acc"] - s["acc_majority"], 4)
    versus = "the same (to 4 decimals)" if gap == 0 else f"{gap:+.4f} from it"  # never "-0.0000"
    return [
        "",
        f"AUC (MedMNIST, macro over {over}): **{_with_interval(s, 'auroc')}**"
        f"{_coverage(s['auroc_labels'], rows, 'auroc')}; macro average precision: "
        f"{_with_interval(s, 'ap_macro')}{_coverage(s['ap_macro_labels'], rows, 'ap')}.",
        "",
        *_interval_method(report),
        f"**Baseline:** a model that always answers {constant} scores ACC **{s['acc_majority']:.4f}** on this "
        f"split. This model's ACC is {versus}: where the answers are "
        f"imbalanced, ACC says little; read AUROC, AP and the per-label recall.",
        "",
    ]


def _interval_method(report: Report) -> list[str]:
    """How the [low, high] intervals were drawn, or that there are none."""
    if report.bootstrap is None:
        return ["No intervals (bootstrap.resamples=0).", ""]
    return [
        f"In brackets: {report.bootstrap.describe()} (the same metric on each resample; a "
        f"label with no positives in a resample is left out of that resample's values).",
        "",
    ]


def _calibration(report: Report, figures: list[str]) -> list[str]:
    """The ECE, and what temperature scaling did when it was applied; `figures`: those drawn."""
    s = report.scalars
    diagram = " and in reliability.png" if "reliability.png" in figures else ""
    lines = [
        "",
        "## Calibration",
        "",
        f"Expected calibration error on test, {report.task.words.pooled}: "
        f"**{s['ece']:.4f}** (torchmetrics, {describe_bins(report.bins)}); per "
        f"{report.task.words.output} in the table above{diagram}.",
    ]
    scaling = report.scaling
    if scaling is None:
        return lines + [
            "",
            "No temperature scaling (calibration=temperature fits it on validation).",
        ]
    t = scaling.temperature.tolist()
    fitted = f"T = {t[0]:.4f}" if len(t) == 1 else f"T from {min(t):.4f} to {max(t):.4f}"
    if scaling.per_label:
        kept = kept_at_one(report.val[1], report.task, len(report.labels))
        if kept.any():
            names = ", ".join(
                label for label, k in zip(report.labels, kept.tolist(), strict=True) if k
            )
            fitted += f"; kept at 1 for {names} (one value only in validation: nothing to fit)"
    bounded = at_bound(scaling.temperature).tolist()
    if any(bounded):  # named per label; one temperature for all is just "at the bound"
        names = [label for label, b in zip(report.labels, bounded, strict=False) if b]
        which = f" for {', '.join(names)}" if len(bounded) > 1 else ""
        fitted += f"; at a bound of {T_RANGE[0]} to {T_RANGE[1]}{which} (the fit would go further)"
    nll = scaling.nll
    ranking = (
        f"AUROC {s['auroc_before']:.4f} -> {s['auroc']:.4f}, macro AP "
        f"{s['ap_macro_before']:.4f} -> {s['ap_macro']:.4f}"
    )
    if report.task.independent_outputs:  # a sigmoid per label: its order is kept
        unchanged = (
            f"It keeps each {report.task.words.output}'s order of scores and the decisions at "
            f"{THRESHOLD} (up to float32 rounding of nearly tied scores), so AUROC, AP and ACC "
            f"stay as they were ({ranking}); every number here is after it, and the thresholds "
            f"were tuned on the scaled validation scores."
        )
    else:
        unchanged = (
            f"It keeps each image's arg-max {report.task.words.output}, so the decisions and "
            f"ACC, but not a {report.task.words.output}'s order of scores across images: "
            f"{ranking}. Every number here is after it."
        )
    return lines + [
        "",
        f"Temperature scaling ({'one per label' if scaling.per_label else 'one for all outputs'}, "
        f"fitted on validation): {fitted}. ECE on test {s['ece_before']:.4f} before, "
        f"{s['ece']:.4f} after; NLL on validation {nll['val_before']:.4f} -> "
        f"{nll['val_after']:.4f}, on test {nll['test_before']:.4f} -> {nll['test_after']:.4f}. "
        + unchanged,
    ]


def _thresholds(report: Report) -> list[str]:
    """How the thresholds were chosen, and the labels that kept 0.5 and why."""
    if not report.task.tunes_thresholds:
        return []
    if not report.tuned:
        return [
            f"Thresholds: {THRESHOLD} for every label (thresholds.rule=fixed); none was tuned.",
            "",
        ]
    lines = [
        f"Thresholds were chosen per label on the validation split (rule: {report.rule}) and only "
        f"then applied to test.",
        "",
    ]
    lines += [
        f"**Kept at {THRESHOLD}:** {label}: {reason}; nothing was tuned for it."
        for label, reason in report.threshold_notes.items()
    ]
    if report.threshold_notes:
        lines.append("")
    return lines


def _per_label_table(report: Report) -> list[str]:
    """One row per label: its ranking metrics, and its decisions (tuned, when tuned)."""
    tuned = report.tuned
    heads = [report.task.words.output, "test prevalence", "support", "AUROC", "AP", "ECE"]
    heads += ["F1 @0.5", "threshold"] if tuned else []
    heads += ["precision", "recall", "F1"]
    lines = ["## Per label", "", _row(*heads), _row(*["---"] * len(heads))]
    for r in report.per_label:
        cells = [r["label"], f"{r['prevalence_test']:.4f}", str(r["support"])]
        cells += [
            _with_interval(r, "auroc", _undefined(r, "auroc")),
            _with_interval(r, "ap", _undefined(r, "ap")),
            f"{r['ece']:.4f}",
        ]
        cells += [f"{r['f1']:.4f}", f"{r['threshold']:.4f}"] if tuned else []
        suffix = "_tuned" if tuned else ""
        cells += [f"{r[name + suffix]:.4f}" for name in ("precision", "recall", "f1")]
        lines.append(_row(*cells))
    return lines


def _weaknesses(report: Report) -> list[str]:
    """The three lowest AUROCs, the labels never found at 0.5 and never predicted at all."""
    rows = report.per_label
    weakest = sorted((r for r in rows if not math.isnan(r["auroc"])), key=lambda r: r["auroc"])[:3]
    lines = ["", "## Where the model is weak", ""]
    lines.append(
        "Lowest AUROC: " + ", ".join(f"{r['label']} ({r['auroc']:.3f})" for r in weakest) + "."
        if weakest
        else "Lowest AUROC: none; it is undefined for every label on this split."
    )
    silent = [r["label"] for r in rows if r["recall"] == 0 and r["support"] > 0]
    if silent:
        at_half = f" {report.task.words.untuned_rule}" if report.task.tunes_thresholds else ""
        lines.append(f"Never found{at_half}: {', '.join(silent)}.")
    never = [r["label"] for r in rows if r["tp"] + r["fp"] == 0]
    if never and report.tuned:
        lines.append(f"Never predicted even at the tuned threshold: {', '.join(never)}.")
    return lines


def markdown(
    report: Report, figures: list[str], loss_note: str | None, flag: str, facts: dict
) -> str:
    """report.md's text. `figures`: the files drawn (none: figures=false); `loss_note`: why
    the loss curves were not; `flag`: the data; `facts`: metrics.json's, whose checkpoint and
    digest name the weights."""
    lines = _title(report, flag, facts)
    lines += _summary_table(report) + _ranking_and_baseline(report) + _thresholds(report)
    lines += _per_label_table(report) + _calibration(report, figures) + _weaknesses(report)
    lines += ["", "## Figures", ""]
    lines += [f"- [{name}]({name})" for name in figures] or ["- none drawn (figures=false)"]
    if loss_note:
        lines.append(f"- loss curves: not drawn ({loss_note})")
    return "\n".join(lines) + "\n"


def write_markdown(
    report: Report,
    out_dir: Path,
    figures: list[str],
    loss_note: str | None,
    flag: str,
    facts: dict,
) -> Path:
    path = out_dir / "report.md"
    path.write_text(markdown(report, figures, loss_note, flag, facts))
    return path
