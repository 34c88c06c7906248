import json
import sys

import lightning as L
import numpy as np
import pytest
import torch

from chest_mnist.batches import to_model_input
from chest_mnist.bench import PILDataset, reference_transform
from chest_mnist.model import build_resnet18
from chest_mnist.synthetic import make_synthetic, write_synthetic
from chest_mnist.train import train
from tests.conftest import compose_train, run_here, run_module, tiny_training_overrides


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


@pytest.mark.slow
def test_bench_runs_and_writes_its_json(tmp_path):
    out = tmp_path / "bench.json"
    result = run_here(
        "chest_mnist.bench",
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


@pytest.mark.slow
def test_bench_profiles_its_steps_and_can_fuse_adam(tmp_path):
    out = tmp_path / "bench.json"
    result = run_here(
        "chest_mnist.bench",
        *("--steps", "2", "--warmup", "1", "--batch-size", "8", "--device", "cpu"),
        *("--skip-reference", "--fused-adam", "--profile", "--out", str(out)),
        *("--cuda-graph", "false"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["fused_adam"] is True and data["cuda_graph"] == "false"
    profile = data["profile"]
    assert profile["wall_ms_per_step"] == pytest.approx(1e3 * data["ours"]["seconds"] / 2)
    host = {row["name"]: row for row in profile["top_host"]}
    assert host["aten::convolution_backward"]["calls_per_step"] == 20  # ResNet-18's 20 convolutions
    ops = {e["name"] for e in profile["top_host"]}
    assert "aten::_fused_adam_" in ops  # the fused update ran (the foreach one has no such op)
    assert "device_ms_per_step" not in profile  # no device timeline on the CPU
    assert "top host time per step:" in result.stdout


def test_profile_summary_counts_kernels_once():
    """On a GPU a record_function range (here the optimizer's, which spans the whole step: Lightning
    runs the step as a closure inside it) is on the device timeline too. Counted with the kernels it
    spans, it doubled the device time of an H200 profile (175% busy); only kernels count."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from chest_mnist.bench import profile_summary

    def event(key, device, cpu_us, device_us, annotation=False, count=10):
        return SimpleNamespace(
            key=key,
            device_type=device,
            self_cpu_time_total=cpu_us,
            self_device_time_total=device_us,
            is_user_annotation=annotation,
            count=count,
        )

    events = [
        event("Optimizer.step#Adam.step", DeviceType.CPU, 40_000, 0, annotation=True),
        event("Optimizer.step#Adam.step", DeviceType.CUDA, 0, 67_000, annotation=True),
        event("## Call CompiledFxGraph ##", DeviceType.CUDA, 0, 1_000),  # a range, unflagged
        event("## Call CompiledFxGraph ##", DeviceType.CPU, 2_000, 0, annotation=True),
        event("sm90_xmma_fprop", DeviceType.CUDA, 0, 30_000, count=140),
        event("multi_tensor_apply_kernel", DeviceType.CUDA, 0, 20_000, count=80),
        event("aten::empty_strided", DeviceType.CPU, 2_500, 0, count=731),
    ]
    summary = profile_summary(
        SimpleNamespace(key_averages=lambda: events), steps=10, seconds=0.0684
    )
    assert summary["wall_ms_per_step"] == pytest.approx(6.84)
    assert summary["device_ms_per_step"] == pytest.approx(
        5.0
    )  # 30 + 20 ms of kernels over 10 steps
    assert summary["device_busy"] == pytest.approx(50 / 68.4)
    assert [row["name"] for row in summary["top_device"]] == [
        "sm90_xmma_fprop",
        "multi_tensor_apply_kernel",
    ]
    assert summary["top_device"][0]["calls_per_step"] == 14
    assert summary["top_host"][0] == {
        "name": "Optimizer.step#Adam.step",
        "calls_per_step": 1,
        "ms_per_step": pytest.approx(4.0),
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_bench_on_a_missing_gpu_says_so():
    result = run_here("chest_mnist.bench", "--device", "cuda")
    assert result.returncode != 0
    assert "error: --device cuda, but this machine has no CUDA GPU" in result.stderr
    assert "Traceback" not in result.stderr


def test_bench_refuses_a_size_medmnist_does_not_have():
    result = run_here("chest_mnist.bench", "--size", "100")
    assert result.returncode == 2
    assert "--size: invalid choice: 100 (choose from 28, 64, 128, 224)" in result.stderr


def test_bench_refuses_fewer_training_images_than_a_batch(capsys):
    """Each timed step is a full batch (images per second count them): --n-train 5 at batch 32
    overstated ours by the missing images, and left the reference's loader with no batch."""
    from chest_mnist.bench import parse_args

    with pytest.raises(SystemExit) as exited:
        parse_args(["--n-train", "5", "--batch-size", "32"])
    assert exited.value.code == 2
    assert "--n-train 5 is less than one batch (--batch-size 32)" in capsys.readouterr().err
    assert parse_args(["--n-train", "32", "--batch-size", "32"]).n_train == 32


@pytest.mark.slow
def test_memory_mapped_images_stay_out_of_host_memory(tmp_path):
    """224px, 5,000 training images (239 MB as uint8): read into memory they add about 1.2x
    the split to the peak RSS (the model's 45 MB included; BENCHMARKS.md), memory-mapped well
    under half of it."""
    out = tmp_path / "bench.json"
    result = run_module(  # a process of its own: its peak memory is the bench's
        "chest_mnist.bench",
        *("--size", "224", "--stem", "imagenet", "--steps", "1", "--warmup", "0"),
        *("--batch-size", "8", "--n-train", "5000", "--device", "cpu", "--skip-reference"),
        *("--mmap", "--out", str(out)),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["mmap"] is True and data["memory"]["peak_measured"]
    assert data["memory"]["loading_over_split"] < 0.6


class CountHostReads(L.Callback):
    """Counts host reads of tensors (item, tolist, ...) made during the training steps: from the
    epoch's start to its validation. torch.optim's are left out: Adam's step counters live on the
    CPU even when training on a GPU, so reading them costs no sync."""

    READS = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__")
    reads: list[str] = []
    counting = False
    shown: dict = {}
    loss = None

    @classmethod
    def install(cls, monkeypatch) -> None:
        cls.reads, cls.counting, cls.shown, cls.loss = [], False, {}, None
        for name in cls.READS:
            monkeypatch.setattr(torch.Tensor, name, cls._counted(name, getattr(torch.Tensor, name)))

    @classmethod
    def _counted(cls, name, original):
        def read(self, *args, **kwargs):
            if cls.counting and not cls._called_from_optimizer():
                cls.reads.append(name)
            return original(self, *args, **kwargs)

        return read

    @staticmethod
    def _called_from_optimizer() -> bool:
        frame = sys._getframe(2)
        for _ in range(8):
            if frame is None:
                return False
            if "torch/optim/" in frame.f_code.co_filename:
                return True
            frame = frame.f_back
        return False

    def on_train_epoch_start(self, *args) -> None:
        type(self).counting = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        type(self).loss = outputs["loss"]  # kept, not read: reading it here would be counted

    def on_validation_start(self, trainer, pl_module) -> None:
        was_counting, type(self).counting = type(self).counting, False
        if was_counting:  # the end of the first epoch's steps: what the bar shows now
            type(self).shown = trainer.progress_bar_callback.get_metrics(trainer, pl_module)
            type(self).loss = float(type(self).loss)


@pytest.mark.slow
@pytest.mark.parametrize("interval, reads", [(3600.0, "at most 2"), (0.0, "one per step")])
def test_training_steps_do_not_read_the_device_every_step(tmp_path, monkeypatch, interval, reads):
    """A host read of a GPU tensor waits for the GPU, and one per step keeps the CPU from queueing
    work ahead. 20 training steps of the real config, progress bar on: the loss is read for the
    bar at the epoch's last step (the interval is an hour) and the non-finite check reads once
    before validation. With the bar reading at every step (interval 0), the same count sees it."""
    npz = write_synthetic(tmp_path / "chest.npz", n_train=640, n_val=64, n_test=64, seed=0)
    bar_off = ("~callbacks.progress_bar", "+trainer.enable_progress_bar=false")
    overrides = [
        o
        for o in tiny_training_overrides(npz, tmp_path / "run")
        if o not in (*bar_off, "+trainer.limit_train_batches=3")
    ]
    CountHostReads.install(monkeypatch)
    train(
        compose_train(
            overrides
            + [
                "data.batch_size=32",  # 640 / 32 = 20 steps
                f"callbacks.progress_bar.metrics_interval_s={interval}",
                "+callbacks.count._target_=tests.test_bench.CountHostReads",
            ]
        )
    )
    # the bar shows the last training step's own loss
    assert CountHostReads.shown["train/loss_step"] == CountHostReads.loss
    if reads == "at most 2":
        assert sorted(CountHostReads.reads) == ["item", "tolist"]
    else:
        assert CountHostReads.reads.count("item") == 20
