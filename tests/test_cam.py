"""chest_mnist.cam and its uses: Grad-CAM heatmaps where the evidence is, at any size, the model
left as it was; predict's `cam=true` files; the report's heatmaps.png."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from chest_mnist import UserError
from chest_mnist.batches import SplitDataset
from chest_mnist.cam import heatmaps, overlay, safe_name, target_layer
from chest_mnist.model import MedMNISTClassifier
from chest_mnist.predict import predict
from chest_mnist.report_content import build_report
from chest_mnist.report_heatmaps import top_scored, write_heatmap_figure
from chest_mnist.synthetic import write_synthetic
from chest_mnist.task import Task
from tests.conftest import compose_train
from tests.test_predict import best_checkpoint, png_bytes


def bright_and_dark_model(tta_flip: bool = False) -> MedMNISTClassifier:
    """A ResNet-18 (cifar stem) whose weights are set so that its evidence is known: output 0
    ("bright") is the mean over `layer4`'s 4x4 cells of the bright pixels sampled there, output
    1 ("dark") the same for dark pixels, output 2 ("not_bright") minus output 0. Every other weight is zero, so each residual block
    passes channels 0 (bright) and 1 (dark) on unchanged, subsampled by the strided 1x1
    shortcuts: layer4's cell (i, j) sees pixel (8i, 8j) only."""
    labels = ["bright", "dark", "not_bright"]
    model = MedMNISTClassifier(labels=labels, stem="cifar", tta_flip=tta_flip)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d | torch.nn.Linear):
                module.weight.zero_()
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.reset_parameters()  # weight 1, bias 0, mean 0, var 1: the identity
        stem = model.backbone.conv1.weight  # (64, 3, 3, 3): gray is 3 equal channels
        stem[0, :, 1, 1], stem[1, :, 1, 1] = 1 / 3, -1 / 3  # ReLU after: bright, dark
        for name in ("layer2", "layer3", "layer4"):
            shortcut = getattr(model.backbone, name)[0].downsample[0].weight
            shortcut[0, 0, 0, 0] = shortcut[1, 1, 0, 0] = 1.0
        model.head.weight[0, 0] = model.head.weight[1, 1] = 1.0
        model.head.weight[2, 0] = -1.0  # evidence against: Grad-CAM keeps only evidence for
    return model


def quadrant_image() -> np.ndarray:
    """Mid gray (no evidence either way), a bright square top-left, a dark one bottom-right."""
    image = np.full((28, 28), 128, np.uint8)
    image[:12, :12] = 255
    image[16:, 16:] = 0
    return image


