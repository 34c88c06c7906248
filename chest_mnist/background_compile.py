"""model.compile with the whole step as one graph (model.cuda_graph=auto or step on one GPU):
inductor compiles the network in a separate process while the run's first steps replay a graph
of the network uncompiled; once that process is done, the run compiles the network itself, from
the caches the process filled, and captures the step graph again (`MedMNISTClassifier`).

A cold compilation of ResNet-18's training forward and backward takes tens of seconds, and
issue 15's goal (the protocol's 100 epochs in 150 s on one GPU, from a cold start) counts
them; the uncompiled graph trains meanwhile. From the caches the same compilation takes a few
seconds (BENCHMARKS.md, "Compiling in a separate process").

The process compiles the same code for the same input: the model's `Network` with a backbone
built as the model's (`backbone_and_head`: stem, channels-last, compile mode), one forward and
backward of a zero batch with the shape, dtype and memory format of the run's batches, on the
same device, under the same autocast, with the same weight dtype. Inductor keys what it caches
by that code and those inputs, not by the weights' values, and both processes use the same
cache directory (TORCHINDUCTOR_CACHE_DIR, which the parent sets before the process starts).
Should the process fail, the run says why and, with model.compile=true, compiles in its own
process, as without it; with model.compile=auto it goes on with the network uncompiled. The
process runs at a lower priority (nice, NICER_BY more than the run's), it and its compile
workers: they take the cores the run leaves idle, not the one that launches its steps.

    python -m chest_mnist.background_compile '<spec as JSON>' PARENT_PID
                                                (what `BackgroundCompile` runs)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch

# the folder that holds the chest_mnist package, for the process's imports wherever it starts
PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)
# torch's global settings that inductor's cache keys include (the matmul ones) and cuDNN's
# choice of kernels, copied to the process where they differ from its own. The TF32 setting is
# fp32_precision where torch has it (2.9 on), else the older allow_tf32: reading or setting the
# old one after the new raises.
SETTINGS = (
    "backends.cudnn.benchmark",
    "backends.cuda.matmul.fp32_precision",
    "backends.cuda.matmul.allow_fp16_reduced_precision_reduction",
    "backends.cuda.matmul.allow_bf16_reduced_precision_reduction",
)
OLD_TF32 = "backends.cuda.matmul.allow_tf32"
# how much nicer than the run the process and its compile workers are: where they would fill
# every core, the run's own thread (which launches the GPU's work) goes first
NICER_BY = 10


def spec_for(
    network: torch.nn.Module, stem: str, mode: bool | str, x: torch.Tensor, autocast: bool
) -> dict:
    """What the process must build and run to compile what this process will compile:
    `network` (`chest_mnist.model.Network`) on batches like `x`, with the caller's autocast
    (`autocast`: whether it is on for `x`'s device, in torch's current autocast dtype)."""
    device = x.device.type
    weight = next(network.parameters())
    return {
        "stem": stem,
        "classes": network.head.out_features,
        "mode": mode,
        "shape": list(x.shape),
        "dtype": str(x.dtype).removeprefix("torch."),
        "channels_last": x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last),
        "device": str(x.device),
        "weights_dtype": str(weight.dtype).removeprefix("torch."),
        "default_dtype": str(torch.get_default_dtype()).removeprefix("torch."),
        "autocast": str(torch.get_autocast_dtype(device)).removeprefix("torch.")
        if autocast
        else None,
        "settings": _settings(),
    }


def _settings() -> dict:
    new_tf32 = "backends.cuda.matmul.fp32_precision"
    names = SETTINGS if _setting(new_tf32) is not None else (*SETTINGS, OLD_TF32)
    return {name: _setting(name) for name in names if _setting(name) is not None}


def apply_settings(settings: dict) -> None:
    """Set torch's settings as `settings` (from `spec_for`) has them."""
    for name, value in settings.items():
        if _setting(name) != value:  # only what differs: setting one can change another
            owner, attribute = name.rsplit(".", 1)
            setattr(_setting(owner), attribute, value)


def _setting(name: str):
    """torch's `name` ("backends.cudnn.benchmark"), or None where this torch has none."""
    value = torch
    for part in name.split("."):
        value = getattr(value, part, None)
    return value


