"""Tables over runs: one row per group of runs that differ only by seed.

    python -m chest_mnist.train -m seed=1,2,3                      # a sweep over seeds
    python -m chest_mnist.compare logs/train/multiruns/<time>      # mean ± sd over them
    python -m chest_mnist.compare RUN_OR_SWEEP_DIR... [--out DIR]

Each run is a folder with `report/metrics.json` and `.hydra/config.yaml` (what `train` writes);
a folder given is searched for them. Runs whose configs are equal but for the seed and the
keys that do not change what a run learns (`NOT_THE_RECIPE`: where it writes, how it logs,
saves and draws its report) form a group; a row gives the number of seeds and, for each metric, the
mean ± sample standard deviation and the min to max. For two groups a second table gives the
difference of their means (second minus first) with a 95% Student-t interval: paired by seed
when the groups ran the same seeds, else Welch's. The tables are printed as markdown and
written as `compare.md` and `compare.csv` (and `compare_difference.csv`) into `--out`: by
default the folder given, or the current folder when several are and it has no such files.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import statistics
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from medmnist import INFO
from scipy import stats

from chest_mnist import UserError, run_files
from chest_mnist.cli import freeze_for_exit, report_user_errors
from chest_mnist.config import flatten
from chest_mnist.task import Task

# (column, metrics.json key): what a row shows; the keys at the tuned thresholds (_tuned) only for
# a task that tunes them (a multi-class model decides by its arg-max class: see `columns`)
DIFFERENCE = "compare_difference.csv"
METRICS = (
    ("test AUC", "test/auroc"),
    ("test ACC", "test/acc"),
    ("ACC tuned", "test/acc_tuned"),
    ("macro AP", "test/ap_macro"),
    ("macro F1 tuned", "test/f1_macro_tuned"),
)


def columns(flag: str | None) -> tuple[tuple[str, str], ...]:
    """METRICS for the dataset `flag`: without the tuned ones where its task tunes no thresholds."""
    tunes = flag not in INFO or Task.from_medmnist(INFO[flag]["task"]).tunes_thresholds
    return tuple((column, key) for column, key in METRICS if tunes or not key.endswith("_tuned"))


# a metric a run's report has as NaN: its definition needs what the test split lacks
UNDEFINED = "undefined"
WHY_UNDEFINED = (
    "a run's report has no value (NaN: a test split without positives, or without negatives, "
    "has no AUROC)"
)

# config keys (and the keys under them) that say where a run writes, what it resumed from, when
# it saves and logs, how it shows its progress, how its report draws intervals and figures, or
# how data reaches the model, not what it learns
NOT_THE_RECIPE = (
    "seed",
    "bootstrap",
    "calibration.bins",
    "figures",
    "paths",
    "ckpt_path",
    "hydra",
    "logger",
    "trainer.log_every_n_steps",
    "callbacks.last_checkpoint",
    "callbacks.lr_monitor",
    "callbacks.progress_bar",
    "callbacks.model_summary",
    "data.root",
    "data.num_workers",
    "data.on_device",
    "data.mmap",
    "data.eval_batch_size",
)

# what a run made before these keys existed did, so that it groups with a run that says so
BEFORE_THE_KEY = {"calibration.method": "none", "calibration.per_label": False}


@dataclass
class Run:
    path: Path
    seed: int
    recipe: dict[str, Any]  # the flattened config without NOT_THE_RECIPE
    metrics: dict[str, Any]

    @property
    def columns(self) -> tuple[tuple[str, str], ...]:
        return columns(self.recipe.get("data.flag"))

    @property
    def labels(self) -> tuple[str, ...]:
        prefix = "test/auroc/"
        return tuple(sorted(k[len(prefix) :] for k in self.metrics if k.startswith(prefix)))


@dataclass
class Group:
    name: str
    runs: list[Run]

    @property
    def seeds(self) -> list[int]:
        return [run.seed for run in self.runs]

    def values(self, key: str) -> list[float]:
        return [float(run.metrics[key]) for run in self.runs]


def read_run(path: Path) -> Run:
    """A run's seed, recipe and metrics; UserError naming the folder when it is not a whole
    run of this version."""
    if not (path / run_files.CONFIG).is_file():
        raise UserError(
            f"{path} has a report but no {run_files.CONFIG}: not a run that train wrote."
        )
    try:
        metrics = run_files.read_metrics(path)
        config = yaml.safe_load((path / run_files.CONFIG).read_text())
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise UserError(f"{path}: could not read its report or config ({e}).") from e
    if not isinstance(config, dict):
        raise UserError(f"{path / run_files.CONFIG} holds no config.")
    if not isinstance(config.get("seed"), int):
        raise UserError(
            f"{path} was trained with seed={config.get('seed')!r}: compare needs each run's "
            f"seed (seed=1,2,3)."
        )
    wanted = columns((config.get("data") or {}).get("flag"))
    missing = [key for _, key in wanted if key not in metrics]
    if missing:
        raise UserError(
            f"{path / run_files.REPORT / run_files.METRICS} has no {', '.join(missing)}: a "
            f"report of an older version. Evaluate the run again: python -m chest_mnist.evaluate "
            f"ckpt_path={path}"
        )
    for _, key in wanted:
        if not isinstance(metrics[key], int | float):
            raise UserError(
                f"{path / run_files.REPORT / run_files.METRICS}: {key} is {metrics[key]!r}, "
                f"not a number."
            )
    recipe = {key: value for key, value in flatten(config).items() if not _bookkeeping(key)}
    return Run(path, config["seed"], BEFORE_THE_KEY | recipe, metrics)


def _bookkeeping(key: str) -> bool:
    return any(key == name or key.startswith(f"{name}.") for name in NOT_THE_RECIPE)


def find_runs(folders: list[Path]) -> list[Run]:
    runs: list[Path] = []
    for folder in folders:
        if not folder.is_dir():
            raise UserError(f"{folder} is not a folder.")
        found = sorted(folder.rglob(f"{run_files.REPORT}/{run_files.METRICS}"))
        # evaluate writes reports too, of weights a training run made: that run is the one
        reports = [r for r in found if _task_of(r.parent.parent / run_files.CONFIG) != "evaluate"]
        if found and not reports:
            raise UserError(
                f"{folder} holds evaluations only (python -m chest_mnist.evaluate's reports): "
                f"compare reads training runs; give the runs they evaluated."
            )
        if not reports:
            raise UserError(
                f"{folder} holds no run report ({run_files.REPORT}/{run_files.METRICS}): "
                f"give a run or sweep folder of python -m chest_mnist.train."
            )
        runs += [report.parent.parent.resolve() for report in reports]
    return [read_run(path) for path in dict.fromkeys(runs)]  # a run found twice counts once


def check_comparable(runs: list[Run]) -> None:
    """One dataset and one label set: rows of different tasks are not a table."""
    for what, of in (
        ("dataset", lambda r: r.recipe.get("data.flag")),
        ("labels", lambda r: r.labels),
    ):
        kinds = {of(run): run.path for run in runs}
        if len(kinds) > 1:
            (a, first), (b, second) = list(kinds.items())[:2]
            raise UserError(
                f"The runs are of different {what}: {first} has {a}, {second} has {b}. "
                f"Compare runs of one dataset."
            )


def group_runs(runs: list[Run]) -> list[Group]:
    """Runs with equal recipes, named by the keys in which the groups differ."""
    by_recipe: dict[str, list[Run]] = {}
    for run in runs:  # values can be lists (milestones, plugins): compare them as JSON
        by_recipe.setdefault(json.dumps(run.recipe, sort_keys=True, default=str), []).append(run)
    recipes = [members[0].recipe for members in by_recipe.values()]
    differing = sorted(
        {k for r in recipes for k in r if any(o.get(k) != r.get(k) for o in recipes)}
    )
    groups = []
    for recipe, members in zip(recipes, by_recipe.values(), strict=True):
        name = ", ".join(f"{k}={recipe.get(k)}" for k in differing) or "all runs"
        seeds = [run.seed for run in members]
        if len(set(seeds)) < len(seeds):
            raise UserError(
                f"Two runs of the group {name!r} have the same seed ({sorted(seeds)}): "
                + ", ".join(str(run.path) for run in members)
            )
        groups.append(Group(name, sorted(members, key=lambda run: run.seed)))
    return groups


def summary(values: list[float]) -> dict[str, float]:
    """mean, sample sd, min and max; all NaN where a run's value is (undefined: a test split
    without positives has no AUROC)."""
    if any(math.isnan(v) for v in values):
        return dict.fromkeys(("mean", "sd", "min", "max"), math.nan)
    sd = statistics.stdev(values) if len(values) > 1 else math.nan
    return {"mean": statistics.mean(values), "sd": sd, "min": min(values), "max": max(values)}


def difference(first: Group, second: Group, key: str) -> dict[str, Any]:
    """Mean of `second` minus mean of `first`, with a 95% Student-t interval: paired by seed
    when both groups ran the same seeds, else Welch's. NaN where a group has one run, and all
    NaN where a run's value is."""
    a, b = first.values(key), second.values(key)
    paired = first.seeds == second.seeds
    if any(math.isnan(v) for v in a + b):
        return {"difference": math.nan, "low": math.nan, "high": math.nan, "paired": paired}
    low = high = math.nan
    if min(len(a), len(b)) > 1:
        with warnings.catch_warnings():  # identical values: scipy warns, the interval is exact
            warnings.simplefilter("ignore", RuntimeWarning)
            test = stats.ttest_rel(b, a) if paired else stats.ttest_ind(b, a, equal_var=False)
            low, high = (float(v) for v in test.confidence_interval(0.95))
    mean = statistics.mean(b) - statistics.mean(a)
    return {"difference": mean, "low": low, "high": high, "paired": paired}


