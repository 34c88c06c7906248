import json

import numpy as np
import pytest
import torch

from chest_mnist.bench import PILDataset, reference_transform
from chest_mnist.data import to_model_input
from chest_mnist.model import build_resnet18
from chest_mnist.synthetic import make_synthetic
from tests.conftest import run_module


def test_fast_and_reference_paths_give_the_same_loss():
    """Same weights, same first batch: the speed does not change the maths."""
    arrays = make_synthetic(n_train=32, n_val=2, n_test=2, seed=5)
    images, labels = arrays["train_images"], arrays["train_labels"]
    reference = PILDataset(images, labels, reference_transform())
    x_ref = torch.stack([reference[i][0] for i in range(32)])
    y_ref = torch.from_numpy(np.stack([reference[i][1] for i in range(32)]))
    x_ours = to_model_input(torch.from_numpy(images), mean=0.5, std=0.5)
    assert x_ours.shape == x_ref.shape
    torch.testing.assert_close(x_ours, x_ref, rtol=0, atol=1e-6)

    torch.manual_seed(0)
    net = build_resnet18("imagenet", num_classes=14).eval()
    criterion = torch.nn.BCEWithLogitsLoss()
    with torch.no_grad():
        loss_ref = criterion(net(x_ref), y_ref)
        loss_ours = criterion(net(x_ours), torch.from_numpy(labels).float())
    torch.testing.assert_close(loss_ours, loss_ref, rtol=1e-5, atol=1e-6)


def run_bench(*args, timeout=300):
    return run_module("chest_mnist.bench", *args, timeout=timeout)


@pytest.mark.slow
def test_bench_runs_and_writes_its_json(tmp_path):
    out = tmp_path / "bench.json"
    result = run_bench(
        "--steps",
        "2",
        "--warmup",
        "1",
        "--batch-size",
        "16",
        "--stem",
        "imagenet",
        "--device",
        "cpu",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert {
        "device",
        "torch",
        "size",
        "steps",
        "batch_size",
        "ours",
        "reference",
        "speedup",
        "memory",
    } <= set(data)
    for name in ("ours", "reference"):
        assert data[name]["images_per_s"] > 0
        assert data[name]["chestmnist_epoch_s"] == pytest.approx(78468 / data[name]["images_per_s"])
    assert data["speedup"] == pytest.approx(
        data["ours"]["images_per_s"] / data["reference"]["images_per_s"]
    )
    assert data["memory"]["peak_rss_training_mb"] >= data["memory"]["peak_rss_data_loaded_mb"] > 0
    assert "speedup (ours / reference)" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_bench_on_a_missing_gpu_says_so():
    result = run_bench("--device", "cuda", timeout=120)
    assert result.returncode != 0
    assert "error: --device cuda, but this machine has no CUDA GPU" in result.stderr
    assert "Traceback" not in result.stderr


def test_bench_refuses_a_size_medmnist_does_not_have():
    result = run_bench("--size", "100", timeout=120)
    assert result.returncode == 2
    assert "--size: invalid choice: 100 (choose from 28, 64, 128, 224)" in result.stderr


@pytest.mark.slow
def test_memory_mapped_images_stay_out_of_host_memory(tmp_path):
    """224px, 5,000 training images (239 MB as uint8): read into memory they add about 1.2x
    the split to the peak RSS (the model's 45 MB included; BENCHMARKS.md), memory-mapped well
    under half of it."""
    out = tmp_path / "bench.json"
    result = run_bench(
        *("--size", "224", "--stem", "imagenet", "--steps", "1", "--warmup", "0"),
        *("--batch-size", "8", "--n-train", "5000", "--device", "cpu", "--skip-reference"),
        *("--mmap", "--out", str(out)),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["mmap"] is True and data["memory"]["peak_measured"]
    assert data["memory"]["loading_over_split"] < 0.6
