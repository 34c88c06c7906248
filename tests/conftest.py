"""Shared fixtures: small synthetic ChestMNIST files and the real Hydra config, composed with
tiny budgets, on the CPU, writing into tmp_path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from chest_mnist.config import register
from chest_mnist.synthetic import write_synthetic

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "chest_mnist" / "conf"
PNEUMONIA_NPZ = ROOT / "tests" / "data" / "pneumoniamnist.npz"
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test`: one worker per core (pytest-xdist)
    # one torch thread each, as for the processes the tests start (OMP_NUM_THREADS, read by
    # torch as it starts): the cores are the workers'
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
register()  # what the entry points do when imported: compose() needs them too
# Lightning DDP on two CPU processes (gloo); no sync_batchnorm, which needs a GPU
DDP_ON_TWO_CPUS = [
    "trainer=ddp",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.sync_batchnorm=false",
]


@pytest.fixture(scope="session")
def synthetic_npz(tmp_path_factory) -> Path:
    """A small synthetic ChestMNIST file: 512 / 256 / 256 images at 28px."""
    return write_synthetic(
        tmp_path_factory.mktemp("data") / "chest.npz", n_train=512, n_val=256, n_test=256, seed=0
    )


def run_module(module: str, *args: str, timeout: int = 300, env: dict | None = None):
    """`python -m module args...` from the repository root, as a user would type it."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def run_here(
    module: str, *args: str, env: dict | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """`python -m module args...` inside this process: the module run as __main__ by runpy, as
    the interpreter does, with sys.argv and `env` set; its output captured, and its exit code
    what the interpreter would give (an uncaught exception: its traceback and 1). A process of
    its own costs about 8 s of imports on 2 cores (torch, Lightning, torchmetrics); run_module
    starts one, for what needs it: a signal, DDP, a memory peak, what a fresh interpreter
    prints (Python's warnings here go to pytest, not to the output), and settings read once per
    process (urllib's proxies). Put back afterwards: sys.argv, the environment, every logger's
    handlers, filters and level (Hydra sets up logging), Hydra's run config, the SIGINT and
    SIGTERM handlers (Lightning ignores SIGINT after a Ctrl-C) and the garbage collector (a
    command freezes it as it ends). A run past `timeout` seconds ends pytest with every
    thread's traceback."""
    import contextlib
    import faulthandler
    import gc
    import io
    import logging
    import runpy
    import signal
    import traceback
    import warnings

    from hydra.core.hydra_config import HydraConfig

    loggers = [logging.getLogger(), *logging.root.manager.loggerDict.values()]
    saved_loggers = [
        (log, log.handlers[:], log.filters[:], log.level, log.propagate, log.disabled)
        for log in loggers
        if isinstance(log, logging.Logger)
    ]
    saved_env = {name: os.environ.get(name) for name in env or {}}
    saved_signals = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    saved_argv, hydra_config = sys.argv, HydraConfig.instance().cfg
    stdout, stderr = io.StringIO(), io.StringIO()
    code: int | str | None = 0
    faulthandler.dump_traceback_later(timeout, exit=True)
    try:
        sys.argv = [module, *args]  # runpy sets argv[0] to the module's file
        os.environ.update(env or {})
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                with warnings.catch_warnings():  # the module is imported already: as -m's
                    warnings.filterwarnings("ignore", "'.*' found in sys.modules", RuntimeWarning)
                    runpy.run_module(module, run_name="__main__", alter_sys=True)
            except SystemExit as e:
                code = e.code
                if not isinstance(code, int | None):  # SystemExit("message"): said, exit 1
                    print(code, file=sys.stderr)
                    code = 1
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        faulthandler.cancel_dump_traceback_later()
        sys.argv = saved_argv
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for log, handlers, filters, level, propagate, disabled in saved_loggers:
            for handler in log.handlers:
                if handler not in handlers:
                    handler.close()
            log.handlers[:], log.filters[:] = handlers, filters
            log.setLevel(level)
            log.propagate, log.disabled = propagate, disabled
        for sig, handler in saved_signals.items():
            signal.signal(sig, handler)
        HydraConfig.instance().cfg = hydra_config
        gc.unfreeze()
    return subprocess.CompletedProcess(
        [module, *args], code or 0, stdout.getvalue(), stderr.getvalue()
    )


