"""A long run survives: SIGKILL loses at most one epoch and a resume ends where an uninterrupted
run ends; SIGTERM saves last.ckpt first; a non-finite loss stops the run and keeps the good
checkpoints; checkpoints keep loading with weights_only=True."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from chest_mnist import UserError
from chest_mnist.checkpoints import load_checkpoint
from chest_mnist.cli import find_user_error
from chest_mnist.loggers import read_loss_curves_csv
from chest_mnist.train import train
from tests.conftest import ROOT, compose_train, run_here, tiny_training_overrides


def command(npz: Path, log_dir: Path, *extra: str, min_interval_s: float = 0) -> list[str]:
    return [
        "data=synthetic",
        f"data.path={npz}",
        "data.batch_size=32",
        "model.stem=imagenet",
        "trainer=cpu",
        "trainer.deterministic=true",
        "trainer.benchmark=false",
        "trainer.max_epochs=3",
        "figures=false",
        "callbacks.progress_bar.refresh_rate=0",
        f"callbacks.last_checkpoint.min_interval_s={min_interval_s}",  # 0: at every epoch's end
        f"paths.log_dir={log_dir}",
        *extra,
    ]


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "chest_mnist.train", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def only_run(log_dir: Path) -> Path:
    (run,) = (log_dir / "train" / "runs").iterdir()
    return run


def wait_for_run(log_dir: Path, process: subprocess.Popen) -> Path:
    """The run directory that `process` creates under `log_dir` (Hydra makes it at start)."""
    runs = log_dir / "train" / "runs"
    wait_for(runs, process)
    deadline = time.monotonic() + 60
    while not any(runs.iterdir()):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    return only_run(log_dir)


def final_metrics(run: Path) -> dict:
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    return {k: v for k, v in metrics.items() if k.startswith(("test/", "best_val"))}


@pytest.mark.slow
def test_sigkill_then_resume_ends_like_an_uninterrupted_run(tmp_path, synthetic_npz):
    logs = "logger=[tensorboard,csv]"  # both logs must continue across the resume
    whole = run_here("chest_mnist.train", *command(synthetic_npz, tmp_path / "whole", logs))
    assert whole.returncode == 0, whole.stderr[-3000:]
    expected = final_metrics(only_run(tmp_path / "whole"))
    expected_curves = read_loss_curves_csv(only_run(tmp_path / "whole") / "csv" / "metrics.csv")

    killed = start(command(synthetic_npz, tmp_path / "killed", logs))
    run = wait_for_run(tmp_path / "killed", killed)
    last = run / "checkpoints" / "last.ckpt"
    wait_for(last, killed)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL
    assert not (run / "report").exists()  # it really died before the end
    epoch = load_checkpoint(last)["epoch"]
    assert epoch < 3

    resumed = run_here(  # in this process; the DDP tests resume in processes of their own
        "chest_mnist.train", *command(synthetic_npz, tmp_path / "killed", logs, f"ckpt_path={last}")
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Restoring states from the checkpoint path at {last}" in resumed.stdout + resumed.stderr
    assert only_run(tmp_path / "killed") == run  # the same run directory...
    assert (run / ".hydra" / "config.yaml").exists()  # ...whose first config is kept
    assert len(list((run / ".hydra").glob("resumed_*/config.yaml"))) == 1
    assert len({p.name.rsplit(".", 1)[0] for p in (run / "tensorboard").glob("events.*")}) >= 2
    assert final_metrics(run) == pytest.approx(expected, abs=1e-6)
    assert len(expected) > 10
    # the CSV log keeps the epochs before the kill (Lightning's CSVLogger deletes them) and
    # equals the whole run's. One gap is possible: Lightning writes an epoch's training
    # averages (train/loss) just after that epoch's checkpoint, so a kill in between loses
    # that one point (TensorBoard's too); validation is logged before the checkpoint.
    curves = read_loss_curves_csv(run / "csv" / "metrics.csv")
    assert curves["val/loss"][0] == expected_curves["val/loss"][0] == [0, 1, 2]
    assert curves["val/loss"][1] == pytest.approx(expected_curves["val/loss"][1], abs=1e-6)
    train_loss = dict(zip(*curves["train/loss"], strict=True))
    expected_train_loss = dict(zip(*expected_curves["train/loss"], strict=True))
    missing = {0, 1, 2} - set(train_loss)
    assert set(expected_train_loss) == {0, 1, 2} and missing <= {epoch}, (missing, epoch)
    assert train_loss == pytest.approx({e: expected_train_loss[e] for e in train_loss}, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "name", "code"),
    [(signal.SIGTERM, "SIGTERM", 128 + signal.SIGTERM), (signal.SIGINT, "Ctrl-C", 1)],
    ids=["sigterm", "ctrl_c"],
)
def test_a_stop_signal_saves_last_checkpoint_first(tmp_path, synthetic_npz, sig, name, code):
    """No last.ckpt at epoch ends here (a save at most every hour), so the file that holds the
    state at the signal can only be the signal's own save."""
    process = start(command(synthetic_npz, tmp_path, "trainer.max_epochs=50", min_interval_s=3600))
    checkpoints = wait_for_run(tmp_path, process) / "checkpoints"
    deadline = time.monotonic() + 120
    while not list(checkpoints.glob("epoch*.ckpt")):  # the best: the first epoch is over
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no best checkpoint"
        time.sleep(0.02)
    last = checkpoints / "last.ckpt"
    assert not last.exists()
    time.sleep(0.3)  # into the next epoch
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr[-3000:]
    assert f"Stopped by {name} at epoch" in stdout and f"ckpt_path={last}" in stdout
    step = int(stdout.split(f"Stopped by {name} at epoch")[1].split("step ")[1].split(";")[0])
    checkpoint = load_checkpoint(last)
    assert checkpoint["global_step"] == step > 0  # the state at the signal
    assert checkpoint["epoch"] < 49
    assert "rng_states" in checkpoint and "Traceback" not in stderr


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["plain", "whole_step_graph"])
def test_non_finite_loss_stops_and_keeps_the_good_checkpoints(
    tmp_path, synthetic_npz, monkeypatch, variant
):
    """A sane first epoch, then the learning rate jumps by 1e30 and the weights blow up. Also
    with model.cuda_graph=step (the capture replaced by the stand-ins of test_cuda_graphs): the
    jump reaches the graph's update, and the graph's loss the check."""
    extra = []
    if variant == "whole_step_graph":
        from chest_mnist import cuda_graphs
        from tests.test_cuda_graphs import CaptureStandIn

        stand_in = CaptureStandIn()
        monkeypatch.setattr(cuda_graphs, "warm_up", stand_in.warm_up)
        monkeypatch.setattr(cuda_graphs, "capture", stand_in.capture)
        monkeypatch.setattr(cuda_graphs, "wanted", lambda *args, **kwargs: True)  # as on a GPU
        extra = ["model.cuda_graph=step", "model.compile=false"]
    cfg = compose_train(
        command(synthetic_npz, tmp_path)[:-1]
        + extra
        + [
            "trainer.max_epochs=4",
            "model.scheduler.milestones=[1]",
            "model.scheduler.gamma=1e30",
            "callbacks.nonfinite_loss.check_every_n_steps=4",
            f"paths.output_dir={tmp_path}/run",
        ]
    )
    with pytest.raises(Exception) as error:
        train(cfg)
    message = str(find_user_error(error.value))
    assert "The training loss is nan at epoch 1, step " in message or "is inf at epoch 1" in message
    assert f"The checkpoints written before it are kept ({tmp_path}/run/checkpoints)" in message
    step = int(message.split("step ")[1].split(":")[0])
    assert 16 <= step < 32  # epoch 1 of 16-step epochs (512 images, batch 32)
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert last["epoch"] == 0 and last["global_step"] == 16  # the end of the good epoch
    weights = torch.cat([t.flatten().float() for t in last["state_dict"].values()])
    assert torch.isfinite(weights).all()
    if variant == "whole_step_graph":  # every step a replay: 512 images, 16 full batches
        assert stand_in.replays >= step


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (None, "does not exist"),
        (b"", "is not a readable PyTorch checkpoint"),
        ("pickled_code", "refused so that a checkpoint cannot run code"),
        ("run_folder", "/run is a folder; give a checkpoint file, e.g. ckpt_path="),
        ("number", "ckpt_path=0 does not exist"),  # a number to Hydra, not "no checkpoint"
    ],
    ids=["missing", "empty", "pickled_code", "run_folder", "number"],
)
def test_resume_refuses_a_bad_checkpoint_before_data_loads(tmp_path, synthetic_npz, make, message):
    from tests.test_evaluate import Payload

    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    if make == "pickled_code":
        torch.save({"state_dict": {}, "hyper_parameters": Payload()}, ckpt)
    elif make == "run_folder":  # the run, not its file: pointed at <run>/checkpoints/last.ckpt
        message += str(ckpt)
        ckpt = ckpt.parent.parent
    elif make == "number":
        ckpt = 0
    elif make is not None:
        ckpt.write_bytes(make)
    cfg = compose_train(
        command(tmp_path / "never_written.npz", tmp_path)
        + [f"ckpt_path={ckpt}", f"paths.output_dir={tmp_path}/out"]
    )
    with pytest.raises(Exception) as error:
        train(cfg)
    assert message in str(find_user_error(error.value))
    assert not (tmp_path / "never_written.npz").exists()


