"""Resuming a DDP run: each process saves and restores its own random generator states, so a
run killed and resumed ends as one never stopped; another number of processes, an earlier
checkpoint format and a GPU count other than the saved one still resume."""

import logging
import random
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from chest_mnist.callbacks import RestoreRNG
from chest_mnist.checkpoints import load_checkpoint
from tests.conftest import run_here, run_module

NOISE = "+callbacks.rank_noise._target_=tests.ddp_callbacks.RankNoise"
KILL_AT_EPOCH_1 = [
    "+callbacks.kill._target_=tests.ddp_callbacks.KillAtEpochStart",
    "+callbacks.kill.epoch=1",
]


def command(
    npz: Path, log_dir: Path, *extra: str, processes: int = 2, noise: bool = True
) -> list[str]:
    """Two CPU processes (gloo), 2 epochs of 4 steps (128 images: 64 per process, batch 16);
    or one process (8 steps an epoch). `noise`: RankNoise, the ranks' generators apart."""
    trainer = ["trainer=cpu"]
    if processes > 1:
        trainer = [
            "trainer=ddp",
            "trainer.accelerator=cpu",
            f"trainer.devices={processes}",
            "trainer.sync_batchnorm=false",
        ]
    return [
        *trainer,
        "trainer.deterministic=true",
        "trainer.benchmark=false",
        "trainer.max_epochs=2",
        "data=synthetic",
        f"data.path={npz}",
        "data.subset=128",
        "data.batch_size=16",
        "data.eval_batch_size=64",
        "model.stem=imagenet",
        "test=false",
        "logger=csv",
        "callbacks.progress_bar.refresh_rate=0",
        "callbacks.last_checkpoint.min_interval_s=0",  # last.ckpt at every epoch's end
        *([NOISE] if noise else []),
        f"paths.log_dir={log_dir}",
        *extra,
    ]


def last_checkpoint(log_dir: Path) -> Path:
    """last.ckpt of the one run under `log_dir`."""
    (run,) = (log_dir / "train" / "runs").iterdir()
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def killed_at_epoch_1(tmp_path_factory, synthetic_npz) -> tuple[Path, Path]:
    """The log folders of a 2-process run whose processes were SIGKILLed as epoch 1 started:
    the run's own, which one test resumes in place as a user would, and a copy made before that,
    which the other resumes."""
    log_dir = tmp_path_factory.mktemp("killed")
    killed = run_module("chest_mnist.train", *command(synthetic_npz, log_dir, *KILL_AT_EPOCH_1))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    checkpoint = load_checkpoint(last_checkpoint(log_dir))
    assert (checkpoint["epoch"], checkpoint["global_step"]) == (0, 4)
    copy = tmp_path_factory.mktemp("killed_copy") / "logs"
    shutil.copytree(log_dir, copy)
    return log_dir, copy


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(ckpt)["state_dict"]


