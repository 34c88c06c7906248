"""What a run's report says, as one value: `build_report` makes a `Report` from the validation
and test predictions of one checkpoint, with no files and no logging. Per-label thresholds
are tuned on validation (never on test) and applied to test; every decision metric is given
at 0.5 (MedMNIST's ACC) and at the tuned thresholds, next to the constant baseline. The
writers (report_tables.py, report_figures.py, report_markdown.py) only read it. What differs
between tasks (arg-max and no thresholds for multi-class, the report's words) is `Report.task`'s,
a `Task` (task.py): the writers ask it and do not branch on the task's name.

Beside the numbers, each has its interval when a `Bootstrap` is given (bootstrap.py: "<name>_low"
and "<name>_high" scalars and per-label columns), and the calibration of the test scores
(calibration.py: "ece" overall and per label; with temperature scaling, also before it)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from chest_mnist import UserError
from chest_mnist.bootstrap import Bootstrap, bootstrap_intervals
from chest_mnist.calibration import BINS, METHODS, TemperatureScaling, calibration_errors
from chest_mnist.metrics import (
    DECISIONS,
    THRESHOLD_RULES,
    evaluate_predictions,
    mean_over_defined,
    ranking_per_label,
    tune_thresholds,
)
from chest_mnist.task import MULTI_LABEL_TASK, Task

Split = tuple[torch.Tensor, torch.Tensor]  # (probabilities, labels) of a whole split
# scalars that no threshold changes: reported once, not again as "<name>_tuned"
THRESHOLD_FREE = (
    "auroc",
    "auroc_labels",
    "ap_macro",
    "ap_macro_labels",
    "acc_all_negative",
    "n_images",
)


# the report's config sections, their keys, and what to write instead of a value for a section
OPTION_KEYS = {
    "thresholds": ("rule",),
    "bootstrap": ("resamples", "level", "seed"),
    "calibration": ("method", "per_label", "bins"),
}
OPTION_INSTEAD = {
    "thresholds": "thresholds.rule=fixed for 0.5 for every label",
    "bootstrap": "bootstrap.resamples=0 for no intervals",
    "calibration": "calibration=none for no temperature scaling",
}


@dataclass(frozen=True)
class ReportOptions:
    """The report's choices; `from_config` reads them from a train or evaluate config."""

    rule: str = "f1"  # thresholds.rule
    bootstrap: Bootstrap | None = Bootstrap()  # bootstrap.*; None (resamples=0): no intervals
    calibration: str = "none"  # calibration.method: none | temperature
    per_label_temperature: bool = False  # calibration.per_label
    bins: int = BINS  # calibration.bins
    figures: bool = True  # figures: the PNGs, heatmaps.png included

    @staticmethod
    def from_config(cfg) -> ReportOptions:
        """From `cfg.thresholds`, `cfg.bootstrap`, `cfg.calibration` and `cfg.figures` (each
        optional); a UserError names the first key whose value cannot be used, or that is not
        one of theirs (`+bootstrap.resampels=10` would be ignored)."""
        for section, keys in OPTION_KEYS.items():
            given = cfg.get(section, {})
            if not isinstance(given, Mapping):  # thresholds=fixed, bootstrap=null, bootstrap=0
                raise UserError(
                    f"{section}={given!r} is not a value but a group of keys "
                    f"({', '.join(keys)}): give {OPTION_INSTEAD[section]}."
                )
            unknown = sorted(set(given) - set(keys))
            if unknown:
                raise UserError(
                    f"{section}.{unknown[0]} is not a key of {section}: its keys are "
                    f"{', '.join(keys)}. Check its spelling."
                )
        rule = cfg.get("thresholds", {}).get("rule", "f1")
        if rule not in THRESHOLD_RULES:
            raise UserError(
                f"thresholds.rule={rule!r} is unknown; choose one of {', '.join(THRESHOLD_RULES)}."
            )
        drawn = cfg.get("bootstrap") or {}
        resamples, level = drawn.get("resamples", 1000), drawn.get("level", 0.95)
        seed = drawn.get("seed", 0)
        _check(
            resamples,
            "bootstrap.resamples",
            int,
            0,
            "a whole number: 0 for no intervals, 1000 or more for a paper",
        )
        _check(seed, "bootstrap.seed", int, 0, "a whole number of 0 or more")
        if not isinstance(level, float) or not 0 < level < 1:
            raise UserError(f"bootstrap.level={level!r} must be a number between 0 and 1 (0.95).")
        calibration = cfg.get("calibration") or {}
        method = calibration.get("method", "none")
        if method not in METHODS:
            raise UserError(
                f"calibration.method={method!r} is unknown; choose one of {', '.join(METHODS)}."
            )
        per_label = calibration.get("per_label", False)
        if not isinstance(per_label, bool):
            raise UserError(f"calibration.per_label={per_label!r} must be true or false.")
        bins = calibration.get("bins", BINS)
        _check(bins, "calibration.bins", int, 1, "a whole number of 1 or more (15)")
        figures = cfg.get("figures", True)
        if not isinstance(figures, bool):
            raise UserError(f"figures={figures!r} must be true or false.")
        return ReportOptions(
            rule=rule,
            bootstrap=Bootstrap(resamples, level, seed) if resamples else None,
            calibration=method,
            per_label_temperature=per_label,
            bins=bins,
            figures=figures,
        )


