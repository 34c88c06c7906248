"""The package as pip installs it (not editable): configs inside, declared dependencies, and the
private Lightning names that pyproject.toml's version bound stands for."""

import shutil
import subprocess
import sys
from shutil import ignore_patterns

import pytest

from tests.conftest import ROOT


def pip(*args) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_a_non_editable_install_trains_from_another_folder(tmp_path, synthetic_npz):
    """`pip install .` puts a copy of the package, configs included, in site-packages; it must
    train from any folder, without the repository's conf/ or tests/ next to it."""
    source, wheels = tmp_path / "source", tmp_path / "wheels"
    target, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    # a copy, so that the build's own build/ folder is not left in the checkout
    shutil.copytree(
        ROOT / "chest_mnist", source / "chest_mnist", ignore=ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip("wheel", "--no-deps", "-q", "-w", wheels, source)
    (wheel,) = wheels.glob("chest_mnist-*.whl")
    pip("install", "--no-deps", "-q", "--target", target, wheel)
    assert (target / "chest_mnist" / "conf" / "train.yaml").is_file()
    assert (target / "chest_mnist" / "conf" / "data" / "synthetic.yaml").is_file()

    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    where = subprocess.run(
        [sys.executable, "-c", "import chest_mnist; print(chest_mnist.__file__)"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        env=env,
    )
    assert where.stdout.startswith(str(target)), where.stdout + where.stderr  # not the checkout
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "chest_mnist.train",
            "data=synthetic",
            f"data.path={synthetic_npz}",
            "data.batch_size=64",
            "model.stem=imagenet",
            "trainer=cpu",
            "trainer.max_epochs=1",
            "+trainer.limit_train_batches=2",
            "~callbacks.progress_bar",
            "~callbacks.model_summary",
            "figures=false",
        ],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    (run_dir,) = (elsewhere / "logs" / "train" / "runs").iterdir()  # relative to where it ran
    assert (run_dir / "report" / "metrics.json").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_every_third_party_import_is_a_declared_dependency():
    """Each top-level module the package imports is in pyproject.toml's dependencies (a
    transitive dependency can disappear from under us)."""
    import ast

    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    distribution = {"PIL": "pillow", "yaml": "pyyaml", "hydra": "hydra-core"}  # import -> pip
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {
        Requirement(line).name.lower().replace("_", "-") for line in project["dependencies"]
    }
    imported = set()
    for path in (ROOT / "chest_mnist").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"chest_mnist", "__future__"}
    assert {"torch", "PIL", "yaml", "typing_extensions"} <= third_party  # the scan works
    missing = {
        name
        for name in third_party
        if distribution.get(name, name).lower().replace("_", "-") not in declared
    }
    assert not missing, f"imported but not in pyproject.toml's dependencies: {sorted(missing)}"


def test_the_private_lightning_names_we_rely_on_exist(tmp_path):
    """pyproject.toml bounds Lightning below 2.7 because of these; raising the bound means
    checking them again (this test fails first). loggers.AppendingCSVLogger also reads the
    writer's `_fs` and sets the logger's `_experiment`."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    assert hasattr(ModelCheckpoint(), "_last_global_step_saved")
    assert callable(getattr(ExperimentWriter, "_check_log_dir_exists", None))
    assert callable(getattr(ExperimentWriter, "_rewrite_with_new_header", None))
    assert hasattr(ExperimentWriter(log_dir=str(tmp_path / "csv")), "_fs")
    assert hasattr(CSVLogger(tmp_path), "_experiment")


def test_lightning_is_bounded_to_the_versions_the_code_needs():
    """2.6 at least (Trainer.fit(weights_only=), EMAWeightAveraging, save_on_exception), below
    2.7 (the private names above); and the installed Lightning is one of them."""
    import inspect

    import lightning
    from lightning.pytorch.callbacks import ModelCheckpoint
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (requirement,) = [
        Requirement(line)
        for line in project["dependencies"]
        if Requirement(line).name == "lightning"
    ]
    assert lightning.__version__ in requirement.specifier
    assert "2.5.6" not in requirement.specifier and "2.7.0" not in requirement.specifier
    # what 2.6 brought, and the code uses
    from lightning.pytorch.callbacks import EMAWeightAveraging  # noqa: F401

    assert "weights_only" in inspect.signature(lightning.Trainer.fit).parameters
    assert "save_on_exception" in inspect.signature(ModelCheckpoint).parameters