def test_rng_states_survive_a_weights_only_load(trained_run):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    saved = load_checkpoint(ckpt)["rng_states"]
    assert saved["world_size"] == 1  # one process: its own states (tests/test_ddp_resume.py)
    (states,) = saved["ranks"]
    assert set(states) == {"torch", "torch.cuda", "numpy", "python"}
    assert states["torch"].dtype == torch.uint8 and len(states["numpy"][1]) == 624


def test_best_checkpoint_holds_weights_only_and_is_refused_for_resume(trained_run, tmp_path):
    """The best checkpoint is for test, evaluate and predict: no Adam state (a third of the
    size); training is resumed from last.ckpt, and the message says so."""
    best = Path(
        json.loads((trained_run / "report" / "metrics.json").read_text())["best_checkpoint"]
    )
    last = trained_run / "checkpoints" / "last.ckpt"
    assert best.parent == last.parent and best != last
    assert "optimizer_states" not in load_checkpoint(best)
    assert "optimizer_states" in load_checkpoint(last)
    assert best.stat().st_size < 0.4 * last.stat().st_size

    cfg = compose_train(
        command(tmp_path / "never_written.npz", tmp_path)
        + [f"ckpt_path={best}", f"paths.output_dir={tmp_path}/out"]
    )
    with pytest.raises(Exception) as error:
        train(cfg)
    message = str(find_user_error(error.value))
    assert f"ckpt_path={best} holds the weights only" in message
    assert f"Resume from {last};" in message
    assert not (tmp_path / "never_written.npz").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "every_n, min_interval_s, epochs, saves",
    [(2, 0, 3, [1, 2]), (1, 0, 2, [0, 1]), (1, 3600, 3, [2]), (1, 30, 2, [1])],
)
def test_last_checkpoint_every_n_epochs_still_saves_the_end(
    tiny_overrides, tmp_path, monkeypatch, every_n, min_interval_s, epochs, saves
):
    """callbacks.last_checkpoint.every_n_epochs=2 on a 3-epoch run: saved at the end of the
    second epoch (during it, current_epoch is 1) and at the end of the last (current_epoch 2),
    which every_n_epochs alone would skip; every epoch: once per epoch, no extra save at the end.
    With min_interval_s an hour (or the default 30 s, on epochs of a second or two here), no
    epoch ends long enough after the start or the last save: only the last epoch's end is
    saved (there, not after training: test_ema_last_checkpoint_resumes_from_the_raw_weights)."""
    import lightning as L

    written = []
    save = L.Trainer.save_checkpoint

    def counted(trainer, path, *args, **kwargs):
        if str(path).endswith("last.ckpt"):
            written.append(trainer.current_epoch)
        return save(trainer, path, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "save_checkpoint", counted)
    cfg = compose_train(
        tiny_overrides
        + [f"trainer.max_epochs={epochs}", f"callbacks.last_checkpoint.every_n_epochs={every_n}"]
        + [f"callbacks.last_checkpoint.min_interval_s={min_interval_s}"]
    )
    train(cfg)
    last = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 3 * epochs  # limit_train_batches=3: the final state
    assert written == saves