def _check(value, key: str, kind: type, least: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, kind) or value < least:
        raise UserError(f"{key}={value!r} must be {what}.")


@dataclass
class Report:
    """Everything report/ is written from, on test unless named val; `build_report` makes it,
    the writers only read it."""

    labels: list[str]  # the model's outputs: labels, or the classes of a multi-class task
    task: Task  # its rules: thresholds tuned or arg-max, the words for its outputs
    rule: str  # how thresholds were tuned (a thresholds.rule), or "argmax"
    # at 0.5 (or arg-max); "<name>_tuned" at the tuned thresholds; the "loss" when given
    scalars: dict[str, float]
    per_label: list[dict]  # per_class.csv's rows, with its columns in order
    thresholds: torch.Tensor | None  # one per label, tuned on val; None for arg-max
    threshold_notes: dict[str, str]  # {label: why it kept THRESHOLD}
    confusion: torch.Tensor  # at 0.5: (L, 2, 2); arg-max: (C, C), rows the truth
    confusion_tuned: torch.Tensor | None  # at the tuned thresholds: (L, 2, 2)
    val: Split
    test: Split
    bootstrap: Bootstrap | None = None  # how the intervals were drawn; None: no intervals
    scaling: TemperatureScaling | None = None  # calibration=temperature; val and test are after it
    bins: int = BINS  # of the calibration error and the reliability diagram

    @property
    def tuned(self) -> bool:
        """Whether thresholds were tuned on validation: not for a multi-class arg-max, nor with
        thresholds.rule=fixed (0.5 for every label)."""
        return self.task.tunes_thresholds and self.rule != "fixed"