class BackgroundCompile:
    """The process compiling `spec`'s network (`spec_for`), started now; its output is kept
    for the message should it fail. Stopped (with whatever it started) by `close`, or when
    this object is collected or the interpreter exits."""

    def __init__(self, spec: dict):
        self.output = tempfile.TemporaryFile()  # noqa: SIM115 (open while the process runs: close())
        path = os.environ.get("PYTHONPATH")
        env = os.environ | {
            "PYTHONPATH": PACKAGE_PARENT + (os.pathsep + path if path else ""),
            # inductor's default, written where the caller's compilation will look
            "TORCHINDUCTOR_CACHE_DIR": _inductor_cache_dir(),
        }
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "-m", __name__, json.dumps(spec), str(os.getpid())],
            stdout=self.output,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: close() stops its workers too
        )
        _lower_priority(self.process.pid)
        self.seconds: float | None = None  # from the start to the process's end
        weakref.finalize(self, _stop, self.process)

    def finished(self) -> bool:
        if self.seconds is None and self.process.poll() is not None:
            self.seconds = time.perf_counter() - self.started
        return self.seconds is not None

    def error(self) -> str | None:
        """None if the process compiled; else its exit status and the end of its output."""
        if self.process.returncode == 0:
            return None
        self.output.seek(0)
        lines = self.output.read().decode(errors="replace").strip().splitlines()
        return f"exit status {self.process.returncode}: " + " | ".join(lines[-3:])

    def close(self) -> None:
        _stop(self.process)
        self.output.close()


def caches_on() -> bool:
    """Whether inductor keeps compiled graphs on disk for another process to find (its default;
    TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 and the configs turn it off)."""
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    return bool(  # getattr: older torch has fewer of them
        inductor_config.fx_graph_cache
        and getattr(functorch_config, "enable_autograd_cache", True)
        and not getattr(inductor_config, "force_disable_caches", False)
    )


def cache_lookups() -> tuple[int, int]:
    """This process's hits and misses in inductor's caches so far (AOTAutograd's and the FX
    graphs')."""
    from torch._dynamo.utils import counters

    aot, fx = counters["aot_autograd"], counters["inductor"]
    return (
        aot["autograd_cache_hit"] + fx["fxgraph_cache_hit"],
        aot["autograd_cache_miss"] + fx["fxgraph_cache_miss"],
    )


def _die_with_parent(parent: int) -> None:
    """Linux: have the kernel kill this process when its parent dies (a run killed by a
    timeout or by the out-of-memory killer), then check that the parent has not died already."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: close() and the finalizer stop it
        return
    if os.getppid() != parent:
        os._exit(1)


def _lower_priority(pid: int) -> None:
    """Make process `pid` NICER_BY nicer than this one (the workers it starts inherit it), so
    that its compilation takes the cores the run leaves idle. Before its imports, in practice:
    it has only just started."""
    with contextlib.suppress(OSError, AttributeError):  # gone already; no priorities (Windows)
        nice = min(19, os.getpriority(os.PRIO_PROCESS, 0) + NICER_BY)
        os.setpriority(os.PRIO_PROCESS, pid, nice)


def _inductor_cache_dir() -> str:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return cache_dir()


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def compile_network(spec: dict) -> Callable[[], None]:
    """Build `spec`'s network, compile its backbone and run one training forward and backward
    (which compiles them); return that step, to run again."""
    from chest_mnist.model import Network, backbone_and_head

    apply_settings(spec["settings"])
    torch.set_default_dtype(getattr(torch, spec["default_dtype"]))
    device = torch.device(spec["device"])
    backbone, head = backbone_and_head(spec["stem"], False, spec["classes"], spec["mode"])
    network = Network(backbone, head).to(device, getattr(torch, spec["weights_dtype"]))
    x = torch.zeros(spec["shape"], dtype=getattr(torch, spec["dtype"]), device=device)
    if spec["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = (
        getattr(torch, spec["autocast"])
        if spec["autocast"]
        else torch.get_autocast_dtype(device.type)
    )

    def step() -> None:
        # as StepGraph runs it: autocast (without its weight cache) for the forward only
        with torch.autocast(
            device.type, dtype, enabled=spec["autocast"] is not None, cache_enabled=False
        ):
            out = network(x)
        out.float().mean().backward()

    step()
    return step


if __name__ == "__main__":
    _die_with_parent(int(sys.argv[2]))
    compile_network(json.loads(sys.argv[1]))