def test_a_save_cut_short_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """AtomicCheckpointIO writes beside the target and renames: a save that dies half-way
    leaves the old last.ckpt byte for byte; the next good save replaces it and clears what a
    killed save left behind."""
    from chest_mnist.callbacks import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"epoch": 1, "weights": torch.ones(1000)}, path)
    before = path.read_bytes()

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(before[: len(before) // 2])
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(torch, "save", dies_half_way)
        with pytest.raises(KeyboardInterrupt):
            io.save_checkpoint({"epoch": 2, "weights": torch.zeros(1000)}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]

    (path.parent / ".last.ckpt.12345.tmp").write_bytes(b"left by a SIGKILL")
    io.save_checkpoint({"epoch": 2, "weights": torch.zeros(1000)}, path)
    assert io.load_checkpoint(path, weights_only=True)["epoch"] == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


@pytest.mark.slow
def test_sigkill_during_saves_leaves_a_loadable_checkpoint(tmp_path, cfg_tiny):
    """A process that does nothing but save a 64 MB checkpoint, killed at a random moment:
    last.ckpt is whole, one of the complete saves. Training uses this writer."""
    import hydra

    trainer = hydra.utils.instantiate(cfg_tiny.trainer, logger=False)
    assert type(trainer.strategy.checkpoint_io).__name__ == "AtomicCheckpointIO"
    path = tmp_path / "last.ckpt"
    saver = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, torch\n"
            "from chest_mnist.callbacks import AtomicCheckpointIO\n"
            "io, n = AtomicCheckpointIO(), 0\n"
            "while True:\n"
            "    n += 1\n"
            "    io.save_checkpoint({'n': n, 'w': torch.full((16_000_000,), float(n))}, sys.argv[1])\n"
            "    print(n, flush=True)\n",
            str(path),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert saver.stdout.readline().strip() == "1"  # one save done: now kill one in flight
        time.sleep(0.3)
    finally:
        saver.kill()
        saver.wait()
    saved = [int(line) for line in saver.stdout.read().split()]
    checkpoint = torch.load(path, weights_only=True)
    n = checkpoint["n"]
    assert n >= 1 + len(saved) and torch.equal(
        checkpoint["w"][[0, -1]], torch.tensor([n, n]).float()
    )


def test_resume_says_when_its_schedule_is_not_the_configs(trained_run, synthetic_npz, caplog):
    """A run resumed with another max_epochs keeps the learning-rate steps it was saved with
    (Lightning restores the scheduler); the log says so, with both."""
    from chest_mnist.config_checks import check_resumable

    last = trained_run / "checkpoints" / "last.ckpt"  # 2 epochs: steps at [1, 1]
    run = tiny_training_overrides(synthetic_npz, trained_run)  # the run's own command
    with caplog.at_level("WARNING", logger="chest_mnist.config_checks"):
        check_resumable(str(last), compose_train([*run, "trainer.max_epochs=2"]))
        assert not caplog.records
        check_resumable(str(last), compose_train([*run, "trainer.max_epochs=10"]))
    (record,) = caplog.records
    assert "lr steps at epochs [1, 1], not at [5, 7]" in record.getMessage()
    assert "trainer.max_epochs=10" in record.getMessage()


def test_resume_says_which_settings_differ_from_the_runs(trained_run, synthetic_npz, caplog):
    """Resumed with other data, loss or optimizer settings than the run was saved with (its
    checkpoint holds them), the log names each, saved and new, and whether it takes effect (the
    optimizer's state is restored whatever the config says); where the data lives, how it
    reaches the model, or how fast the step runs is not the recipe and says nothing."""
    from chest_mnist.config_checks import check_resumable

    last = trained_run / "checkpoints" / "last.ckpt"
    run = tiny_training_overrides(synthetic_npz, trained_run) + ["trainer.max_epochs=2"]
    same = ["data.on_device=false", "data.eval_batch_size=64", "model.cuda_graph=false"]
    same += ["model.optimizer.fused=null", "+model.optimizer.betas=[0.9,0.999]"]  # Adam's own
    other = ["data.subset=64", "model.label_smoothing=0.1", "model.optimizer.lr=3e-4"]
    other += ["+model.optimizer.betas=[0.9,0.99]", f"data.path={synthetic_npz.parent}/x.npz"]
    other += ["model.optimizer.fused=true"]  # the saved (None: PyTorch's choice) is restored
    with caplog.at_level("WARNING", logger="chest_mnist.config_checks"):
        check_resumable(str(last), compose_train(run + same))
        assert not caplog.records
        check_resumable(str(last), compose_train(run + other))
    (record,) = caplog.records
    assert (
        f"with other settings than the run it continues: data.path '{synthetic_npz}' -> "
        f"'{synthetic_npz.parent}/x.npz' (takes effect); data.subset None -> 64 (takes "
    ) in record.getMessage()
    assert "model.label_smoothing 0.0 -> 0.1 (takes effect); model.optimizer.lr 0.001 -> " in (
        record.getMessage()
    )
    said = record.getMessage()
    assert (
        "0.0003 (the saved value is kept); model.optimizer.fused None -> True (the saved " in said
    )
    assert "model.optimizer.betas [0.9, 0.999] -> [0.9, 0.99] (the saved value is kept)." in said


@pytest.mark.parametrize("optimizer", ["torch.optim.SGD", "torch.optim.AdamW"])
def test_resume_refuses_another_optimizer(trained_run, synthetic_npz, optimizer):
    """Adam's saved state does not fit another optimizer: SGD failed with a KeyError inside
    Lightning after the data, AdamW went on as Adam (the saved settings are restored)."""
    from chest_mnist.config_checks import check_resumable

    last = trained_run / "checkpoints" / "last.ckpt"
    run = tiny_training_overrides(synthetic_npz, trained_run) + ["trainer.max_epochs=2"]
    check_resumable(str(last), compose_train([*run, "model.optimizer._target_=torch.optim.Adam"]))
    with pytest.raises(UserError) as refused:
        check_resumable(str(last), compose_train([*run, f"model.optimizer._target_={optimizer}"]))
    assert str(refused.value) == (
        f"ckpt_path={last} was trained with the optimizer torch.optim.adam.Adam; its saved "
        f"state cannot go on with model.optimizer._target_={optimizer}. Resume with the run's "
        f"own optimizer, or train a new run (without ckpt_path)."
    )


def test_the_optimizer_check_passes_checkpoints_that_cannot_say(trained_run, synthetic_npz):
    """A checkpoint from before the class was saved is not checked; a saved class that cannot
    be imported here is compared by its name."""
    from chest_mnist.config_checks import check_same_optimizer
    from chest_mnist.model import OPTIMIZER_CLASS

    checkpoint = load_checkpoint(trained_run / "checkpoints" / "last.ckpt")
    run = tiny_training_overrides(synthetic_npz, trained_run) + ["trainer.max_epochs=2"]
    sgd = compose_train([*run, "model.optimizer._target_=torch.optim.SGD"])
    adam = compose_train(run)
    del checkpoint[OPTIMIZER_CLASS]
    check_same_optimizer("old.ckpt", checkpoint, sgd)
    checkpoint[OPTIMIZER_CLASS] = "a_package_not_here.Adam"
    check_same_optimizer("moved.ckpt", checkpoint, adam)
    with pytest.raises(UserError, match="trained with the optimizer a_package_not_here.Adam"):
        check_same_optimizer("moved.ckpt", checkpoint, sgd)


@pytest.mark.parametrize(
    ("override", "saved", "given"),
    [
        ("data.flag=pneumoniamnist", "data.flag='chestmnist'", "data.flag='pneumoniamnist'"),
        ("model.stem=cifar", "model.stem='imagenet'", "model.stem='cifar'"),
        ("model.pos_weight=auto", "model.pos_weight=None", "model.pos_weight='auto'"),
    ],
)
def test_resume_refuses_settings_its_weights_cannot_go_on_with(
    trained_run, synthetic_npz, override, saved, given
):
    """Other labels (the head), another stem (the first convolution), or pos_weight where there
    was none (a buffer of the weights): refused before any data, naming both values, instead of
    load_state_dict's error after the data."""
    from chest_mnist.config_checks import check_resumable

    last = trained_run / "checkpoints" / "last.ckpt"
    run = tiny_training_overrides(synthetic_npz, trained_run) + ["trainer.max_epochs=2"]
    with pytest.raises(UserError) as refused:
        check_resumable(str(last), compose_train([*run, override]))
    assert f"was trained with {saved}; its weights cannot go on with {given}." in str(refused.value)


def test_last_checkpoint_refuses_a_negative_interval(tmp_path):
    from chest_mnist.callbacks import LastCheckpoint

    with pytest.raises(UserError, match=r"callbacks.last_checkpoint.min_interval_s=-1 must be 0"):
        LastCheckpoint(dirpath=str(tmp_path), min_interval_s=-1)


def test_a_resumed_run_keeps_its_first_config_and_a_multirun_job_has_its_own(tmp_path):
    """hydra.output_subdir: a run resumed in its own directory writes its config beside the
    first one (.hydra/resumed_<time>); a multirun job resumed from a checkpoint has a directory
    of its own, whose .hydra the sweep's summary and compare read."""
    from hydra.types import RunMode

    from chest_mnist.config import config_subdir

    last = str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert config_subdir("train", last, "T", RunMode.RUN) == ".hydra/resumed_T"
    assert config_subdir("train", last, "T", RunMode.MULTIRUN) == ".hydra"
    assert config_subdir("train", None, "T", RunMode.RUN) == ".hydra"
    assert config_subdir("evaluate", last, "T", RunMode.RUN) == ".hydra"
    # a new run, or a sweep's job, where another has trained (train refuses it): beside that
    # run's config; where one was refused or failed before its first checkpoint: taken over
    begun = tmp_path / "begun"
    (begun / ".hydra").mkdir(parents=True)
    (begun / "tensorboard").mkdir()
    assert config_subdir("train", None, "T", RunMode.RUN, str(begun)) == ".hydra"
    (begun / "report").mkdir()
    (begun / "report" / "metrics.json").write_text("{}")
    assert config_subdir("train", None, "T", RunMode.RUN, str(begun)) == ".hydra/refused_T"
    assert config_subdir("train", last, "T", RunMode.MULTIRUN, str(begun)) == ".hydra/refused_T"
    assert config_subdir("evaluate", None, "T", RunMode.RUN, str(begun)) == ".hydra"
    # and hydra/default.yaml gives it the mode Hydra sets when it runs the job
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"ckpt_path={last}"], return_hydra_config=True)
    cfg.hydra.mode = RunMode.RUN
    assert cfg.hydra.output_subdir.startswith(".hydra/resumed_")
    cfg.hydra.mode = RunMode.MULTIRUN
    assert cfg.hydra.output_subdir == ".hydra"