def group_table(groups: list[Group]) -> tuple[str, list[dict]]:
    """The markdown table and the CSV rows of the groups."""
    shown = groups[0].runs[0].columns  # one dataset: check_comparable
    lines = [
        "| group | seeds | " + " | ".join(column for column, _ in shown) + " |",
        "| --- | --- |" + " --- |" * len(shown),
    ]
    rows = []
    for group in groups:
        cells, row = [], {"group": group.name, "n_seeds": len(group.runs)}
        row["seeds"] = " ".join(map(str, group.seeds))
        for _, key in shown:
            s = summary(group.values(key))
            cells.append(
                UNDEFINED
                if math.isnan(s["mean"])
                else f"{s['mean']:.4f} (1 seed)"
                if len(group.runs) == 1
                else f"{s['mean']:.4f} ± {s['sd']:.4f} ({s['min']:.4f} to {s['max']:.4f})"
            )
            row |= {f"{key} {stat}": value for stat, value in s.items()}
        lines.append(
            f"| {group.name} | {len(group.runs)} ({row['seeds']}) | " + " | ".join(cells) + " |"
        )
        rows.append(row)
    notes = []
    if any(len(group.runs) > 1 for group in groups):
        notes.append("mean ± sample standard deviation over the seeds (min to max).")
    if any(math.isnan(v) for row in rows for name, v in row.items() if name.endswith(" mean")):
        notes.append(f"{UNDEFINED}: {WHY_UNDEFINED}.")
    if notes:
        lines += ["", " ".join(notes)]
    return "\n".join(lines), rows