def quadrant_shares(heatmap: np.ndarray) -> np.ndarray:
    """The share of the heatmap's mass in each quadrant: top-left, top-right, bottom-left,
    bottom-right."""
    h, w = heatmap.shape
    quarters = [heatmap[: h // 2, : w // 2], heatmap[: h // 2, w // 2 :]]
    quarters += [heatmap[h // 2 :, : w // 2], heatmap[h // 2 :, w // 2 :]]
    return np.array([q.sum() for q in quarters]) / heatmap.sum()


@pytest.mark.parametrize("tta_flip", [False, True])
def test_the_heatmap_is_where_the_evidence_is(tta_flip):
    model = bright_and_dark_model(tta_flip)
    image = quadrant_image()
    mirrored = image[:, ::-1]  # bright top-right, dark bottom-left
    pixels = np.stack([image, mirrored])
    scores = torch.sigmoid(model.eval()(torch.zeros(1, 3, 28, 28)))
    assert torch.allclose(scores, torch.tensor(0.5))  # mid gray: no evidence for either

    maps = heatmaps(model, pixels, 0.5, 0.5, [0, 1])
    # (the bilinear upsampling of a 4x4 map spills an eighth over the quadrant's edges)
    assert quadrant_shares(maps[0, 0])[0] > 0.8  # bright: top-left
    assert quadrant_shares(maps[0, 1])[3] > 0.8  # dark: bottom-right
    assert quadrant_shares(maps[1, 0])[1] > 0.8  # the mirror's bright: top-right
    assert quadrant_shares(maps[1, 1])[2] > 0.8
    # each image its own outputs: (N, K) indices
    own = heatmaps(model, pixels, 0.5, 0.5, np.array([[1], [0]]))
    np.testing.assert_allclose(own[:, 0], [maps[0, 1], maps[1, 0]], atol=1e-6)
    # no evidence at all for an output: an all-zero map, not noise stretched to [0, 1]
    blank = heatmaps(model, np.zeros((1, 28, 28), np.uint8), 0.5, 0.5, [0])  # nothing bright
    assert blank.max() == 0.0
    against = heatmaps(model, image[None], 0.5, 0.5, [2])  # the ReLU drops evidence against
    assert against.max() == 0.0


@pytest.mark.parametrize(
    ("size", "stem", "stage"), [(28, "cifar", "layer4"), (64, "imagenet", "layer3")]
)
@pytest.mark.parametrize("channels", [1, 3])
def test_heatmap_shape_and_range(size, stem, stage, channels):
    torch.manual_seed(0)
    model = MedMNISTClassifier(labels=list("abcde"), stem=stem)
    # the imagenet stem leaves 2x2 at layer4 of a 64px image: the stage before has 4x4
    assert target_layer(model, size) is getattr(model.backbone, stage)
    shape = (3, size, size) + ((3,) if channels == 3 else ())
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    maps = heatmaps(model, pixels, 0.5, 0.5, [4, 0])
    assert maps.shape == (3, 2, size, size) and maps.dtype == np.float32
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    peaks = maps.max(axis=(2, 3))
    assert np.all((peaks > 0.999) | (peaks == 0.0)), peaks  # each map scaled to its own peak
    assert (peaks > 0).sum() >= 3  # a random network has evidence somewhere
    picture = overlay(pixels[0], maps[0, 0])
    side = 224 if size == 28 else 256  # a whole factor: 8x, 4x
    assert picture.shape == (side, side, 3) and picture.dtype == np.uint8


def test_the_model_is_left_as_it_was():
    torch.manual_seed(0)
    model = MedMNISTClassifier(labels=list("abc"), stem="cifar").train()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    pixels = np.random.default_rng(1).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    with torch.inference_mode():  # predict's context: heatmaps need gradients all the same
        heatmaps(model, pixels, 0.5, 0.5, [0, 1, 2], batch_size=5)
    after = model.state_dict()
    # in train mode, BatchNorm would have moved its running statistics
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert all(p.grad is None for p in model.parameters())
    assert model.training  # as the caller had it


def test_overlay_upscales_the_image_as_squares_and_blends_the_heatmap():
    image = np.zeros((28, 28), np.uint8)
    image[0, 0] = 255
    heatmap = np.zeros((28, 28), np.float32)
    picture = overlay(image, heatmap, alpha=0.4, colormap="gray")
    assert picture.shape == (224, 224, 3)
    # pixel (0, 0) is an 8x8 block: 0.6 * 255 + 0.4 * (heat 0: black)
    assert (picture[:8, :8] == 153).all() and (picture[8:, 8:] == 0).all()
    hot = overlay(np.zeros((28, 28), np.uint8), np.ones((28, 28), np.float32), colormap="gray")
    assert (hot == 102).all()  # 0.4 * 255
    with pytest.raises(ValueError, match="differ in size"):
        overlay(image, np.zeros((14, 14), np.float32))


def test_safe_names():
    assert safe_name("/data/chest.npz:test[3]") == "data_chest.npz_test_3"
    assert safe_name("pleural_thickening") == "pleural_thickening"
    assert safe_name("cancer-associated stroma") == "cancer-associated_stroma"
    assert safe_name("../..") == "image"


# predict cam=true


def predict_with(tmp_path, *overrides):
    cfg = compose_train([f"paths.output_dir={tmp_path}/predict_run", *overrides], "predict")
    return predict(cfg)


@pytest.fixture
def folder_of_xrays(tmp_path, synthetic_npz) -> Path:
    """Six test images as PNGs, two of them with the same name in subfolders, and a bad file."""
    images = np.load(synthetic_npz)["test_images"][:6]
    folder = tmp_path / "xrays"
    for i, image in enumerate(images):
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"scan {i // 2}.png").write_bytes(png_bytes(image))
    (folder / "broken.png").write_text("not an image")
    return folder


def test_predict_draws_a_heatmap_per_predicted_finding(trained_run, folder_of_xrays, tmp_path):
    out = tmp_path / "out" / "preds.csv"
    summary = predict_with(
        tmp_path,
        f"ckpt_path={trained_run}",
        f"inputs=[{folder_of_xrays}]",
        f"output={out}",
        "cam=true",
        # low thresholds, so that most images have a finding or more to draw
        f"thresholds={low_thresholds(trained_run, tmp_path)}",
    )
    assert summary["failed"] == 1
    with open(out) as f:
        rows = list(csv.DictReader(f))
    written = sorted(p.name for p in (out.parent / "preds_cam").iterdir())
    named = []
    for n, row in enumerate(rows):
        files = row["cam"].split(";") if row["cam"] else []
        if row["error"]:
            assert files == []  # a file that failed gets none
            continue
        predicted = row["predicted"].split(";") if row["predicted"] else []
        # rows 0-6: one digit; "scan 0.png" is in two folders, the row number tells them apart
        stem = f"preds_cam/{n}_{safe_name(Path(row['path']).name)}"
        assert files == [f"{stem}_{label}.png" for label in predicted]
        named += files
    assert 8 <= len(named) == len(written)
    assert sorted(Path(f).name for f in named) == written
    picture = np.asarray(Image.open(out.parent / named[0]))
    assert picture.shape == (224, 224, 3)


def low_thresholds(run: Path, tmp_path: Path) -> Path:
    """The run's thresholds.json with every threshold at the 30th percentile of its test
    scores: most images get a few findings."""
    document = json.loads((run / "report" / "thresholds.json").read_text())
    scores = np.load(run / "report" / "predictions.npz")["scores"]
    cuts = np.quantile(scores, 0.7, axis=0)
    document["labels"] = dict(zip(document["labels"], map(float, cuts), strict=True))
    path = tmp_path / "low_thresholds.json"
    path.write_text(json.dumps(document))
    return path


def test_predict_cam_top_k_draws_k_per_image_in_json(trained_run, tmp_path):
    npz = write_synthetic(tmp_path / "small.npz", n_train=8, n_val=8, n_test=12, seed=1)
    out = tmp_path / "preds.json"
    predict_with(
        tmp_path,
        f"ckpt_path={best_checkpoint(trained_run)}",
        f"inputs=[{npz}]",
        f"output={out}",
        "format=json",
        "cam=true",
        "cam_top_k=2",
    )
    document = json.loads(out.read_text())
    rows, labels = document["predictions"], document["labels"]
    assert len(rows) == 12 and len(list((tmp_path / "preds_cam").iterdir())) == 24
    for n, row in enumerate(rows):
        p = row["probabilities"]
        top = sorted(labels, key=lambda label: -p[label])[:2]  # most probable first
        assert row["cam"] == [f"preds_cam/{n:02d}_small.npz_test_{n}_{label}.png" for label in top]


def test_an_existing_heatmap_folder_is_refused_before_anything(tmp_path):
    out = tmp_path / "preds.csv"
    (tmp_path / "preds_cam").mkdir()
    (tmp_path / "preds_cam" / "mine.png").write_bytes(b"keep me")
    with pytest.raises(UserError, match="preds_cam already exists; it was left as it is"):
        # the checkpoint does not exist: the folder is refused before it is looked for
        predict_with(
            tmp_path, "ckpt_path=/no/such.ckpt", "inputs=[x.png]", f"output={out}", "cam=true"
        )
    assert not out.exists()
    assert [p.name for p in (tmp_path / "preds_cam").iterdir()] == ["mine.png"]
    assert (tmp_path / "preds_cam" / "mine.png").read_bytes() == b"keep me"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["cam_top_k=2"], "cam_top_k=2 chooses which heatmaps to draw: add cam=true"),
        (["cam=true", "cam_top_k=0"], "cam_top_k=0 must be a positive whole number"),
    ],
)
def test_cam_options_are_checked(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        predict_with(tmp_path, "ckpt_path=/no/such.ckpt", "inputs=[x.png]", *overrides)


# the report's figure


def test_training_writes_the_heatmap_figure(trained_run):
    """train's report comes from evaluate_model: heatmaps.png has a row per label (14)."""
    figure = Image.open(trained_run / "report" / "heatmaps.png")
    assert figure.size[1] > 14 * 150
    text = (trained_run / "report" / "report.md").read_text()
    assert "- [reliability.png](reliability.png)\n- [heatmaps.png](heatmaps.png)" in text


def test_the_figure_shows_the_top_scores_with_their_verdicts(tmp_path):
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.6], [0.1, 0.3]])
    truth = torch.tensor([[1, 0], [0, 0], [0, 1], [0, 1]])
    report = build_report((scores, truth), (scores, truth), ["a", "b"], torch.tensor([0.5, 0.5]))
    thresholds = report.thresholds.tolist()
    picks = top_scored(report, per_label=3)
    assert [(p.image, p.output) for p in picks] == [(0, 0), (2, 0), (1, 0), (1, 1), (2, 1), (3, 1)]
    for pick in picks:
        said = scores[pick.image, pick.output] > thresholds[pick.output]
        present = truth[pick.image, pick.output] == 1
        assert pick.verdict == ("T" if said == present else "F") + ("P" if said else "N")
        assert pick.score == pytest.approx(float(scores[pick.image, pick.output]))

    # a multi-class task: per class, "is this class" against the truth, arg-max decides
    classes = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.1, 0.4], [0.1, 0.1, 0.8]])
    report = build_report(
        (classes, torch.tensor([[0], [2], [2]])),
        (classes, torch.tensor([[0], [2], [2]])),
        ["x", "y", "z"],
        torch.tensor([0.3, 0.3, 0.4]),
        task=Task.from_medmnist("multi-class"),
    )
    verdicts = {(p.image, p.output): p.verdict for p in top_scored(report, per_label=2)}
    assert verdicts == {
        (0, 0): "TP",
        (1, 0): "FP",  # arg-max x, but it is z
        (0, 1): "TN",
        (1, 1): "TN",  # a tie at 0.1 with image 2: the first in the split
        (2, 2): "TP",
        (1, 2): "FN",
    }