def test_a_new_run_in_a_begun_runs_folder_is_refused_and_that_run_left_as_it_was(
    tmp_path, synthetic_npz
):
    """hydra.run.dir= an earlier run's folder: its config was overwritten (by Hydra, before any
    check) and its TensorBoard events mixed with the new run's (its loss curves drew both).
    Refused now, that run's files untouched; a resume refused before its first step (by its
    checks, or by its data) leaves no config of its own."""
    folder = tmp_path / "baseline"
    here = [f"hydra.run.dir={folder}", f"paths.output_dir={folder}", "trainer.max_epochs=1"]
    first = run_here("chest_mnist.train", *command(synthetic_npz, tmp_path, *here))
    assert first.returncode == 0, first.stderr[-3000:]
    begun = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    config = (folder / ".hydra" / "config.yaml").read_text()

    again = run_here("chest_mnist.train", *command(synthetic_npz, tmp_path, *here, "seed=7"))
    assert again.returncode == 2
    assert f"error: {folder} holds a run already (its checkpoints or report): a new run " in (
        again.stderr
    )
    assert f"Resume that run with ckpt_path={folder}/checkpoints/last.ckpt, or give" in again.stderr
    assert (folder / ".hydra" / "config.yaml").read_text() == config  # seed 42, not 7
    assert sorted(p.name for p in (folder / ".hydra").iterdir()) == [
        "config.yaml",
        "hydra.yaml",
        "overrides.yaml",
    ]
    last = folder / "checkpoints" / "last.ckpt"
    refused = run_here(  # a resume its weights cannot go on with
        "chest_mnist.train",
        *command(synthetic_npz, tmp_path, *here, "model.stem=cifar"),
        f"ckpt_path={last}",
    )
    assert refused.returncode == 2 and "its weights cannot go on with" in refused.stderr
    assert not list((folder / ".hydra").glob("resumed_*"))
    no_data = run_here(  # refused by its data as the fit begins, after the checks (it was left)
        "chest_mnist.train",
        *command(synthetic_npz, tmp_path, *here),
        f"data.path={tmp_path}/gone.npz",
        "data.synthetic=null",  # not written on first use: missing
        f"ckpt_path={last}",
    )
    assert no_data.returncode == 2 and "gone.npz does not exist" in no_data.stderr
    assert not list((folder / ".hydra").glob("resumed_*"))
    changed = {p for p in folder.rglob("*") if p.is_file() and begun.get(p) != p.stat().st_mtime_ns}
    assert changed == {folder / "train.log"}  # where the refusals are logged


