"""Training throughput: our pipeline against the classic per-sample loop, in one process.

    python -m chest_mnist.bench                            # 28px, the best device here, 20 steps
    python -m chest_mnist.bench --size 224 --stem imagenet --steps 10 --device cuda
    make bench ARGS="--steps 5"

Both train the same ResNet-18 (same initial weights) on the same synthetic ChestMNIST-shaped
data, at the same batch size, for the same number of optimisation steps after a warm-up:

- reference: what MedMNIST's own examples do. A Dataset returns one PIL image at a time
  (`Image.fromarray(...).convert("RGB")`, as `medmnist.ChestMNIST(as_rgb=True)`), through
  torchvision's ToTensor and Normalize(0.5, 0.5), batched by a DataLoader (no workers, as in
  their notebook), plain fp32 training;
- ours: `python -m chest_mnist.train`'s code path, a Lightning Trainer with
  MedMNISTDataModule and MedMNISTClassifier (bf16 mixed precision on a GPU, fp32 on the
  CPU), validation off.

It prints images/s for each, the ratio, and one ChestMNIST training epoch (78,468 images)
extrapolated from each; `--out` writes the same as JSON. The peak host memory (RSS) of our
run is measured against the size of the uint8 training split.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from chest_mnist import UserError
from chest_mnist.cli import freeze_for_exit, resolve_device
from chest_mnist.data import MedMNISTDataModule  # here: its imports (Lightning) count before data
from chest_mnist.npz import SIZES

CHESTMNIST_TRAIN = 78_468


class PILDataset(Dataset):
    """One PIL image per item, as `medmnist.dataset.MedMNIST2D.__getitem__` with as_rgb=True."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        from PIL import Image

        image = Image.fromarray(self.images[index]).convert("RGB")
        return self.transform(image), self.labels[index].astype(np.float32)


def reference_transform():
    from torchvision import transforms

    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean=[0.5], std=[0.5])])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_reference(images, labels, net, device, batch_size, warmup, steps) -> float:
    """Seconds for `steps` optimisation steps of the classic loop, after `warmup` steps."""
    loader = DataLoader(
        PILDataset(images, labels, reference_transform()),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
    )
    net = net.to(device).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    criterion = torch.nn.BCEWithLogitsLoss()
    done, started = 0, None
    while done < warmup + steps:
        for x, y in loader:
            if done == warmup:
                _sync(device)
                started = time.perf_counter()
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = criterion(net(x), y)
            loss.backward()
            optimizer.step()
            done += 1
            if done == warmup + steps:
                break
    _sync(device)
    return time.perf_counter() - started


class StepTimer(L.Callback):
    """Times the training steps after the first `warmup`; with `profile`, profiles them."""

    def __init__(self, device: torch.device, warmup: int, profile: bool):
        self.device, self.warmup, self.profile = device, warmup, profile
        self.started = self.finished = self.profiler = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.warmup and self.started is None:
            _sync(self.device)
            if self.profile:
                self.profiler = start_profiler(self.device)
            self.started = time.perf_counter()

    def on_train_end(self, trainer, module):
        _sync(self.device)
        self.finished = time.perf_counter()
        if self.profiler is not None:
            self.profiler.stop()


def time_ours(
    npz: Path,
    size: int,
    stem: str,
    device: torch.device,
    batch_size: int,
    warmup: int,
    steps: int,
    compile: bool | str = False,
    mmap: bool = False,
    fused_adam: bool = False,
    profile: bool = False,
    cuda_graph: bool | str = "auto",
):
    """Seconds for `steps` training steps of our Lightning pipeline after `warmup` steps, the
    precision it used, the peak RSS (MB) once the data was loaded, before training, and with
    `profile` a `torch.profiler` summary of the timed steps (else None)."""
    from chest_mnist.config import precision_for
    from chest_mnist.model import MedMNISTClassifier

    # full batches only, as the reference's loader: images per second count steps x batch
    datamodule = MedMNISTDataModule(
        path=str(npz), size=size, batch_size=batch_size, mmap=mmap, drop_last=True
    )
    model = MedMNISTClassifier(
        datamodule.labels,
        stem=stem,
        optimizer=functools.partial(torch.optim.Adam, lr=1e-3, fused=fused_adam or None),
        compile=compile,
        cuda_graph=cuda_graph,
        compile_in_background=False,  # compiled in the warm-up steps, not during the timed ones
    )
    datamodule.setup("fit")  # load here, to measure memory with the data in and before training
    rss_loaded_mb = peak_rss_mb()
    timer = StepTimer(device, warmup, profile)
    precision = precision_for(device.type)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision=precision,
        max_steps=warmup + steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        benchmark=True,
    )
    trainer.fit(model, datamodule=datamodule)
    seconds = timer.finished - timer.started
    summary = None if timer.profiler is None else profile_summary(timer.profiler, steps, seconds)
    return seconds, precision, rss_loaded_mb, summary