@pytest.mark.slow
def test_two_process_run_killed_and_resumed_ends_like_one_never_stopped(
    tmp_path, synthetic_npz, killed_at_epoch_1
):
    """The ranks' generator states differ (RankNoise, as per-GPU generators do): rank 1 must
    get its own back, or its epoch-1 shuffle, and so the final weights, differ."""
    whole = run_module("chest_mnist.train", *command(synthetic_npz, tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    expected = weights(last_checkpoint(tmp_path / "whole"))

    log_dir, _ = killed_at_epoch_1
    last = last_checkpoint(log_dir)
    saved = load_checkpoint(last)["rng_states"]
    resumed = run_module("chest_mnist.train", *command(synthetic_npz, log_dir, f"ckpt_path={last}"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    output = resumed.stdout + resumed.stderr
    assert f"Restoring states from the checkpoint path at {last}" in output
    assert "random generator states were saved by" not in output
    assert load_checkpoint(last)["global_step"] == 8
    got = weights(last)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(
            got[name], value, rtol=0, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}"
        )
    # each process's own states were saved, and they differ (so the test tests something)
    assert saved["world_size"] == 2
    assert not torch.equal(saved["ranks"][0]["torch"], saved["ranks"][1]["torch"])


def stopped_by_sigterm(npz: Path, log_dir: Path, steps: str) -> Path:
    """last.ckpt of a two-process run (without RankNoise) whose processes get SIGTERM after the
    steps given, one per process (null: none). Lightning 2.6 alone stops each process where it
    sees the signal, and a run like this hangs (issue #20806); StopOnSigterm stops both after
    the same batch: inside epoch 1 (4 steps an epoch), at step 6."""
    signal_them = [
        "+callbacks.sigterm._target_=tests.ddp_callbacks.SigtermAfterStep",
        f"+callbacks.sigterm.steps={steps}",
    ]
    stopped = run_module("chest_mnist.train", *command(npz, log_dir, *signal_them, noise=False))
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    last = last_checkpoint(log_dir)
    checkpoint = load_checkpoint(last)
    assert (checkpoint["epoch"], checkpoint["global_step"]) == (1, 6)
    return last


@pytest.mark.slow
def test_two_process_sigterm_at_another_batch_in_each_stops_both_together(tmp_path, synthetic_npz):
    """The first process gets the signal after batch 5, the second after batch 6: both stop
    after the first one's next batch."""
    stopped_by_sigterm(synthetic_npz, tmp_path, "[5,6]")


@pytest.mark.slow
def test_two_process_sigterm_to_the_second_alone_stops_both_and_resumes_exactly(
    tmp_path, synthetic_npz
):
    """The second process alone gets the signal (the first, its parent, never sees one): both
    stop together, and the resumed run ends as one never stopped. Without RankNoise: every
    process shuffles with the same permutation only while their generators agree (the same
    seed, the same draws), and the checkpoint keeps the first process's."""
    whole = run_module(
        "chest_mnist.train", *command(synthetic_npz, tmp_path / "whole", noise=False)
    )
    assert whole.returncode == 0, whole.stderr[-3000:]
    expected = weights(last_checkpoint(tmp_path / "whole"))

    last = stopped_by_sigterm(synthetic_npz, tmp_path / "stopped", "[null,5]")
    resumed = run_module(
        "chest_mnist.train",
        *command(synthetic_npz, tmp_path / "stopped", f"ckpt_path={last}", noise=False),
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert load_checkpoint(last)["global_step"] == 8
    got = weights(last)
    for name, value in expected.items():
        torch.testing.assert_close(
            got[name], value, rtol=0, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.slow
def test_two_process_checkpoint_resumes_in_one_process_with_a_warning(
    synthetic_npz, killed_at_epoch_1
):
    _, log_dir = killed_at_epoch_1
    last = last_checkpoint(log_dir)
    resumed = run_here(  # one process: this one
        "chest_mnist.train", *command(synthetic_npz, log_dir, f"ckpt_path={last}", processes=1)
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    output = resumed.stdout + resumed.stderr
    assert "random generator states were saved by 2 processes and this run has 1" in output
    assert "the data order will differ from a run that was never stopped" in output
    checkpoint = load_checkpoint(last)
    assert checkpoint["global_step"] == 4 + 8  # epoch 1 alone: 128 images, batch 16
    assert checkpoint["rng_states"]["world_size"] == 1


# ---- unit tests of RestoreRNG, with stand-in trainers -------------------------------------


@pytest.fixture(autouse=True)
def keep_global_generators():
    """These tests set the global generators; put them back as they were."""
    saved = torch.get_rng_state(), np.random.get_state(), random.getstate()
    yield
    torch.set_rng_state(saved[0])
    np.random.set_state(saved[1])
    random.setstate(saved[2])


def fake_trainer(rank: int = 0, world_size: int = 1, device: str = "cpu") -> SimpleNamespace:
    devices = [torch.device(device)]
    if devices[0].type == "cuda":
        devices = [torch.device("cuda", i) for i in range(world_size)]
    return SimpleNamespace(
        global_rank=rank,
        world_size=world_size,
        is_global_zero=rank == 0,
        strategy=SimpleNamespace(root_device=torch.device(device), parallel_devices=devices),
    )


def seeded_states(seed: int) -> dict:
    """What one process saves after seeding everything with `seed` and drawing a little."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    torch.rand(seed + 1), np.random.rand(seed + 1), random.random()
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "torch.cuda": None,
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "python": random.getstate(),
    }


def as_saved(rng_states: dict, tmp_path: Path) -> dict:
    """Through a file and back, as Lightning loads a checkpoint: weights_only=True."""
    torch.save({"rng_states": rng_states}, tmp_path / "states.ckpt")
    return torch.load(tmp_path / "states.ckpt", weights_only=True)


def assert_current_states_are(states: dict) -> None:
    assert torch.equal(torch.get_rng_state(), states["torch"])
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    assert (name, pos, has_gauss, gauss) == (states["numpy"][0], *states["numpy"][2:])
    np.testing.assert_array_equal(keys, states["numpy"][1].numpy())
    version, internal, gauss_next = random.getstate()
    assert (version, internal, gauss_next) == (
        states["python"][0],
        tuple(states["python"][1]),
        states["python"][2],
    )


def test_each_rank_restores_its_own_states(tmp_path):
    ranks = [seeded_states(1), seeded_states(2)]
    checkpoint = as_saved({"world_size": 2, "ranks": ranks}, tmp_path)
    for rank in (1, 0):
        torch.manual_seed(99), np.random.seed(99), random.seed(99)
        RestoreRNG().on_load_checkpoint(fake_trainer(rank, 2), None, checkpoint)
        assert_current_states_are(ranks[rank])


@pytest.mark.parametrize("rank, world_size", [(0, 1), (2, 3)])
def test_another_world_size_restores_saved_rank_0s_states_with_a_warning(
    tmp_path, caplog, rank, world_size
):
    ranks = [seeded_states(1), seeded_states(2)]
    checkpoint = as_saved({"world_size": 2, "ranks": ranks}, tmp_path)
    with caplog.at_level(logging.WARNING, logger="chest_mnist.callbacks"):
        RestoreRNG().on_load_checkpoint(fake_trainer(rank, world_size), None, checkpoint)
    assert_current_states_are(ranks[0])
    if rank == 0:  # said once, by rank 0
        (record,) = caplog.records
        assert f"saved by 2 processes and this run has {world_size}" in record.getMessage()
        assert "the data order will differ" in record.getMessage()
    else:
        assert not caplog.records


def test_an_earlier_format_checkpoint_still_restores(tmp_path, caplog):
    """What RestoreRNG wrote before it kept each rank's states: one process's, at the top."""
    earlier = seeded_states(5) | {"torch.cuda": []}
    checkpoint = as_saved(earlier, tmp_path)
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    with caplog.at_level(logging.WARNING, logger="chest_mnist.callbacks"):
        RestoreRNG().on_load_checkpoint(fake_trainer(), None, checkpoint)
    assert_current_states_are(checkpoint["rng_states"])
    assert not caplog.records  # one process saved, one resumes: the run continues exactly


@pytest.fixture
def one_fake_gpu(monkeypatch):
    """torch.cuda with one device (`["count"] = 2` for two): state reads give a per-device
    tensor and are recorded, as are writes; a device index past the count raises IndexError,
    as torch's own does (torch.cuda.default_generators[index])."""
    calls = {"get": [], "set": [], "count": 1}

    def index(device) -> int:
        if isinstance(device, int):
            return device
        return torch.device(device).index or 0

    def get_rng_state(device="cuda"):
        calls["get"].append(index(device))
        return torch.full((8,), index(device), dtype=torch.uint8)

    def set_rng_state(state, device="cuda"):
        if index(device) >= calls["count"]:
            raise IndexError("list index out of range")
        calls["set"].append((index(device), state.clone()))

    def get_rng_state_all():
        raise AssertionError("every device's state, not the process's own")

    for module in (torch.cuda, torch.cuda.random):
        monkeypatch.setattr(module, "get_rng_state", get_rng_state)
        monkeypatch.setattr(module, "set_rng_state", set_rng_state)
        monkeypatch.setattr(module, "get_rng_state_all", get_rng_state_all)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: calls["count"])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return calls


def test_a_process_saves_its_own_gpus_cuda_state_only(one_fake_gpu):
    checkpoint = {}
    RestoreRNG().on_save_checkpoint(fake_trainer(device="cuda:1"), None, checkpoint)
    assert one_fake_gpu["get"] == [1]  # the process's own device's state, no other
    assert torch.equal(checkpoint["rng_states"]["ranks"][0]["torch.cuda"], torch.full((8,), 1))


def test_two_gpus_cuda_states_resume_on_one_gpu(tmp_path, one_fake_gpu):
    """Saved by 2 processes on 2 GPUs, resumed by 1 process on a machine with 1 GPU: saved rank
    0's state on the process's own device."""
    ranks = [seeded_states(1), seeded_states(2)]
    ranks[0]["torch.cuda"] = torch.full((8,), 10, dtype=torch.uint8)
    ranks[1]["torch.cuda"] = torch.full((8,), 11, dtype=torch.uint8)
    saved = as_saved({"world_size": 2, "ranks": ranks}, tmp_path)
    RestoreRNG().on_load_checkpoint(fake_trainer(device="cuda:0"), None, saved)
    ((device, state),) = one_fake_gpu["set"]
    assert device == 0 and torch.equal(state, ranks[0]["torch.cuda"])


def test_an_earlier_format_with_two_gpus_states_resumes_on_one_gpu(tmp_path, one_fake_gpu):
    """One process's states with a list of every visible GPU's (2), resumed where only 1 is:
    no IndexError; the entry of the process's own device is restored."""
    earlier = seeded_states(3) | {
        "torch.cuda": [
            torch.full((8,), 20, dtype=torch.uint8),
            torch.full((8,), 21, dtype=torch.uint8),
        ]
    }
    saved = as_saved(earlier, tmp_path)
    RestoreRNG().on_load_checkpoint(fake_trainer(device="cuda:0"), None, saved)  # no IndexError
    ((device, state),) = one_fake_gpu["set"]
    assert device == 0 and torch.equal(state, earlier["torch.cuda"][0])  # its own device's


def test_on_two_gpus_rank_1_restores_its_own_cuda_state_on_its_own_device(tmp_path, one_fake_gpu):
    one_fake_gpu["count"] = 2
    ranks = [seeded_states(1) | {"torch.cuda": torch.full((8,), 10, dtype=torch.uint8)}]
    ranks.append(seeded_states(2) | {"torch.cuda": torch.full((8,), 11, dtype=torch.uint8)})
    saved = as_saved({"world_size": 2, "ranks": ranks}, tmp_path)
    RestoreRNG().on_load_checkpoint(fake_trainer(1, 2, device="cuda:1"), None, saved)
    ((device, state),) = one_fake_gpu["set"]
    assert device == 1 and torch.equal(state, ranks[1]["torch.cuda"])


def test_an_earlier_format_under_ddp_gives_every_rank_rank_0s_cuda_state(
    tmp_path, one_fake_gpu, caplog
):
    """The earlier format held only rank 0's process's states (its list: cuda:0 advanced, the
    other GPUs as seeded). Every rank takes rank 0's device's entry, so that they agree."""
    one_fake_gpu["count"] = 2
    cuda = [torch.full((8,), 20, dtype=torch.uint8), torch.full((8,), 21, dtype=torch.uint8)]
    saved = as_saved(seeded_states(3) | {"torch.cuda": cuda}, tmp_path)
    with caplog.at_level(logging.WARNING, logger="chest_mnist.callbacks"):
        for rank in (0, 1):
            RestoreRNG().on_load_checkpoint(fake_trainer(rank, 2, f"cuda:{rank}"), None, saved)
    assert [(device, state.tolist()) for device, state in one_fake_gpu["set"]] == [
        (0, cuda[0].tolist()),
        (1, cuda[0].tolist()),
    ]
    (record,) = caplog.records  # rank 0's
    assert "saved by one process (an earlier format) and this run has 2" in record.getMessage()