def test_the_begun_folder_check_knows_a_resume_in_place_by_any_spelling(
    tmp_path, monkeypatch, synthetic_npz
):
    """ckpt_path=~/... (expanded by the checkpoint's reader) resumes the run in its own folder;
    a folder whose earlier run failed before its first checkpoint may be used again."""
    from chest_mnist.config_checks import check_new_run_folder

    monkeypatch.setenv("HOME", str(tmp_path))
    folder = tmp_path / "run"
    (folder / "tensorboard").mkdir(parents=True)  # a run that failed before any checkpoint
    run = [*command(synthetic_npz, tmp_path), f"paths.output_dir={folder}"]
    check_new_run_folder(compose_train(run))
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"")
    check_new_run_folder(compose_train([*run, "ckpt_path='~/run/checkpoints/last.ckpt'"]))
    with pytest.raises(UserError, match="holds a run already"):
        check_new_run_folder(compose_train(run))


def test_a_refusal_removes_only_the_config_put_aside(tmp_path, monkeypatch):
    """train.forget_refused_config: a .hydra/refused_<time> or .hydra/resumed_<time> goes; the
    run folder's own .hydra, or an output_subdir the user chose (here: the folder itself),
    stays."""
    from types import SimpleNamespace

    from chest_mnist import train as train_module

    (tmp_path / ".hydra" / "refused_T").mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("the user's")
    for subdir, gone in [
        (".", False),
        (".hydra", False),
        (None, False),
        (".hydra/refused_T", True),
    ]:
        hydra_cfg = SimpleNamespace(
            output_subdir=subdir, runtime=SimpleNamespace(output_dir=tmp_path)
        )
        monkeypatch.setattr(train_module.HydraConfig, "initialized", staticmethod(lambda: True))
        monkeypatch.setattr(train_module.HydraConfig, "get", staticmethod(lambda h=hydra_cfg: h))
        train_module.forget_refused_config()
        assert (tmp_path / "notes.txt").exists()
        assert (tmp_path / ".hydra" / "refused_T").exists() is not gone, subdir