def start_profiler(device: torch.device):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    profiler = profile(activities=activities)
    profiler.start()
    return profiler


def profile_summary(profiler, steps: int, seconds: float, top: int = 10) -> dict:
    """Per step: the wall time (the profiler's own cost included), the operators that took the
    most host time and, on a GPU, the time the device spent in kernels and copies and the
    kernels that took most of it. A device time well under the wall time means the host
    (Python, kernel launches) is what bounds the step."""
    from torch.autograd import DeviceType

    averages = profiler.key_averages()
    # a record_function range (Optimizer.step#Adam.step, ...) also shows on the device timeline,
    # spanning the kernels it launched and the gaps between them: counted, it would count them
    # twice (the device would seem busier than the wall time allows)
    ranges = {e.key for e in averages if getattr(e, "is_user_annotation", False)}
    on_device = [e for e in averages if e.device_type != DeviceType.CPU and e.key not in ranges]
    on_host = [e for e in averages if e.device_type == DeviceType.CPU]

    def rows(events, key: str) -> list[dict]:
        ranked = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:top]
        return [
            {
                "name": e.key,
                "calls_per_step": e.count / steps,
                "ms_per_step": getattr(e, key) / 1e3 / steps,
            }
            for e in ranked
            if getattr(e, key) > 0
        ]

    summary = {
        "wall_ms_per_step": 1e3 * seconds / steps,
        "top_host": rows(on_host, "self_cpu_time_total"),
    }
    if on_device:
        device_us = sum(e.self_device_time_total for e in on_device)
        summary["device_ms_per_step"] = device_us / 1e3 / steps
        summary["device_busy"] = device_us / 1e6 / seconds
        summary["top_device"] = rows(on_device, "self_device_time_total")
    return summary


def peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)
        return True
    except OSError:
        return False


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from chest_mnist.model import compile_modes

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--size", type=int, default=28, choices=SIZES, help="image side (a MedMNIST size)"
    )
    parser.add_argument(
        "--steps", type=int, default=20, help="timed optimisation steps, each pipeline"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--stem", default="cifar", choices=("cifar", "imagenet"))
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--n-train",
        type=int,
        default=None,
        help="training images in the synthetic file (default: just enough for the steps; "
        "78468 measures memory at ChestMNIST's size)",
    )
    parser.add_argument(
        "--compile",
        default=None,
        choices=compile_modes(),
        help="torch.compile our backbone in one of torch.compile's modes",
    )
    parser.add_argument(
        "--cuda-graph",
        default="auto",
        choices=("auto", "true", "false", "step"),
        help="model.cuda_graph of our pipeline (auto, the default: on one GPU the whole step as "
        "one graph where it applies)",
    )
    parser.add_argument("--skip-reference", action="store_true", help="time only our pipeline")
    parser.add_argument(
        "--mmap",
        action="store_true",
        help="our pipeline with data.mmap=true (memory-mapped images)",
    )
    parser.add_argument(
        "--fused-adam",
        action="store_true",
        help="our pipeline with Adam(fused=True): one kernel per step for the whole update",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile our timed steps (torch.profiler): device time per step against wall "
        "time, and the top operators (the profiler slows the steps it watches)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be at least 1, --warmup at least 0")
    if args.n_train is not None and args.n_train < args.batch_size:
        parser.error(  # a step is a full batch: images per second count them
            f"--n-train {args.n_train} is less than one batch (--batch-size {args.batch_size})"
        )
    return args


