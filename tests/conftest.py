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


def run_here(module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m module args...` inside this process: the module run as __main__ by runpy, as
    the interpreter does, with sys.argv and `env` set, its output captured and its exit code as
    the interpreter would give it. A process of its own costs about 8 s of imports on 2 cores
    (torch, Lightning, torchmetrics); run_module starts one, for what needs it: a signal, DDP, a
    memory peak, the console of a fresh interpreter, a script that patches modules. Hydra's
    logging set-up and run config, the environment and the garbage collector (a command
    freezes it as it ends) are put back afterwards."""
    import contextlib
    import gc
    import io
    import logging
    import runpy
    import warnings

    from hydra.core.hydra_config import HydraConfig

    stdout, stderr = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    saved_argv, saved_env = sys.argv, os.environ.copy()
    sys.argv = [module, *args]  # runpy sets argv[0] to the module's file
    os.environ.update(env or {})
    code: int | str | None = 0
    try:
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
    finally:
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
        HydraConfig.instance().cfg = None
        gc.unfreeze()
    return subprocess.CompletedProcess(
        [module, *args], code or 0, stdout.getvalue(), stderr.getvalue()
    )


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