class StopInsideAnEpoch(L.Callback):
    """Stops the run inside an epoch as a user or a scheduler would, at step `step`:
    "sigterm" sends this process SIGTERM during the step, before its update (training stops
    after it), "ctrl_c_in_step" raises KeyboardInterrupt there, "ctrl_c_after_step" after the
    update, in on_train_batch_end (where the progress bar reads the loss)."""

    def __init__(self, how: str, step: int):
        self.how, self.step = how, step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.how == "sigterm" and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.how == "ctrl_c_after_step" and trainer.global_step - 1 == self.step:
            raise KeyboardInterrupt

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self.how == "ctrl_c_in_step" and trainer.global_step == self.step:
            raise KeyboardInterrupt


# 80 images in batches of 32: 3 steps an epoch (the last of 16 images), 6 in the run
INSIDE_AN_EPOCH_RUN = [
    "data.subset=80",
    "trainer.max_epochs=2",
    "model.scheduler.milestones=[1]",
    "test=false",
    "~callbacks.progress_bar",
    "~callbacks.model_summary",
]
BATCH_NORM_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def stop_inside_an_epoch(run: list[str], out: Path, how: str, step: int) -> Path:
    """Train `run` into `out`, stopped at `step` by `how` (StopInsideAnEpoch); its last.ckpt."""
    stop = [f"+callbacks.stop._target_={__name__}.StopInsideAnEpoch", f"+callbacks.stop.how={how}"]
    sigint = signal.getsignal(signal.SIGINT)  # Lightning ignores Ctrl-C after the first
    try:
        with pytest.raises((SIGTERMException, SystemExit)):
            train(
                compose_train(
                    [*run, *stop, f"+callbacks.stop.step={step}", f"paths.output_dir={out}"]
                )
            )
    finally:
        signal.signal(signal.SIGINT, sigint)
    return out / "checkpoints" / "last.ckpt"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("how", "step"), [("sigterm", 4), ("ctrl_c_after_step", 1), ("ctrl_c_in_step", 1)]
)
def test_a_run_stopped_inside_an_epoch_resumes_to_the_uninterrupted_runs_weights(
    tmp_path, synthetic_npz, how, step
):
    """SIGTERM after step 4 (the second batch of epoch 1), with random shifts (drawn from the
    generator that also shuffles), and Ctrl-C after the update of step 1 (epoch 0): resumed
    from the last.ckpt the stop saved, the run sees the rest of that epoch's permutation, each
    image once, and ends with the uninterrupted run's weights, batch-norm statistics and Adam
    moments. Ctrl-C in the middle of step 1: its update never happened, so the resumed run
    trains that batch again, to the same weights and moments; its forward had updated the
    batch-norm statistics, which count it twice (the README says so)."""
    run = command(synthetic_npz, tmp_path) + INSIDE_AN_EPOCH_RUN
    run.append(f"data.augment={how == 'sigterm'}")
    train(compose_train([*run, f"paths.output_dir={tmp_path}/whole"]))
    whole = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.ckpt")

    last = stop_inside_an_epoch(run, tmp_path / "stopped", how, step)
    saved = load_checkpoint(last)
    assert saved["global_step"] == (step if how == "ctrl_c_in_step" else step + 1)
    assert saved["global_step"] % 3 != 0  # inside an epoch

    train(compose_train([*run, f"ckpt_path={last}", f"paths.output_dir={tmp_path}/stopped"]))
    resumed = load_checkpoint(last)
    assert resumed["global_step"] == whole["global_step"] == 6
    for name, value in whole["state_dict"].items():
        if how != "ctrl_c_in_step" or not name.endswith(BATCH_NORM_STATISTICS):
            torch.testing.assert_close(resumed["state_dict"][name], value, atol=0, rtol=0)
    moments = zip(
        whole["optimizer_states"][0]["state"].values(),
        resumed["optimizer_states"][0]["state"].values(),
        strict=True,
    )
    for a, b in moments:
        torch.testing.assert_close(b["exp_avg"], a["exp_avg"], atol=0, rtol=0)
        torch.testing.assert_close(b["exp_avg_sq"], a["exp_avg_sq"], atol=0, rtol=0)


