"""chest_mnist.predict: images, folders and npz files in; one row per image out, bad files
flagged one by one, probabilities equal to the model's and to evaluate's."""

import csv
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from chest_mnist import UserError
from chest_mnist.batches import to_model_input
from chest_mnist.checkpoints import load_checkpoint, model_from_checkpoint
from chest_mnist.images import read_image
from chest_mnist.predict import collect, predict
from tests.conftest import ROOT, compose_train, run_here


def best_checkpoint(run: Path) -> Path:
    return Path(json.loads((run / "report" / "metrics.json").read_text())["best_checkpoint"])


def model_probabilities(ckpt: Path, images: np.ndarray) -> np.ndarray:
    """The model's own output on uint8 images, without predict's code: the reference."""
    checkpoint = load_checkpoint(ckpt)
    data = checkpoint["datamodule_hyper_parameters"]
    model = model_from_checkpoint(checkpoint).eval()
    with torch.no_grad():
        x = to_model_input(torch.from_numpy(images), data["mean"], data["std"])
        return model.probabilities(x).numpy()


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_npz_is_read_for_its_split_alone(tmp_path, synthetic_npz):
    """predict reads and checks only the split it predicts: a file with the test arrays alone
    is enough."""
    full = np.load(synthetic_npz)
    only_test = tmp_path / "only_test.npz"
    np.savez(only_test, test_images=full["test_images"], test_labels=full["test_labels"])
    items = collect([str(only_test)], 28, 1, "chestmnist", "test")
    assert [item.error for item in items] == [None] * len(full["test_images"])
    np.testing.assert_array_equal(np.stack([item.pixels for item in items]), full["test_images"])
    assert items[3].path == f"{only_test}:test[3]"
    (row,) = collect([str(only_test)], 28, 1, "chestmnist", "val")
    assert row.pixels is None and "has no key 'val_images'" in row.error


@pytest.fixture
def mixed_folder(tmp_path, synthetic_npz) -> tuple[Path, np.ndarray]:
    """Good PNGs, a JPEG, a big RGB image, and every kind of bad file, in one folder."""
    images = np.load(synthetic_npz)["test_images"][:3]
    folder = tmp_path / "xrays"
    folder.mkdir()
    (folder / "a_good.png").write_bytes(png_bytes(images[0]))
    (folder / "b_good.png").write_bytes(png_bytes(images[1]))
    Image.fromarray(images[2]).save(folder / "c_photo.jpg", quality=90)
    big = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    Image.fromarray(big).save(folder / "d_big_rgb.png")
    (folder / "e_notes.png").write_text("not a picture, only text\n")
    good = png_bytes(np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8))
    (folder / "f_truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "g_empty.png").write_bytes(b"")
    Image.fromarray(np.zeros((28, 28, 4), np.uint8), "RGBA").save(folder / "h_rgba.png")
    Image.fromarray(np.full((28, 28), 40000, np.uint16)).save(folder / "i_16bit.png")  # read
    (folder / "readme.txt").write_text("ignored: not an image suffix")
    # a name that is not UTF-8 (a Latin-1 zip's "röntgen"): Python holds its byte as \udcf6
    (folder / os.fsdecode(b"j_r\xf6ntgen.png")).write_bytes(png_bytes(images[0]))
    return folder, images


@pytest.mark.slow
def test_predict_on_a_folder_of_good_and_bad_files(trained_run, mixed_folder, tmp_path):
    folder, images = mixed_folder
    (tmp_path / "empty_folder").mkdir()
    ckpt = best_checkpoint(trained_run)
    out = tmp_path / "out.csv"
    result = run_here(
        "chest_mnist.predict",
        f"ckpt_path={ckpt}",
        f"inputs=[{folder},{tmp_path}/missing.png,{tmp_path}/empty_folder,"
        f"{ROOT}/tests/data/pneumoniamnist.npz]",
        f"output={out}",
        f"paths.log_dir={tmp_path}/logs",
    )
    assert result.returncode == 1, result.stderr[-3000:]  # some inputs failed...
    with open(out) as f:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(f)}
    # ...and every good one was predicted all the same
    # the file named in bytes that are not UTF-8 is there, its byte escaped as JSON does
    latin1 = "j_r\\udcf6ntgen.png"
    good = ["a_good.png", "b_good.png", "c_photo.jpg", "d_big_rgb.png", "i_16bit.png", latin1]
    assert all(rows[name]["error"] == "" for name in good)
    labels = load_checkpoint(ckpt)["hyper_parameters"]["labels"]
    ours = np.array([[float(rows[name][f"p_{label}"]) for label in labels] for name in good])

    jpeg = np.asarray(Image.open(folder / "c_photo.jpg").convert("L"))
    big = Image.open(folder / "d_big_rgb.png").convert("L").crop((15, 0, 105, 90))
    big = np.asarray(big.resize((28, 28), Image.Resampling.BICUBIC))
    blank = np.zeros((28, 28), np.uint8)  # one 16-bit value: no range to scale, black
    expected = model_probabilities(
        ckpt, np.stack([images[0], images[1], jpeg, big, blank, images[0]])
    )
    np.testing.assert_allclose(ours, expected, atol=1e-6)

    # the tuned thresholds of the run's report decide the predicted labels
    tuned = json.loads((trained_run / "report" / "thresholds.json").read_text())["labels"]
    for name, p in zip(good, ours, strict=True):
        wanted = [label for label, value in zip(labels, p, strict=True) if value > tuned[label]]
        assert rows[name]["predicted"] == ";".join(wanted)
        assert rows[name]["thresholds"].startswith("tuned on validation")

    errors = {
        "e_notes.png": "not an image Pillow can read",
        "f_truncated.png": "damaged or truncated image",
        "g_empty.png": "empty file",
        "h_rgba.png": "unsupported pixel format RGBA (4 channels)",
        "missing.png": "no such file or folder",
        "empty_folder": "folder with no images",
        "pneumoniamnist.npz": "chestmnist has 14 labels",
    }
    for name, message in errors.items():
        assert message in rows[name]["error"], (name, rows[name]["error"])
        assert rows[name]["p_" + labels[0]] == ""
        said = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert any(f"{name}: " in line and message in line for line in said), (name, said)
    assert "pneumoniamnist.npz" not in rows["pneumoniamnist.npz"]["error"]  # named once, not twice
    assert rows["i_16bit.png"]["converted"] == (
        "16-bit gray scaled to 8 bits (every pixel is 40000: made black)"
    )
    assert rows["a_good.png"]["converted"] == ""
    assert "readme.txt" not in rows
    assert len(rows) == len(good) + len(errors)
    assert "Traceback" not in result.stderr
    assert f"Predicted 6 images (14 labels), {len(errors)} failed" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["out.csv"]  # no .tmp