def difference_table(first: Group, second: Group) -> tuple[str, list[dict]]:
    kind = "paired by seed" if first.seeds == second.seeds else "Welch (the seeds differ)"
    lines = [
        f"Difference, ({second.name}) minus ({first.name}), 95% interval, {kind}:",
        "",
        "| metric | first | second | difference [95% interval] |",
        "| --- | --- | --- | --- |",
    ]
    rows = []
    for column, key in first.runs[0].columns:
        d = difference(first, second, key)
        a, b = summary(first.values(key))["mean"], summary(second.values(key))["mean"]
        if math.isnan(d["difference"]):
            cells = [f"{v:.4f}" if not math.isnan(v) else UNDEFINED for v in (a, b)]
            lines.append(f"| {column} | {cells[0]} | {cells[1]} | {UNDEFINED} |")
        else:
            interval = (
                "n/a (a group of one run)"
                if math.isnan(d["low"])
                else f"[{d['low']:+.4f}, {d['high']:+.4f}]"
            )
            lines.append(f"| {column} | {a:.4f} | {b:.4f} | {d['difference']:+.4f} {interval} |")

        rows.append({"metric": key, "first": a, "second": b} | d)
    return "\n".join(lines), rows


WRITTEN = ("compare.md", "compare.csv", DIFFERENCE)