def write_training_file(npz: Path, n_train: int, size: int) -> None:
    """A synthetic ChestMNIST-shaped file, uncompressed. A child process writes it, so that its
    float buffers never count in our peak memory."""
    options = ["--train", str(n_train), "--val", "16", "--test", "16", "--size", str(size)]
    subprocess.run(
        [sys.executable, "-m", "chest_mnist.synthetic", str(npz), *options, "--no-compress"],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def throughput(images: int, seconds: float, precision: str) -> dict:
    """One pipeline's timing, as images/s and as one ChestMNIST training epoch extrapolated."""
    images_per_s = images / seconds
    return {
        "seconds": seconds,
        "images_per_s": images_per_s,
        "precision": precision,
        "chestmnist_epoch_s": CHESTMNIST_TRAIN / images_per_s,
    }


def measure_ours(npz: Path, n_train: int, args: argparse.Namespace, device: torch.device):
    """Our pipeline's throughput, the host memory it took (against the uint8 training split)
    and, with --profile, its profile summary (else None)."""
    dataset_mb = n_train * args.size * args.size / 2**20
    measured_peak = reset_peak_rss()
    rss_before_mb = peak_rss_mb()
    seconds, precision, rss_loaded_mb, profiled = time_ours(
        npz,
        args.size,
        args.stem,
        device,
        args.batch_size,
        args.warmup,
        args.steps,
        compile={None: False, "default": True}.get(args.compile, args.compile),
        mmap=args.mmap,
        fused_adam=args.fused_adam,
        profile=args.profile,
        cuda_graph={"true": True, "false": False}.get(args.cuda_graph, args.cuda_graph),
    )
    memory = {
        "train_split_uint8_mb": dataset_mb,
        "rss_before_data_mb": rss_before_mb,
        "peak_rss_data_loaded_mb": rss_loaded_mb,
        "loading_over_split": (rss_loaded_mb - rss_before_mb) / dataset_mb,
        "peak_rss_training_mb": peak_rss_mb(),
        "peak_measured": measured_peak,
    }
    return throughput(args.steps * args.batch_size, seconds, precision), memory, profiled


def measure_reference(npz: Path, args: argparse.Namespace, device: torch.device) -> dict:
    """The classic per-sample loop's throughput, on the same file."""
    from chest_mnist.model import build_resnet18

    data = np.load(npz)
    torch.manual_seed(0)
    net = build_resnet18(args.stem, num_classes=14)
    images, labels = data["train_images"], data["train_labels"]
    seconds = time_reference(images, labels, net, device, args.batch_size, args.warmup, args.steps)
    return throughput(args.steps * args.batch_size, seconds, "32-true")


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def measure(args: argparse.Namespace, device: torch.device) -> dict:
    """Both measurements on one synthetic file, ours first, as the dict `--out` writes."""
    n_train = args.n_train or (args.warmup + args.steps) * args.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / f"chestmnist_{args.size}.npz"
        write_training_file(npz, n_train, args.size)
        ours, memory, profiled = measure_ours(npz, n_train, args, device)
        result = {
            # named after our run: naming a GPU starts CUDA, which would inflate rss_before_data_mb
            "device": describe_device(device),
            "torch": torch.__version__,
            "size": args.size,
            "stem": args.stem,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "warmup": args.warmup,
            "n_train": n_train,
            "compile": args.compile,
            "mmap": args.mmap,
            "fused_adam": args.fused_adam,
            "cuda_graph": args.cuda_graph,
            "ours": ours,
            "memory": memory,
        }
        if profiled is not None:
            result["profile"] = profiled
        if not args.skip_reference:
            result["reference"] = measure_reference(npz, args, device)
            result["speedup"] = result["ours"]["images_per_s"] / result["reference"]["images_per_s"]
    return result


def print_results(result: dict) -> None:
    print(
        f"{result['device']}, torch {result['torch']}, {result['size']}px, stem {result['stem']}, "
        f"batch {result['batch_size']}, {result['steps']} steps after {result['warmup']} warm-up"
    )
    print(f"{'pipeline':<10} {'images/s':>10} {'ChestMNIST epoch (s)':>22} {'precision':>11}")
    for name in ("reference", "ours"):
        if name in result:
            r = result[name]
            print(
                f"{name:<10} {r['images_per_s']:>10.1f} {r['chestmnist_epoch_s']:>22.1f} {r['precision']:>11}"
            )
    if "speedup" in result:
        print(f"speedup (ours / reference): {result['speedup']:.2f}x")
    m = result["memory"]
    print(
        f"memory: train split {m['train_split_uint8_mb']:.0f} MB as uint8; peak RSS {m['rss_before_data_mb']:.0f} MB "
        f"before loading, {m['peak_rss_data_loaded_mb']:.0f} MB loaded ({m['loading_over_split']:.2f}x the split "
        f"added), {m['peak_rss_training_mb']:.0f} MB training (on the CPU this includes the activations)"
    )
    if "profile" in result:
        print_profile(result["profile"])


def print_profile(p: dict) -> None:
    line = f"profile of our steps: {p['wall_ms_per_step']:.2f} ms wall per step (profiler included)"
    if "device_ms_per_step" in p:
        line += f", {p['device_ms_per_step']:.2f} ms of it on the device ({100 * p['device_busy']:.0f}% busy)"
    print(line)
    for title, key in (("device", "top_device"), ("host", "top_host")):
        if key in p:
            print(f"  top {title} time per step:")
            for row in p[key]:
                print(
                    f"    {row['ms_per_step']:8.3f} ms {row['calls_per_step']:7.1f} calls  {row['name'][:90]}"
                )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        device = resolve_device(args.device, option="--device ")
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    torch.backends.cudnn.benchmark = True
    result = measure(args, device)
    print_results(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
    freeze_for_exit()