def test_heatmap_figure_from_a_datamodule(tmp_path, drawn_figures):
    from tests.conftest import title_clear_of_the_panels

    class Data:  # what write_heatmap_figure reads of a MedMNISTDataModule
        hparams = type("H", (), {"mean": 0.5, "std": 0.5})
        splits = {"test": SplitDataset(torch.from_numpy(np.stack([quadrant_image()] * 5)), None)}

    model = bright_and_dark_model()
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(5, 3, generator=g)
    truth = torch.randint(0, 2, (5, 3), generator=g)
    report = build_report(
        (scores, truth), (scores, truth), ["bright", "dark", "not_bright"], torch.full((3,), 0.5)
    )
    path = write_heatmap_figure(model, Data(), report, tmp_path, per_label=2)
    assert path == tmp_path / "heatmaps.png"
    (fig,) = drawn_figures
    assert title_clear_of_the_panels(fig)  # laid out by fixed margins, no layout engine
    # a row per label, a column per image: 1.9 in a column and 2.0 a row (plus margins), 100 dpi
    assert Image.open(path).size == (round(100 * (1.9 * 2 + 0.6)), round(100 * (2.0 * 3 + 0.4)))


def test_a_failing_heatmap_figure_costs_only_itself(trained_run, tmp_path, monkeypatch, caplog):
    """Grad-CAM needs gradients through the model (memory on a GPU): when it fails, the
    report is still written, without the figure and its link."""
    from chest_mnist import evaluate as evaluate_module
    from tests.conftest import compose_train

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(evaluate_module, "write_heatmap_figure", out_of_memory)
    evaluate_module.evaluate(
        compose_train(
            [
                f"ckpt_path={trained_run}",
                "trainer=cpu",
                "+trainer.enable_progress_bar=false",
                f"paths.output_dir={tmp_path}",
                "bootstrap.resamples=0",
            ],
            "evaluate",
        )
    )
    report = tmp_path / "report"
    assert (report / "metrics.json").is_file() and (report / "thresholds.json").is_file()
    assert not (report / "heatmaps.png").exists()
    assert "heatmaps.png" not in (report / "report.md").read_text()
    assert "No heatmaps.png (RuntimeError: CUDA out of memory (simulated))" in caplog.text