@pytest.mark.slow
def test_a_sigterm_at_an_epochs_last_batch_lets_its_validation_finish(tmp_path, synthetic_npz):
    """The signal comes with the last batch of epoch 0, just before its validation (3 batches
    here): the validation runs to its end before training stops (Lightning alone stopped it
    after its first batch, and the resumed run never validated epoch 0), and the resumed run
    ends with the uninterrupted run's weights and best checkpoint."""
    run = [*command(synthetic_npz, tmp_path), *INSIDE_AN_EPOCH_RUN, "data.eval_batch_size=32"]
    train(compose_train([*run, f"paths.output_dir={tmp_path}/whole"]))
    whole = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.ckpt")

    last = stop_inside_an_epoch(run, tmp_path / "stopped", "sigterm", 2)
    assert load_checkpoint(last)["global_step"] == 3  # epoch 0, whole
    assert list(last.parent.glob("epoch000-*.ckpt"))  # its validation chose a best checkpoint
    train(compose_train([*run, f"ckpt_path={last}", f"paths.output_dir={tmp_path}/stopped"]))
    resumed = load_checkpoint(last)
    assert resumed["global_step"] == 6
    for name, value in whole["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], value, atol=0, rtol=0)
    best = [
        sorted(p.name for p in (tmp_path / d / "checkpoints").glob("epoch*"))
        for d in ("whole", "stopped")
    ]
    assert best[0] == best[1]


class SigtermAtBatch(L.Callback):
    def __init__(self, epoch: int, batch: int):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
def test_a_sigterm_while_gradients_accumulate_stops_at_the_update(tmp_path, synthetic_npz):
    """Batches of 32 accumulated in twos: the signal after the first batch of epoch 1 stops
    training after the second, whose update uses both (stopped at the first, its gradients
    would be lost, as no checkpoint holds them), and the resumed run ends as the uninterrupted."""
    run = [*command(synthetic_npz, tmp_path), *INSIDE_AN_EPOCH_RUN]
    run.append("+trainer.accumulate_grad_batches=2")
    train(compose_train([*run, f"paths.output_dir={tmp_path}/whole"]))
    whole = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.ckpt")
    assert whole["global_step"] == 4  # two updates an epoch: batches 0 and 1, then 2

    signal_at = [
        f"+callbacks.stop._target_={__name__}.SigtermAtBatch",
        "+callbacks.stop.epoch=1",
        "+callbacks.stop.batch=0",
    ]
    with pytest.raises(SIGTERMException):
        train(compose_train([*run, *signal_at, f"paths.output_dir={tmp_path}/stopped"]))
    last = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    assert load_checkpoint(last)["global_step"] == 3
    train(compose_train([*run, f"ckpt_path={last}", f"paths.output_dir={tmp_path}/stopped"]))
    resumed = load_checkpoint(last)
    assert resumed["global_step"] == 4
    for name, value in whole["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], value, atol=0, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("then, now", [("auto", "false"), ("false", "auto")])
def test_a_stop_inside_an_epoch_resumes_with_the_other_kind_of_training_batches(
    tmp_path, synthetic_npz, caplog, then, now
):
    """data.on_device decides between DeviceBatches and a DataLoader (auto: by the GPU's free
    memory, so it can change between the stop and the resume): either checkpoint resumes with
    either, and where the order cannot go on, the rest of the epoch is shuffled afresh and the
    log says so."""
    run = command(synthetic_npz, tmp_path) + INSIDE_AN_EPOCH_RUN
    last = stop_inside_an_epoch([*run, f"data.on_device={then}"], tmp_path / "run", "sigterm", 1)
    with caplog.at_level("WARNING", logger="chest_mnist.batches"):
        train(
            compose_train(
                [
                    *run,
                    f"data.on_device={now}",
                    f"ckpt_path={last}",
                    f"paths.output_dir={tmp_path}/run",
                ]
            )
        )
    assert load_checkpoint(last)["global_step"] == 6
    assert "The checkpoint was saved inside an epoch" in caplog.text
    assert "the rest of that epoch is shuffled afresh" in caplog.text