def predict_cfg(overrides: list[str], tmp_path: Path):
    return compose_train([f"paths.output_dir={tmp_path}/predict_run", *overrides], "predict")


def test_predict_on_the_test_npz_equals_evaluate(trained_run, synthetic_npz, tmp_path):
    summary = predict(  # ckpt_path=<run>: its best checkpoint, the one evaluate's report used
        predict_cfg(
            [f"ckpt_path={trained_run}", f"inputs=[{synthetic_npz}]", "format=json"], tmp_path
        )
    )
    assert summary["output"] == tmp_path / "predict_run" / "predictions.json"
    document = json.loads(summary["output"].read_text())
    assert document["checkpoint"] == str(best_checkpoint(trained_run))
    labels = document["labels"]
    scores = np.array(
        [[row["probabilities"][label] for label in labels] for row in document["predictions"]]
    )
    reported = np.load(trained_run / "report" / "predictions.npz")
    assert scores.shape == reported["scores"].shape == (256, 14)
    np.testing.assert_allclose(scores, reported["scores"], atol=1e-6)
    assert document["predictions"][5]["path"] == f"{synthetic_npz}:test[5]"
    assert document["thresholds_from"].startswith("tuned on validation")


def test_without_a_report_the_threshold_is_one_half_and_said(trained_run, synthetic_npz, tmp_path):
    lonely = tmp_path / "elsewhere" / "checkpoints" / "model.ckpt"
    lonely.parent.mkdir(parents=True)
    shutil.copy(best_checkpoint(trained_run), lonely)
    summary = predict(
        predict_cfg([f"ckpt_path={lonely}", f"inputs={synthetic_npz}", "split=val"], tmp_path)
    )
    with open(summary["output"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 256 and summary["failed"] == 0
    assert rows[0]["thresholds"].startswith("0.5 for every label (no thresholds.json")
    for row in rows[:20]:
        p = {k[2:]: float(v) for k, v in row.items() if k.startswith("p_")}
        assert row["predicted"] == ";".join(label for label, v in p.items() if v > 0.5)


def test_thresholds_are_used_only_for_the_weights_they_were_tuned_for(
    trained_run, synthetic_npz, tmp_path, capsys
):
    """The report's thresholds.json names the checkpoint and the digest of its weights. Other
    weights of the same run (last.ckpt after a later best epoch, say) get 0.5 with a warning,
    unless the file is given explicitly."""
    from chest_mnist.checkpoints import weights_digest

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("tensorboard"))
    best = run / "checkpoints" / best_checkpoint(trained_run).name
    tuned = json.loads((run / "report" / "thresholds.json").read_text())
    assert tuned["checkpoint"] == best.name
    assert tuned["weights_sha256"] == weights_digest(load_checkpoint(best)["state_dict"])
    changed = load_checkpoint(best)
    changed["state_dict"]["head.bias"] = changed["state_dict"]["head.bias"] + 1e-4  # barely
    torch.save(changed, run / "checkpoints" / "changed.ckpt")

    def predicted(ckpt, *overrides):
        out = tmp_path / f"{ckpt.stem}{len(overrides)}.csv"
        cfg = predict_cfg(
            [f"ckpt_path={ckpt}", f"inputs={synthetic_npz}", "split=val", f"output={out}"]
            + list(overrides),
            tmp_path,
        )
        predict(cfg)
        with open(out) as f:
            return list(csv.DictReader(f))

    def decided_at(row, thresholds):
        return ";".join(k for k, t in thresholds.items() if float(row[f"p_{k}"]) > t)

    rows = predicted(best)  # its own thresholds
    assert rows[0]["thresholds"] == f"tuned on validation ({run}/report/thresholds.json)"
    assert all(row["predicted"] == decided_at(row, tuned["labels"]) for row in rows)

    capsys.readouterr()
    rows = predicted(run / "checkpoints" / "changed.ckpt")  # other weights: 0.5, and why
    why = (
        f"{run}/report/thresholds.json was tuned for other weights ({best.name}), not changed.ckpt"
    )
    assert rows[0]["thresholds"] == f"0.5 for every label ({why})"
    half = dict.fromkeys(tuned["labels"], 0.5)
    assert all(row["predicted"] == decided_at(row, half) for row in rows)
    assert any(decided_at(row, half) != decided_at(row, tuned["labels"]) for row in rows)
    assert f"warning: {why}: every label at 0.5" in capsys.readouterr().err

    rows = predicted(  # given explicitly: used, and said for which weights they were tuned
        run / "checkpoints" / "changed.ckpt", f"thresholds={run}/report/thresholds.json"
    )
    assert rows[0]["thresholds"].startswith(f"tuned on validation for other weights ({best.name})")
    assert all(row["predicted"] == decided_at(row, tuned["labels"]) for row in rows)


def test_thresholds_that_name_no_weights_are_not_used_silently(tmp_path, capsys):
    """A thresholds.json written before they named their weights (no weights_sha256) is not
    used next to a checkpoint: 0.5, and why. Given as thresholds=PATH it is used, and the
    source says its weights are unknown, not that they are other weights; a report of weights
    in no checkpoint file says so instead of "None"."""
    from chest_mnist.task import MULTI_LABEL_TASK
    from chest_mnist.tuned import choose_tuned

    def choose_thresholds(*args):
        tuned = choose_tuned(*args)
        assert tuned.temperature is None  # none in these files
        return tuned.thresholds, tuned.thresholds_from

    labels = ["a", "b"]
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    beside = tmp_path / "run" / "report" / "thresholds.json"
    beside.parent.mkdir(parents=True)
    beside.write_text(json.dumps({"rule": "f1", "labels": {"a": 0.3, "b": 0.7}}))  # older file

    values, source = choose_thresholds(None, ckpt, "0" * 64, labels, MULTI_LABEL_TASK)
    assert values == [0.5, 0.5]
    assert source == f"0.5 for every label ({beside} does not say which weights it was tuned for)"
    assert "does not say which weights it was tuned for: every label at 0.5, no" in (
        capsys.readouterr().err
    )
    values, source = choose_thresholds(str(beside), ckpt, "0" * 64, labels, MULTI_LABEL_TASK)
    assert values == [0.3, 0.7]
    assert source == (
        "tuned on validation for weights it does not name (an older thresholds.json), "
        f"given as thresholds={beside}"
    )

    named = {"rule": "f1", "labels": {"a": 0.3, "b": 0.7}, "checkpoint": None}
    beside.write_text(json.dumps(named | {"weights_sha256": "f" * 64}))  # no checkpoint file
    values, source = choose_thresholds(None, ckpt, "0" * 64, labels, MULTI_LABEL_TASK)
    assert values == [0.5, 0.5] and "None" not in source
    assert "tuned for other weights (in no checkpoint file), not last.ckpt" in source


@pytest.mark.parametrize(
    ("content", "said"),
    [
        ('{"labels": {"a": NaN, "b": 0.7}}', "a threshold is not a finite number"),
        ('{"labels": {"a": 0.3, "b": Infinity}}', "a threshold is not a finite number"),
        (
            '{"labels": {"a": 0.3, "b": 0.7}, "temperatures": {"a": 1.0, "b": Infinity}}',
            "a temperature is not a finite number above 0",
        ),
        ('{"labels": null}', "is a multi-class model's"),  # for a multi-label model
        # another model's: labels a and b among others (ChestMNIST's hold PneumoniaMNIST's one)
        ('{"labels": {"a": 0.3, "b": 0.7, "c": 0.5}}', "its labels are a, b, c"),
        (
            '{"labels": {"a": 0.3, "b": 0.7}, "temperatures": {"a": 1.0, "b": 1.0, "c": 2.0}}',
            "its labels are a, b, c",
        ),
        (None, "cannot be read (Is a directory)"),
    ],
    ids=[
        "nan",
        "infinite",
        "infinite_temperature",
        "multi_class_file",
        "more_labels",
        "more_temperatures",
        "a_folder",
    ],
)
def test_a_thresholds_file_that_cannot_be_used_is_named(tmp_path, content, said):
    """JSON allows NaN and Infinity, a multi-class report's file has no thresholds, and another
    model's file may hold this model's labels among its own: each is refused with the file's
    name rather than used (NaN would never predict its label)."""
    from chest_mnist.task import MULTI_LABEL_TASK
    from chest_mnist.tuned import choose_tuned

    path = tmp_path / "thresholds.json"
    if content is None:
        path.mkdir()
    else:
        path.write_text(content)
    with pytest.raises(UserError, match=f"thresholds={path} ") as error:
        choose_tuned(str(path), tmp_path / "x.ckpt", "0" * 64, ["a", "b"], MULTI_LABEL_TASK)
    assert said in str(error.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([], "ckpt_path is missing"),
        (["ckpt_path=CKPT"], "inputs is empty"),
        (["ckpt_path=CKPT", "inputs=[x.png]", "format=xml"], "format='xml' must be csv or json"),
        (["ckpt_path=CKPT", "inputs=[x.png]", "thresholds=/no/such.json"], "does not exist"),
        (["ckpt_path=CKPT", "inputs=[x.png]", "output=EXISTING"], "already exists; it was left"),
        (["ckpt_path=CKPT", "inputs=[x.png]", "device=gpu0"], "is not a device"),
        (["ckpt_path=CKPT", "inputs=[x.png]", "cam=no"], "cam='no' must be true or false"),
        (["ckpt_path=CKPT", "inputs=[x.png]", "output=EXISTING/x.csv"], "cannot be written"),
        (["ckpt_path=CKPT", "inputs=[x.png]", "output=out/"], "names a folder: give a file"),
        (["ckpt_path=CKPT", "inputs=[x.png]", "output=p.json"], "ends in .json but format=csv"),
    ],
)
def test_usage_errors_name_the_key(trained_run, tmp_path, overrides, message):
    existing = tmp_path / "mine.csv"
    existing.write_text("precious\n")
    ckpt = str(best_checkpoint(trained_run))
    overrides = [o.replace("CKPT", ckpt).replace("EXISTING", str(existing)) for o in overrides]
    with pytest.raises(UserError, match=message):
        predict(predict_cfg(overrides, tmp_path))
    assert existing.read_text() == "precious\n"