def output_folder(folders: list[Path], out: Path | None) -> Path:
    """Where the tables go: `--out`, else the one folder given (its tables of an earlier
    comparison are replaced), else the current folder, but only if it holds no files of those
    names: they may be the user's own, not an earlier comparison's."""
    if out is not None:
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file: give a folder (it is made if missing).")
        return out
    if len(folders) == 1:
        return folders[0]
    taken = [name for name in WRITTEN if (Path.cwd() / name).exists()]
    if taken:
        raise UserError(
            f"the current folder ({Path.cwd()}) already has {', '.join(taken)}: give --out DIR "
            f"for this comparison's tables (they are written into the current folder only when "
            f"several folders are given and it has none of {', '.join(WRITTEN)})."
        )
    return Path.cwd()


def write_all(out: Path, files: dict[str, str]) -> None:
    """Every file whole, or none: each written beside its target first, then all renamed; a
    difference table of an earlier comparison that this one has not is removed."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"--out {out} cannot be made ({e.strerror}): give another folder."
        ) from None
    for name, text in files.items():
        (out / f".{name}.tmp").write_text(text)
    for name in files:
        os.replace(out / f".{name}.tmp", out / name)
    if DIFFERENCE not in files:
        (out / DIFFERENCE).unlink(missing_ok=True)


def as_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def without_report(folders: list[Path]) -> list[Path]:
    """The training runs in `folders` (train's config in .hydra/) that wrote no report: a
    sweep's job that failed, a run stopped or still training. The tables leave them out, and
    say so."""
    runs = {
        config.parent.parent.resolve()
        for folder in folders
        for config in folder.rglob(str(run_files.CONFIG))
        if _task_of(config) == "train"  # not an evaluate or predict folder
    }
    return sorted(run for run in runs if not (run / run_files.REPORT / run_files.METRICS).exists())


def _task_of(config: Path) -> str | None:
    try:
        return (yaml.safe_load(config.read_text()) or {}).get("task_name")
    except (OSError, yaml.YAMLError, AttributeError):
        return None


def compare(folders: list[Path], out: Path) -> str:
    """Read, check and group the runs, then write the tables; return the markdown."""
    runs = find_runs(folders)
    check_comparable(runs)
    groups = group_runs(runs)
    markdown, rows = group_table(groups)
    left_out = without_report(folders)
    if left_out:
        markdown += (
            "\n\nLeft out, without a report (a job that failed, a run stopped or still "
            f"training): {', '.join(str(run) for run in left_out)}."
        )
    files = {"compare.csv": as_csv(rows)}
    if len(groups) == 2:
        text, difference_rows = difference_table(*groups)
        markdown += "\n\n" + text
        files[DIFFERENCE] = as_csv(difference_rows)
    files["compare.md"] = markdown + "\n"
    write_all(out, files)
    return markdown


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="run or sweep folders")
    parser.add_argument(
        "--out", type=Path, help=f"where compare.md, compare.csv and {DIFFERENCE} go"
    )
    args = parser.parse_args(argv)
    out = report_user_errors(lambda: output_folder(args.folders, args.out))
    print(report_user_errors(lambda: compare(args.folders, out)))
    written = [out / name for name in WRITTEN]
    print(f"\nwritten: {', '.join(str(p) for p in written if p.exists())}", file=sys.stderr)


if __name__ == "__main__":
    main()
    freeze_for_exit()