def build_report(
    val: Split,
    test: Split,
    labels: list[str],
    prevalence_train: torch.Tensor,
    rule: str = "f1",
    task: Task = MULTI_LABEL_TASK,
    loss: float | None = None,
    bootstrap: Bootstrap | None = None,
    scaling: TemperatureScaling | None = None,
    bins: int = BINS,
    device: torch.device | str = "cpu",
) -> Report:
    """Every metric on `test` = (scores, targets): at 0.5 and at thresholds tuned on `val`, or
    at the arg-max class for a multi-class task (no thresholds to tune). The constant baseline
    is chosen on the training split's `prevalence_train`; `loss`, the test loss, is reported
    as given. `bootstrap`: intervals for the ranking metrics and ACC. `scaling`: the temperature
    scaling `val` and `test` went through (their scores are after it; the report gives the
    calibration before it too). The calibration error uses `bins` bins. `device`: where the
    bootstrap's resamples are summed."""
    thresholds, kept, tuned = None, {}, None
    at_half = evaluate_predictions(*test, labels, task=task)
    if task.tunes_thresholds:
        thresholds, kept = tune_thresholds(*val, rule=rule)
        tuned = evaluate_predictions(*test, labels, thresholds, task=task)
    scalars = dict(at_half["scalars"])
    # chosen on train, as a model would be: the test labels' own majority would have peeked
    scalars["acc_majority"] = task.majority_accuracy(test[1], prevalence_train)
    for name, value in (tuned["scalars"] if tuned else {}).items():
        if name not in THRESHOLD_FREE:
            scalars[f"{name}_tuned"] = value
    per_label = _per_label_rows(at_half, tuned, prevalence_train)
    if bootstrap is not None:
        intervals = bootstrap_intervals(*test, task, bootstrap, thresholds, device=device)
        _add_intervals(scalars, per_label, intervals)
    _add_calibration(scalars, per_label, test, task, scaling, bins)
    if loss is not None:
        scalars["loss"] = loss
    return Report(
        labels=list(labels),
        task=task,
        rule=rule if task.tunes_thresholds else "argmax",
        scalars=scalars,
        per_label=per_label,
        thresholds=thresholds,
        threshold_notes={labels[k]: reason for k, reason in kept.items()},
        confusion=at_half["confusion"],
        confusion_tuned=tuned["confusion"] if tuned else None,
        val=val,
        test=test,
        bootstrap=bootstrap,
        scaling=scaling,
        bins=bins,
    )


def _add_intervals(scalars: dict, rows: list[dict], intervals: dict) -> None:
    """ "<name>_low" and "<name>_high" for the scalars and each label's AUROC and AP, after the
    number they bound."""
    for name, (low, high) in intervals["scalars"].items():
        scalars[f"{name}_low"], scalars[f"{name}_high"] = low, high
    for k, row in enumerate(rows):
        bounds = {}
        for name in ("auroc", "ap"):
            low, high = intervals["per_label"][name][:, k].tolist()
            bounds |= {f"{name}_low": low, f"{name}_high": high}
        _insert_after(row, "ap", bounds)


def _add_calibration(
    scalars: dict,
    rows: list[dict],
    test: Split,
    task: Task,
    scaling: TemperatureScaling | None,
    bins: int,
) -> None:
    """The calibration error on test, "ece", overall and per label; with temperature scaling
    also "ece_before" (without it), each label's "temperature", the test NLL before and after
    it ("nll_before", "nll"), and the macro AUROC and AP before it ("auroc_before",
    "ap_macro_before": a softmax's temperature changes them, a sigmoid's does not)."""
    overall, per_label = calibration_errors(*test, task, bins)
    columns = [{"ece": value} for value in per_label.tolist()]
    scalars["ece"] = overall
    if scaling is not None:
        before, before_per_label = calibration_errors(scaling.test_before, test[1], task, bins)
        scalars["ece_before"] = before
        scalars["nll_before"], scalars["nll"] = (
            scaling.nll["test_before"],
            scaling.nll["test_after"],
        )
        unscaled = ranking_per_label(scaling.test_before, task.targets(test[1]), len(rows), task)
        scalars["auroc_before"], _ = mean_over_defined(unscaled["auroc"])
        scalars["ap_macro_before"], _ = mean_over_defined(unscaled["ap"])
        temperatures = scaling.temperature.expand(len(rows)).tolist()
        for column, value, t in zip(columns, before_per_label.tolist(), temperatures, strict=True):
            column |= {"ece_before": value, "temperature": t}
    last = "ap_high" if "ap_high" in rows[0] else "ap"
    for row, column in zip(rows, columns, strict=True):
        _insert_after(row, last, column)


def _insert_after(row: dict, key: str, values: dict) -> None:
    """Put `values` into `row` right after `key`, keeping the order of per_class.csv's columns."""
    items = list(row.items())
    at = [name for name, _ in items].index(key) + 1
    row.clear()
    row.update(items[:at] + list(values.items()) + items[at:])


def _per_label_rows(
    at_half: dict, tuned: dict | None, prevalence_train: torch.Tensor
) -> list[dict]:
    """per_class.csv's rows from `evaluate_predictions` at 0.5 and at the tuned thresholds (if
    any): the label's facts and ranking metrics, its decisions at both, and its counts."""
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
    return rows