@pytest.fixture(autouse=True)
def torch_flags_put_back():
    """What a run sets for the whole process and does not undo, put back after each test:
    Lightning's trainer.deterministic=true turns on torch's deterministic algorithms for good
    (until the next Trainer says otherwise), bench sets cudnn.benchmark."""
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
        torch.get_num_threads(),
        torch.get_float32_matmul_precision(),
    )
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2:4]
    torch.set_num_threads(saved[4])
    torch.set_float32_matmul_precision(saved[5])


def compose_train(overrides: list[str], config_name: str = "train") -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def tiny_training_overrides(
    npz: Path, out: Path, min_interval_s: float = 0, figures: bool = False
) -> list[str]:
    """The real config on synthetic data with a budget of seconds; last.ckpt at every epoch's
    end unless `min_interval_s` says otherwise. Without the report's figures unless `figures`:
    they are most of a tiny run's time (matplotlib), and the tests that look at them ask."""
    return [
        f"figures={str(figures).lower()}",
        "data=synthetic",
        f"data.path={npz}",
        "data.batch_size=32",
        "data.eval_batch_size=256",
        "model.stem=imagenet",  # 16x fewer FLOPs than the cifar stem at 28px: fast on 2 cores
        "trainer=cpu",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=3",
        "+trainer.enable_progress_bar=false",
        "~callbacks.progress_bar",
        "~callbacks.model_summary",
        f"callbacks.last_checkpoint.min_interval_s={min_interval_s}",
        f"paths.output_dir={out}",
        f"paths.data_dir={out}/data",
    ]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, synthetic_npz) -> Path:
    """The directory of one tiny training run (2 epochs, with figures), shared by the tests
    that read it."""
    from chest_mnist.train import train

    out = tmp_path_factory.mktemp("run")
    overrides = tiny_training_overrides(synthetic_npz, out, figures=True)
    train(compose_train(overrides + ["trainer.max_epochs=2"]))
    return out


@pytest.fixture
def tiny_overrides(tmp_path, synthetic_npz) -> list[str]:
    """The real config on synthetic data with a budget of seconds."""
    return tiny_training_overrides(synthetic_npz, tmp_path)


@pytest.fixture
def cfg_tiny(tiny_overrides) -> DictConfig:
    return compose_train(tiny_overrides)


ONE_GPU = torch.device("cuda", 0)


def trainer_for_setup(device: torch.device = ONE_GPU, **replaced) -> SimpleNamespace:
    """What MedMNISTClassifier.setup("fit") reads of its Trainer, as on one `device`, bf16,
    without clipping or callbacks; `replaced` sets other values."""
    return SimpleNamespace(
        **{
            "strategy": SimpleNamespace(root_device=device),
            "world_size": 1,
            "accumulate_grad_batches": 1,
            "datamodule": None,
            "gradient_clip_val": None,
            "precision": "bf16-mixed",
            "callbacks": [],
            **replaced,
        }
    )


@pytest.fixture
def drawn_figures(monkeypatch) -> list:
    """The matplotlib figures the code under test closes, kept open to be looked at, in the
    order drawn; closed at the test's end."""
    import matplotlib.pyplot as plt

    drawn, close = [], plt.close
    monkeypatch.setattr(plt, "close", drawn.append)
    yield drawn
    for fig in drawn:
        close(fig)


def title_clear_of_the_panels(fig) -> bool:
    """The figure's title lies inside the figure and above every panel and its title."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    title = fig._suptitle.get_window_extent(renderer)
    panels = [ax.get_tightbbox(renderer) for ax in fig.axes if ax.get_visible() and ax.axison]
    inside = title.x0 >= 0 and title.x1 <= fig.bbox.width and title.y1 <= fig.bbox.height
    return inside and title.y0 >= max(box.y1 for box in panels)
