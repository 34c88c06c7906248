"""`python -m chest_mnist.compare`: tables over runs that differ only by seed."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import yaml
from scipy import stats

from chest_mnist import UserError
from chest_mnist.compare import METRICS, compare, main
from tests.conftest import run_here
from tests.test_sweep import tiny

LABELS = ("effusion", "hernia")


def fake_run(folder: Path, seed: int, values: dict[str, float], **recipe) -> Path:
    """A run folder as train writes it: .hydra/config.yaml and report/metrics.json."""
    config = {
        "seed": seed,
        "paths": {"output_dir": str(folder)},
        "data": {"flag": recipe.pop("flag", "chestmnist"), "batch_size": 128},
        "model": {"optimizer": {"lr": recipe.pop("lr", 1e-3)}, "cuda_graph": "auto"},
        **recipe,
    }
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    metrics = {key: values[key] for _, key in METRICS if key in values}
    metrics |= {f"test/auroc/{label}": 0.5 for label in values.get("labels", LABELS)}
    (folder / "report").mkdir()
    (folder / "report" / "metrics.json").write_text(json.dumps(metrics))
    return folder


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def metric_values(auc: float) -> dict[str, float]:
    return {key: auc + i / 100 for i, (_, key) in enumerate(METRICS)}


def test_one_row_per_group_with_mean_sd_min_max(tmp_path):
    aucs = {1: 0.90, 2: 0.93, 3: 0.91}
    for seed, auc in aucs.items():
        fake_run(tmp_path / "sweep" / str(seed), seed, metric_values(auc))
    markdown = compare([tmp_path / "sweep"], tmp_path / "out")
    (row,) = read_csv(tmp_path / "out" / "compare.csv")
    values = list(aucs.values())
    assert row["n_seeds"] == "3" and row["seeds"] == "1 2 3" and row["group"] == "all runs"
    assert float(row["test/auroc mean"]) == pytest.approx(statistics.mean(values))
    assert float(row["test/auroc sd"]) == pytest.approx(statistics.stdev(values))
    assert (float(row["test/auroc min"]), float(row["test/auroc max"])) == (0.90, 0.93)
    assert float(row["test/acc mean"]) == pytest.approx(statistics.mean(values) + 0.01)
    assert "0.9133 ± 0.0153 (0.9000 to 0.9300)" in markdown
    assert (tmp_path / "out" / "compare.md").read_text() == markdown + "\n"


def test_a_multi_class_dataset_has_no_tuned_columns(tmp_path):
    """A multi-class model decides by its arg-max class: its report has no tuned thresholds,
    so no ACC tuned or macro F1 tuned, and compare shows the other columns."""
    untuned = {key: value for key, value in metric_values(0.9).items() if "_tuned" not in key}
    for seed, lr in ((1, 1e-3), (2, 1e-3), (1, 1e-2), (2, 1e-2)):
        fake_run(tmp_path / f"{lr}" / str(seed), seed, untuned, flag="bloodmnist", lr=lr)
    markdown = compare([tmp_path], tmp_path / "out")
    assert "| group | seeds | test AUC | test ACC | macro AP |" in markdown
    assert "tuned" not in markdown
    assert "test/acc_tuned mean" not in read_csv(tmp_path / "out" / "compare.csv")[0]
    assert [row["metric"] for row in read_csv(tmp_path / "out" / "compare_difference.csv")] == [
        "test/auroc",
        "test/acc",
        "test/ap_macro",
    ]
    # a multi-label report without them is an older one
    fake_run(tmp_path / "chest" / "1", 1, untuned)
    with pytest.raises(UserError, match="has no test/acc_tuned, test/f1_macro_tuned"):
        compare([tmp_path / "chest"], tmp_path / "out_chest")


def test_two_groups_paired_by_seed(tmp_path, capsys):
    first = {1: 0.90, 2: 0.93, 3: 0.91}
    second = {1: 0.92, 2: 0.94, 3: 0.95}
    for seed in (1, 2, 3):
        fake_run(tmp_path / "a" / str(seed), seed, metric_values(first[seed]))
        fake_run(tmp_path / "b" / str(seed), seed, metric_values(second[seed]), lr=1e-2)
    main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path)])
    printed = capsys.readouterr()
    markdown = printed.out
    written = [tmp_path / name for name in ("compare.md", "compare.csv", "compare_difference.csv")]
    assert f"written: {', '.join(map(str, written))}" in printed.err  # all three files
    rows = read_csv(tmp_path / "compare_difference.csv")
    auc = next(r for r in rows if r["metric"] == "test/auroc")
    d = [second[s] - first[s] for s in (1, 2, 3)]
    half = stats.t.ppf(0.975, 2) * statistics.stdev(d) / 3**0.5
    assert auc["paired"] == "True"
    assert float(auc["difference"]) == pytest.approx(statistics.mean(d))
    assert float(auc["low"]) == pytest.approx(statistics.mean(d) - half)
    assert float(auc["high"]) == pytest.approx(statistics.mean(d) + half)
    # the groups are named by the key they differ in
    groups = [r["group"] for r in read_csv(tmp_path / "compare.csv")]
    assert sorted(groups) == ["model.optimizer.lr=0.001", "model.optimizer.lr=0.01"]
    assert "paired by seed" in markdown


def test_two_groups_with_other_seeds_use_welch(tmp_path):
    first = {1: 0.90, 2: 0.93, 3: 0.91}
    second = {4: 0.92, 5: 0.96}
    for seed, auc in first.items():
        fake_run(tmp_path / "a" / str(seed), seed, metric_values(auc))
    for seed, auc in second.items():
        fake_run(tmp_path / "b" / str(seed), seed, metric_values(auc), lr=1e-2)
    compare([tmp_path], tmp_path / "out")
    rows = read_csv(tmp_path / "out" / "compare_difference.csv")
    auc = next(r for r in rows if r["metric"] == "test/auroc")
    # Welch's interval, from scipy's own test of the same difference
    a, b = list(first.values()), list(second.values())
    welch = stats.ttest_ind(b, a, equal_var=False).confidence_interval(0.95)
    assert auc["paired"] == "False"
    assert (float(auc["low"]), float(auc["high"])) == pytest.approx((welch.low, welch.high))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        ("empty", "holds no run report"),
        ("datasets", "The runs are of different dataset"),
        ("labels", "The runs are of different labels"),
        ("older", "a report of an older version"),
        ("no_config", "not a run that train wrote"),
        ("same_seed", "have the same seed"),
        ("no_seed", "was trained with seed=None"),
        ("empty_config", "holds no config"),
        ("null_metric", "test/acc is None, not a number"),
    ],
)
def test_bad_input_is_refused_naming_the_folder_and_nothing_is_written(tmp_path, make, message):
    runs = tmp_path / "runs"
    runs.mkdir()
    if make != "empty":
        fake_run(runs / "1", 1, metric_values(0.9))
    if make == "datasets":
        fake_run(runs / "2", 2, metric_values(0.9), flag="pneumoniamnist")
    elif make == "labels":
        fake_run(runs / "2", 2, metric_values(0.9) | {"labels": ("pneumonia",)})
    elif make == "older":
        metrics = runs / "1" / "report" / "metrics.json"
        metrics.write_text(json.dumps({"test/auroc": 0.9}))
    elif make == "no_config":
        (runs / "1" / ".hydra" / "config.yaml").unlink()
    elif make == "same_seed":
        fake_run(runs / "2", 1, metric_values(0.9))
    elif make == "no_seed":
        config = runs / "1" / ".hydra" / "config.yaml"
        config.write_text(config.read_text().replace("seed: 1", "seed: null"))
    elif make == "empty_config":
        (runs / "1" / ".hydra" / "config.yaml").write_text("")
    elif make == "null_metric":
        metrics = runs / "1" / "report" / "metrics.json"
        metrics.write_text(json.dumps(json.loads(metrics.read_text()) | {"test/acc": None}))
    with pytest.raises(UserError, match=message) as error:
        compare([runs], tmp_path / "out")
    assert str(runs) in str(error.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_compare_on_a_seed_sweep_of_real_runs(tmp_path, synthetic_npz):
    """`train -m seed=1,2`, then `compare` on the sweep: the table's numbers are the runs'."""
    sweep = tmp_path / "sweep"
    result = run_here(
        "chest_mnist.train",
        "-m",
        "seed=1,2",
        *tiny(synthetic_npz, tmp_path),
        "callbacks.progress_bar.refresh_rate=0",
        f"hydra.sweep.dir={sweep}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        f"python -m chest_mnist.compare {sweep}" in result.stdout + result.stderr
    )  # the sweep says
    result = run_here("chest_mnist.compare", str(sweep))
    assert result.returncode == 0, result.stderr[-3000:]
    aucs = [
        json.loads((sweep / j / "report" / "metrics.json").read_text())["test/auroc"] for j in "01"
    ]
    (row,) = read_csv(sweep / "compare.csv")
    assert row["seeds"] == "1 2" and row["group"] == "all runs"
    assert float(row["test/auroc mean"]) == pytest.approx(statistics.mean(aucs), abs=1e-12)
    assert f"{statistics.mean(aucs):.4f} ± {statistics.stdev(aucs):.4f}" in result.stdout


def test_compare_command_says_error_and_exits_2(tmp_path):
    result = run_here("chest_mnist.compare", str(tmp_path))
    assert result.returncode == 2
    assert f"error: {tmp_path} holds no run report" in result.stderr


def test_a_run_found_twice_counts_once_and_settings_that_only_show_do_not_split(tmp_path):
    fake_run(tmp_path / "sweep" / "1", 1, metric_values(0.90))
    fake_run(
        tmp_path / "sweep" / "2",
        2,
        metric_values(0.92),
        logger={"csv": {"x": 1}},
        bootstrap={"resamples": 10000},  # the report's intervals: not the recipe
        calibration={"method": "none", "per_label": False, "bins": 10},  # as run 1 did
        figures=False,  # what a sweep's runs do, beside a default run's figures
        callbacks={"last_checkpoint": {"min_interval_s": 0}},  # when last.ckpt is saved
    )
    fake_run(  # evaluation's batch size: how data reaches the model
        tmp_path / "sweep" / "3",
        3,
        metric_values(0.94),
        data={"flag": "chestmnist", "batch_size": 128, "eval_batch_size": 512},
    )
    compare([tmp_path / "sweep", tmp_path / "sweep" / "1"], tmp_path / "out")
    (row,) = read_csv(tmp_path / "out" / "compare.csv")
    assert (row["group"], row["seeds"]) == ("all runs", "1 2 3")


def test_runs_without_a_report_are_named_as_left_out(tmp_path):
    """A sweep's failed job has its config but no report: the table is of the others, and
    says which runs it left out (it said nothing)."""
    fake_run(tmp_path / "sweep" / "0", 1, metric_values(0.90))
    failed = tmp_path / "sweep" / "1"
    (failed / ".hydra").mkdir(parents=True)
    (failed / ".hydra" / "config.yaml").write_text("task_name: train\nseed: 2\n")
    evaluated = tmp_path / "sweep" / "evaluate" / "runs" / "1"  # not a training run
    (evaluated / ".hydra").mkdir(parents=True)
    (evaluated / ".hydra" / "config.yaml").write_text("task_name: evaluate\n")
    markdown = compare([tmp_path / "sweep"], tmp_path / "out")
    said = "Left out, without a report (a job that failed, a run stopped or still training): "
    assert markdown.endswith(f"{said}{failed.resolve()}.")
    assert (tmp_path / "out" / "compare.md").read_text() == markdown + "\n"
    (row,) = read_csv(tmp_path / "out" / "compare.csv")
    assert row["seeds"] == "1"
    fake_run(tmp_path / "other", 3, metric_values(0.90))
    assert "Left out" not in compare([tmp_path / "other"], tmp_path / "out2")


def test_a_group_of_one_run_and_no_stale_difference_table(tmp_path):
    fake_run(tmp_path / "a" / "1", 1, metric_values(0.90))
    fake_run(tmp_path / "b" / "1", 1, metric_values(0.92), lr=1e-2)
    markdown = compare([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    assert "0.9000 (1 seed)" in markdown and "+0.0200 n/a (a group of one run)" in markdown
    assert "±" not in markdown  # no spread, and no line saying what it is
    assert (tmp_path / "out" / "compare_difference.csv").exists()
    fake_run(tmp_path / "c" / "1", 1, metric_values(0.95), lr=3e-2)  # three groups now
    compare([tmp_path / "a", tmp_path / "b", tmp_path / "c"], tmp_path / "out")
    assert not (tmp_path / "out" / "compare_difference.csv").exists()
    assert len(read_csv(tmp_path / "out" / "compare.csv")) == 3


def test_the_users_own_files_are_never_replaced(tmp_path, monkeypatch, capsys):
    """Several folders write into the current folder by default, but not over files of the
    tables' names there (they may be the user's notes): an error asks for --out. An --out that
    is a file, or cannot be made, is an error line too; the one folder given gets its tables
    replaced, as a comparison run again."""
    for seed in (1, 2):
        fake_run(tmp_path / "a" / str(seed), seed, metric_values(0.9 + seed / 100))
        fake_run(tmp_path / "b" / str(seed), seed, metric_values(0.9), lr=1e-2)
    folders = [str(tmp_path / "a"), str(tmp_path / "b")]
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    (here / "compare.md").write_text("my own notes")
    with pytest.raises(SystemExit) as stopped:
        main(folders)
    assert stopped.value.code == 2
    assert "already has compare.md: give --out DIR" in capsys.readouterr().err
    assert (here / "compare.md").read_text() == "my own notes"
    assert sorted(p.name for p in here.iterdir()) == ["compare.md"]

    (here / "compare.md").unlink()
    main(folders)  # none there: written into the current folder
    assert sorted(p.name for p in here.iterdir()) == sorted(
        ["compare.md", "compare.csv", "compare_difference.csv"]
    )
    for out, said in [
        (here / "compare.md", "is a file: give a folder"),
        (Path("/proc/x"), "cannot be made"),
    ]:
        with pytest.raises(SystemExit):
            main([*folders, "--out", str(out)])
        assert said in capsys.readouterr().err
    main([folders[0]])
    main([folders[0]])  # its own tables, replaced
    assert (tmp_path / "a" / "compare.md").exists()


def test_an_undefined_metric_is_shown_as_undefined_not_a_traceback(tmp_path):
    """A run whose test split has no positives reports its AUROC as NaN (metrics.json allows
    it): its group's AUROC and the difference are "undefined", and the other columns and
    groups are computed as ever (compare stopped with an AttributeError from statistics)."""
    for seed, auc in ((1, 0.90), (2, 0.93)):
        fake_run(tmp_path / "a" / str(seed), seed, metric_values(auc))
        values = metric_values(auc + 0.01) | ({"test/auroc": float("nan")} if seed == 2 else {})
        fake_run(tmp_path / "b" / str(seed), seed, values, lr=1e-2)
    markdown = compare([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    rows = {row["group"]: row for row in read_csv(tmp_path / "out" / "compare.csv")}
    assert rows["model.optimizer.lr=0.01"]["test/auroc mean"] == "nan"
    assert float(rows["model.optimizer.lr=0.01"]["test/acc mean"]) == pytest.approx(0.935)
    assert float(rows["model.optimizer.lr=0.001"]["test/auroc mean"]) == pytest.approx(0.915)
    assert "| model.optimizer.lr=0.01 | 2 (1 2) | undefined | 0.9350 ± " in markdown
    assert "| test AUC | 0.9150 | undefined | undefined |" in markdown
    assert "undefined: a run's report has no value (NaN: a test split without positives" in markdown
    difference = {r["metric"]: r for r in read_csv(tmp_path / "out" / "compare_difference.csv")}
    assert difference["test/auroc"]["difference"] == "nan"
    assert float(difference["test/acc"]["difference"]) == pytest.approx(0.01)
    fine = compare([tmp_path / "a"], tmp_path / "out_a")
    assert "mean ± sample standard deviation over the seeds (min to max)." in fine
    assert "undefined" not in fine


def test_evaluations_are_not_runs_to_compare(tmp_path):
    """evaluate writes a report of a training run's weights, with no seed of its own: under a
    broad folder (logs/) it is skipped, and given alone it is named for what it is (compare
    said it "was trained with seed=None")."""
    fake_run(tmp_path / "logs" / "train" / "1", 1, metric_values(0.90))
    fake_run(tmp_path / "logs" / "train" / "2", 2, metric_values(0.92))
    evaluation = tmp_path / "logs" / "evaluate" / "runs" / "x"
    fake_run(evaluation, None, metric_values(0.5), task_name="evaluate")
    compare([tmp_path / "logs"], tmp_path / "out")
    (row,) = read_csv(tmp_path / "out" / "compare.csv")
    assert row["seeds"] == "1 2"
    with pytest.raises(UserError, match=r"holds evaluations only .*give the runs they evaluated"):
        compare([evaluation], tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