def test_device_is_checked_against_the_machine(monkeypatch):
    from chest_mnist.cli import resolve_device

    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="device=cuda, but this machine has no CUDA GPU"):
        resolve_device("cuda")
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    with pytest.raises(UserError, match=r"has 2 GPU\(s\): cuda:0 to cuda:1"):
        resolve_device("cuda:2")
    assert resolve_device("cuda:1") == torch.device("cuda:1")


def test_read_image_crops_to_the_centre_and_keeps_the_right_size(tmp_path):
    wide = np.zeros((28, 56), np.uint8)
    wide[:, 14:42] = 200  # the centre square is bright, the sides dark
    Image.fromarray(wide).save(tmp_path / "wide.png")
    pixels, _ = read_image(tmp_path / "wide.png", size=28, channels=1)
    assert pixels.shape == (28, 28) and pixels.dtype == np.uint8 and (pixels == 200).all()
    rgb, _ = read_image(tmp_path / "wide.png", size=64, channels=3)
    assert rgb.shape == (64, 64, 3)


def test_a_numbered_folder_is_a_checkpoint_path_too(
    trained_run, synthetic_npz, tmp_path, monkeypatch
):
    """A sweep's job folders are 0, 1, ...: ckpt_path=0 there (a number to Hydra) is that run."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "0").symlink_to(trained_run)
    summary = predict(
        predict_cfg(["ckpt_path=0", f"inputs=[{synthetic_npz}]", "output=0.csv"], tmp_path)
    )
    assert summary["output"].exists()
