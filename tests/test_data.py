import functools
import hashlib
import http.server
import json
import re
import struct
import threading
import zipfile
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException
from medmnist import INFO

from chest_mnist import UserError
from chest_mnist import npz as npz_module
from chest_mnist.batches import (
    DeviceBatches,
    SplitDataset,
    TrainingDataLoader,
    random_shift,
    to_model_input,
)
from chest_mnist.data import MedMNISTDataModule
from chest_mnist.npz import fetch_official, read_npz
from chest_mnist.synthetic import LABELS, PREVALENCE, make_synthetic, write_synthetic
from chest_mnist.synthetic import main as synthetic_main
from tests.conftest import PNEUMONIA_NPZ, compose_train

# --- the data module -------------------------------------------------------------------------


def test_batches_are_uint8_then_rgb_normalised_on_transfer(synthetic_npz):
    dm = MedMNISTDataModule(path=str(synthetic_npz), batch_size=16, eval_batch_size=100)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (16, 28, 28)
    assert labels.dtype == torch.uint8 and labels.shape == (16, 14)
    x, y = dm.on_after_batch_transfer((images, labels), 0)
    assert x.shape == (16, 3, 28, 28) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])  # gray repeated to RGB
    assert torch.allclose(x[:, 0], images.float() / 127.5 - 1.0, atol=1e-6)  # (p/255 - 0.5) / 0.5
    assert torch.equal(y, labels)
    assert len(next(iter(dm.val_dataloader()))[0]) == 100


def test_normalisation_end_points():
    images = torch.tensor([[[0, 255]]], dtype=torch.uint8)
    x = to_model_input(images, mean=0.5, std=0.5)
    assert x[0, :, 0, 0].tolist() == [-1.0] * 3 and x[0, :, 0, 1].tolist() == [1.0] * 3


@pytest.mark.parametrize("on_device", ["auto", False])
def test_a_batch_is_one_indexing_operation(synthetic_npz, on_device):
    """No per-sample __getitem__ on the hot path, whether batches are cut in place or by a DataLoader."""
    dm = MedMNISTDataModule(path=str(synthetic_npz), batch_size=64, on_device=on_device)
    dm.setup("fit")
    calls = []
    dataset = dm.splits["train"]
    original = type(dataset).__getitem__
    type(dataset).__getitem__ = lambda self, i: calls.append(i) or original(self, i)
    try:
        loader = dm.train_dataloader()
        batches = list(loader)
    finally:
        type(dataset).__getitem__ = original
    assert isinstance(loader, DeviceBatches) == (on_device == "auto")
    assert calls == [] and len(batches) == len(loader) == 8
    assert sum(len(b[0]) for b in batches) == 512
    # a shuffled epoch: every image once
    assert torch.equal(torch.cat([b[1] for b in batches]).sum(0), dataset.labels.sum(0))
    assert not torch.equal(batches[0][0], dataset.images[:64])


def test_device_batches_shard_exactly_across_ranks():
    images = torch.arange(103).view(103, 1, 1).to(torch.uint8)
    labels = torch.arange(103)
    world = 4
    evaluation = [
        DeviceBatches(images, labels, 10, shuffle=False, rank=r, world_size=world)
        for r in range(world)
    ]
    seen = torch.cat([b[1] for shard in evaluation for b in shard])
    assert sorted(seen.tolist()) == list(range(103))  # every test image exactly once, none padded
    assert sum(len(shard) for shard in evaluation) == sum(len(list(shard)) for shard in evaluation)
    training = []
    for r in range(world):
        torch.manual_seed(7)  # every rank holds the same seed
        training.append(
            torch.cat(
                [
                    b[1]
                    for b in DeviceBatches(
                        images, labels, 10, shuffle=True, rank=r, world_size=world
                    )
                ]
            )
        )
    assert {len(t) for t in training} == {25}  # equal steps on every rank
    assert len(set(torch.cat(training).tolist())) == 100  # disjoint slices of one permutation


def test_device_batches_resume_an_epoch_where_it_stopped_on_every_rank(caplog):
    """An epoch stopped after 2 of its batches on each of 2 ranks: the state of rank 0 (the one
    a checkpoint holds) resumes each rank with the rest of its own slice of the same
    permutation. With no batch done (an epoch's end) there is no state; a state of other data,
    batches or number of ranks, or the DataLoader's, is not used (the rest is shuffled afresh),
    and a warning says why."""
    images, labels, world = torch.zeros(103, 1, 1, dtype=torch.uint8), torch.arange(103), 2

    def ranks(done: int) -> list[DeviceBatches]:
        return [
            DeviceBatches(images, labels, 10, True, r, world, batches_done=lambda: done)
            for r in range(world)
        ]

    first, whole = ranks(2), []
    for rank in first:  # the epoch each rank would have seen
        torch.manual_seed(7)  # every rank holds the same seed
        whole.append([b[1] for b in rank])
    state = first[0].state_dict()
    assert (state["batches_done"], state["batch_size"], state["world_size"]) == (2, 10, world)
    assert torch.equal(state["order"], first[1].order)  # the one permutation all ranks share
    resumed = ranks(0)
    for rank, seen in zip(resumed, whole, strict=True):
        rank.load_state_dict(state)
        rest = [b[1] for b in rank]
        assert len(rest) == len(seen) - 2
        assert all(torch.equal(a, b) for a, b in zip(rest, seen[2:], strict=True))
    assert resumed[0].order is not None and resumed[0].state_dict() == {}  # none done: no state
    others = {
        "of 104 training images in batches of 10 in 2": {"order": torch.randperm(104)},
        "of 103 training images in batches of 20 in 2": {"batch_size": 20},
        "of 103 training images in batches of 10 in 1": {"world_size": 1},
        "by the DataLoader": "the DataLoader's",
    }
    for why, change in others.items():
        other = ranks(0)[0]
        other.load_state_dict(
            {"batches_done": 2} if change == "the DataLoader's" else state | change
        )
        assert len(list(other)) == len(whole[0])  # a whole epoch, freshly shuffled
        assert f"saved inside an epoch {why}" in caplog.text


def test_the_training_dataloader_says_it_shuffles_an_interrupted_epoch_afresh(caplog):
    """data.on_device=false: a state only inside an epoch, and one given back (its own, or
    DeviceBatches') is said to be of no use, so that either kind of checkpoint resumes."""
    dataset = SplitDataset(torch.zeros(30, 1, 1, dtype=torch.uint8), torch.arange(30))
    done = [0]
    loader = TrainingDataLoader(dataset, batch_size=10, shuffle=True, batches_done=lambda: done[0])
    assert loader.state_dict() == {}
    done[0] = 2
    assert loader.state_dict() == {"batches_done": 2}
    loader.load_state_dict({})
    assert not caplog.text
    loader.load_state_dict({"batches_done": 2, "order": torch.arange(30)})
    assert "saved inside an epoch and data.on_device=false (a DataLoader) keeps no order" in (
        caplog.text
    )


@pytest.mark.parametrize("on_device", ["auto", False])
def test_drop_last_gives_equal_training_batches_and_keeps_evaluation_whole(
    synthetic_npz, on_device
):
    """512 training images in batches of 100: 5 full batches, 500 different images (the 12
    left out change with the shuffle); validation still sees all 256, the last batch partial."""
    dm = MedMNISTDataModule(
        path=str(synthetic_npz),
        batch_size=100,
        eval_batch_size=100,
        drop_last=True,
        on_device=on_device,
    )
    dm.setup("fit")
    epochs = []
    for _ in range(2):
        loader = dm.train_dataloader()
        batches = list(loader)
        assert len(loader) == len(batches) == 5
        assert {len(x) for x, _ in batches} == {100}
        epochs.append(torch.cat([x.reshape(len(x), -1) for x, _ in batches]))
        assert len(torch.unique(epochs[-1], dim=0)) == 500
    assert not torch.equal(epochs[0], epochs[1])
    val = list(dm.val_dataloader())
    assert [len(x) for x, _ in val] == [100, 100, 56]


@pytest.mark.parametrize("on_device", ["auto", False])
def test_a_last_training_batch_of_one_image_is_left_out_and_said(synthetic_npz, on_device, caplog):
    """512 = 7 x 73 + 1: batch norm cannot train on one image where its maps are 1x1 (the
    ImageNet stem at 28 px failed after a whole epoch), so that image sits out, as drop_last
    would have it; evaluation still sees every image, its last batch of one included."""
    dm = MedMNISTDataModule(
        path=str(synthetic_npz), batch_size=73, eval_batch_size=255, on_device=on_device
    )
    dm.setup("fit")
    with caplog.at_level("INFO", logger="chest_mnist.data"):
        batches = list(dm.train_dataloader())
        assert [len(x) for x, _ in dm.train_dataloader()] == [73] * 7  # said once
    assert [len(x) for x, _ in batches] == [73] * 7
    (said,) = [r.getMessage() for r in caplog.records]
    assert "last batch would hold one image (512 = 7 x 73 + 1), on which batch norm" in said
    assert [len(x) for x, _ in dm.val_dataloader()] == [255, 1]
    dm.hparams.batch_size = 74  # 512 = 6 x 74 + 68: nothing left out
    assert [len(x) for x, _ in dm.train_dataloader()] == [74] * 6 + [68]


@pytest.mark.parametrize("on_device", [True, False])
def test_under_ddp_a_last_batch_of_one_image_per_process_is_left_out(synthetic_npz, on_device):
    """Two processes: on the device each trains 512 // 2 = 256 images; through the DataLoader,
    Lightning's DistributedSampler gives each 256 too (513 would be padded to 257 each). In
    batches of 255 the last holds one image: drop_last is set on the loader (Lightning keeps it
    when it puts its sampler in)."""

    def drops_last(batch_size: int, subset: int | None = None) -> bool:
        dm = MedMNISTDataModule(
            path=str(synthetic_npz), batch_size=batch_size, subset=subset, on_device=on_device
        )
        dm.setup("fit")
        dm.trainer = SimpleNamespace(
            strategy=SimpleNamespace(root_device=torch.device("cpu")), global_rank=0, world_size=2
        )
        return dm.train_dataloader().drop_last

    assert drops_last(255)
    assert not drops_last(254)  # 256 = 254 + 2
    # 511 images: 255 each on the device (one sits out), 256 each through the sampler (padded)
    assert drops_last(254, subset=511) is on_device
    assert drops_last(255, subset=511) is not on_device


@pytest.mark.parametrize("key", ["augment", "drop_last", "mmap"])
def test_a_switch_that_is_not_true_or_false_is_refused_by_the_data_module(key):
    """Where no schema applies: Python callers, and evaluate's data=from_checkpoint."""
    with pytest.raises(UserError, match=f"data.{key}='yes' must be true or false"):
        MedMNISTDataModule(**{key: "yes"})


@pytest.mark.parametrize("key", ["augment", "drop_last", "mmap", "verify_md5", "download"])
def test_a_switch_that_is_not_true_or_false_is_refused(key):
    """The data schema (chest_mnist/schema.py) types the switches: Hydra refuses the value when
    it composes the config, naming the key."""
    with pytest.raises(ConfigCompositionException) as error:
        compose_train([f"data.{key}=maybe"])
    assert f"full_key: data.{key}" in str(error.value.__cause__)
    assert "is not a valid bool" in str(error.value.__cause__)


@pytest.mark.parametrize(
    ("override", "kind"),
    [("data.batch_size=abc", "Integer"), ("data.size=1.5", "Integer"), ("data.mean=x", "Float")],
)
def test_a_number_of_the_wrong_type_is_refused_by_the_schema(override, kind):
    with pytest.raises(ConfigCompositionException) as error:
        compose_train(["data=synthetic", override])
    key = override.split("=")[0]
    assert f"could not be converted to {kind}" in str(error.value.__cause__)
    assert f"full_key: {key}" in str(error.value.__cause__)


def test_drop_last_per_rank_under_ddp():
    """103 images on 4 ranks: 25 each; in batches of 10 that is 2 full batches per rank."""
    images, labels = torch.zeros(103, 1, 1, dtype=torch.uint8), torch.arange(103)
    for r in range(4):
        batches = DeviceBatches(images, labels, 10, True, rank=r, world_size=4, drop_last=True)
        assert len(batches) == 2 and [len(b[1]) for b in batches] == [10, 10]


def test_drop_last_with_a_batch_larger_than_the_split_says_what_to_do(synthetic_npz):
    dm = MedMNISTDataModule(path=str(synthetic_npz), batch_size=1024, drop_last=True)
    dm.setup("fit")
    with pytest.raises(UserError) as error:
        dm.train_dataloader()
    for part in ("data.drop_last=true", "data.batch_size=1024", str(synthetic_npz), "512 training"):
        assert part in str(error.value)
    dm.hparams.drop_last = False
    assert [len(b[0]) for b in dm.train_dataloader()] == [512]


def test_subset_keeps_first_n_of_each_split(synthetic_npz):
    dm = MedMNISTDataModule(path=str(synthetic_npz), subset=100)
    dm.setup()
    full = read_npz(synthetic_npz, "chestmnist", 28)
    for split in ("train", "val", "test"):
        assert len(dm.splits[split]) == 100
        assert torch.equal(dm.splits[split].images, torch.from_numpy(full[split][0][:100]))


def test_prevalence_and_labels_from_medmnist_info(synthetic_npz):
    dm = MedMNISTDataModule(path=str(synthetic_npz))
    assert dm.labels == [INFO["chestmnist"]["label"][str(i)] for i in range(14)]
    dm.setup()
    expected = (
        torch.from_numpy(read_npz(synthetic_npz, "chestmnist", 28)["train"][1]).float().mean(0)
    )
    assert torch.allclose(dm.prevalence("train"), expected)


@pytest.mark.slow
def test_official_split_sizes_from_info(tmp_path):
    path = write_synthetic(
        tmp_path / "chestmnist.npz",
        **{f"n_{s}": n for s, n in INFO["chestmnist"]["n_samples"].items()},
    )
    dm = MedMNISTDataModule(root=str(tmp_path), verify_md5=False, download=False)
    dm.setup()
    assert dm.file == path
    assert {s: len(d) for s, d in dm.splits.items()} == {
        "train": 78468,
        "val": 11219,
        "test": 22433,
    }
    assert sum(INFO["chestmnist"]["n_samples"].values()) == 112120


def test_real_pneumoniamnist_file_reads(tmp_path):
    dm = MedMNISTDataModule(flag="pneumoniamnist", path=str(PNEUMONIA_NPZ))
    dm.setup()
    assert dm.labels == ["pneumonia"]  # binary: one sigmoid output, the positive class
    assert {s: len(d) for s, d in dm.splits.items()} == {"train": 4707, "val": 524, "test": 624}
    assert (
        dm.splits["test"].labels.sum().item() == 390
    )  # pneumonia cases in the official test split


def test_random_shift_translates_with_a_replicated_border():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 28, 28, generator=g)
    shifted = random_shift(x, 2, generator=g)
    assert shifted.shape == x.shape and shifted.dtype == x.dtype
    assert shifted.min() >= x.min() and shifted.max() <= x.max()  # replicated border: no new values
    assert not torch.equal(shifted, x)
    # each image is a translate of itself: its centre crop is found in the original
    for i in range(8):
        centre = shifted[i, :, 2:-2, 2:-2]
        assert any(
            torch.equal(centre, x[i, :, 2 - dy : 26 - dy, 2 - dx : 26 - dx])
            for dy in range(-2, 3)
            for dx in range(-2, 3)
        )
    assert torch.equal(random_shift(x, 0), x)


# --- the synthetic generator -----------------------------------------------------------------


def test_synthetic_has_chestmnist_format_and_prevalence(tmp_path):
    arrays = make_synthetic(n_train=20000, n_val=10, n_test=10, seed=3)
    assert sorted(arrays) == sorted(
        f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels")
    )
    assert arrays["train_images"].dtype == np.uint8 and arrays["train_images"].shape == (
        20000,
        28,
        28,
    )
    assert arrays["train_labels"].dtype == np.uint8 and arrays["train_labels"].shape == (20000, 14)
    prevalence = arrays["train_labels"].mean(0)
    assert np.abs(prevalence - PREVALENCE).max() < 0.01  # NIH rates, within sampling noise
    assert (arrays["train_labels"].sum(1) >= 2).mean() > 0.03  # several findings per image happen
    assert 1 - arrays["train_labels"].mean() == pytest.approx(
        0.948, abs=0.003
    )  # the all-negative ACC
    assert (
        arrays["val_labels"].sum(0) >= 2
    ).all()  # every label has positives, even in a tiny split
    again = make_synthetic(n_train=20000, n_val=10, n_test=10, seed=3)
    assert all(np.array_equal(arrays[k], again[k]) for k in arrays)


def test_a_synthetic_file_made_with_other_settings_is_refused_not_reused(tmp_path):
    """data=synthetic writes its file once and reuses it: asked for other settings, it says the
    file was made with others (it used them silently) rather than train on data it was not
    asked for. The same settings reuse it; a file the command line made (no settings kept) is
    used as it is."""
    path = tmp_path / "synthetic.npz"
    small = {"n_train": 40, "n_val": 20, "n_test": 20, "seed": 3}
    MedMNISTDataModule(path=str(path), synthetic=small).prepare_data()
    assert len(read_npz(path, "chestmnist", 28)["train"][0]) == 40
    made = path.stat().st_mtime_ns
    MedMNISTDataModule(path=str(path), synthetic=dict(small)).prepare_data()  # the same: reused
    other = MedMNISTDataModule(path=str(path), synthetic=small | {"n_train": 80, "seed": 4})
    with pytest.raises(UserError) as refused:
        other.prepare_data()
    assert str(refused.value) == (
        f"{path} was made by data.synthetic with n_train=40, seed=3, not n_train=80, seed=4: a "
        f"file there is used, not made again. Ask for what it holds (data.synthetic.n_train=40 "
        f"data.synthetic.seed=3), give another data.path, or delete it to make it anew."
    )
    assert path.stat().st_mtime_ns == made
    by_hand = tmp_path / "by_hand.npz"
    synthetic_main([str(by_hand), "--train", "30"])
    MedMNISTDataModule(path=str(by_hand), synthetic=small).prepare_data()  # no settings kept
    (tmp_path / "text.npz").write_text("no archive")  # read as reading says, not a traceback
    with pytest.raises(UserError, match="is not a readable .npz archive"):
        MedMNISTDataModule(path=str(tmp_path / "text.npz"), synthetic=small).prepare_data()


def test_the_default_synthetic_file_is_named_after_its_settings(tmp_path):
    """Other settings, another file: a sweep over data.synthetic.seed makes one file per seed
    (each job was refused by the first job's file)."""
    paths = {
        seed: compose_train(["data=synthetic", f"data.synthetic.seed={seed}"]).data.path
        for seed in (0, 1)
    }
    assert paths[0].endswith("data/synthetic_chestmnist_28_4000-1000-1000_seed0.npz")
    assert paths[1].endswith("data/synthetic_chestmnist_28_4000-1000-1000_seed1.npz")
    noisy = compose_train(["data=synthetic", "data.size=64", "+data.synthetic.noise=10.0"])
    assert noisy.data.path.endswith("synthetic_chestmnist_64_4000-1000-1000_seed0_noise10.0.npz")


@pytest.mark.parametrize(
    "given, said",
    [
        ({"n_train": -1}, "data.synthetic.n_train=-1 must be a whole number of 1 or more."),
        ({"n_val": 0}, "data.synthetic.n_val=0 must be a whole number of 1 or more."),
        ({"n_test": "abc"}, "data.synthetic.n_test='abc' must be a whole number of 1 or more."),
        ({"seed": -1}, "data.synthetic.seed=-1 must be a whole number of 0 or more."),
        ({"seed": True}, "data.synthetic.seed=True must be a whole number of 0 or more."),
        ({"noise": "x"}, "data.synthetic.noise='x' must be a number of 0 or more."),
        ({"noise": float("nan")}, "data.synthetic.noise=nan must be a number of 0 or more."),
        ({"bogus": 1}, "data.synthetic.bogus is not a key of data.synthetic: its keys are "),
        (3, "data.synthetic=3 must be a mapping of n_train, n_val, n_test, seed"),
    ],
)
def test_synthetic_settings_that_cannot_be_made_are_refused_by_key(tmp_path, given, said):
    """Refused when the data module is built, before any data (they were tracebacks from
    numpy when the file was written)."""
    with pytest.raises(UserError, match=re.escape(said)):
        MedMNISTDataModule(path=str(tmp_path / "s.npz"), synthetic=given)
    assert not list(tmp_path.iterdir())


def test_synthetic_data_for_another_flag_is_refused_before_any_is_written(tmp_path):
    """data=synthetic makes ChestMNIST's format only: for another flag a missing file is
    refused (it wrote ChestMNIST data, then blamed the file); a file already there is read."""
    other = MedMNISTDataModule(flag="bloodmnist", path=str(tmp_path / "s.npz"), synthetic={})
    with pytest.raises(UserError, match="makes ChestMNIST-format data only, not bloodmnist's"):
        other.prepare_data()
    assert not list(tmp_path.iterdir())
    pneumonia = MedMNISTDataModule(flag="pneumoniamnist", path=str(PNEUMONIA_NPZ), synthetic={})
    pneumonia.prepare_data()
    pneumonia.setup("fit")


def test_the_synthetic_command_says_what_it_cannot_write(tmp_path, capsys, monkeypatch):
    """Counts under 1, a folder, a folder that cannot be made: an `error:` line, exit code 2,
    no half-written file (they were tracebacks, or a file training refused)."""
    for argv, said in (
        ([str(tmp_path / "a.npz"), "--train", "-3"], "--train -3: a split needs 1 image or more"),
        ([str(tmp_path / "a.npz"), "--seed", "-1"], "--seed -1: a seed is 0 or more"),
        ([str(tmp_path), "--train", "3"], f"error: {tmp_path} is a folder: give the npz file"),
        (["/proc/none/a.npz", "--train", "3"], "error: Could not write /proc/none/a.npz: "),
    ):
        with pytest.raises(SystemExit) as exited:
            synthetic_main(argv)
        assert exited.value.code == 2 and said in capsys.readouterr().err, argv
    assert not list(tmp_path.iterdir())
    # a folder that cannot be written (root writes anywhere: as os.access would say for a user),
    # said before the arrays are made, which at 224px takes minutes
    import chest_mnist.synthetic as synthetic

    monkeypatch.setattr(synthetic.os, "access", lambda path, mode: False)
    monkeypatch.setattr(synthetic, "make_synthetic", lambda **k: pytest.fail("made the arrays"))
    with pytest.raises(SystemExit):
        synthetic_main([str(tmp_path / "a.npz")])
    assert f"error: Could not write {tmp_path / 'a.npz'}: {tmp_path} cannot be written." in (
        capsys.readouterr().err
    )


def test_synthetic_labels_live_in_the_pixels():
    """Each finding brightens its own place: the mean image of positives differs there."""
    arrays = make_synthetic(n_train=4000, n_val=10, n_test=10, seed=1)
    images, labels = arrays["train_images"].astype(float), arrays["train_labels"]
    for k in range(len(LABELS)):
        difference = images[labels[:, k] == 1].mean(0) - images[labels[:, k] == 0].mean(0)
        assert difference.max() > 15, LABELS[k]


@pytest.mark.parametrize("size", [64, 224])
def test_synthetic_larger_sizes(tmp_path, size):
    path = write_synthetic(tmp_path / f"s{size}.npz", n_train=8, n_val=4, n_test=4, size=size)
    splits = read_npz(path, "chestmnist", size)
    assert splits["train"][0].shape == (8, size, size)


# --- bad input: each gets a message that names the file or key -------------------------------


def _write(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _good_arrays(n=4, size=28, labels=14):
    return {
        f"{s}_{k}": (
            np.zeros((n, size, size), np.uint8)
            if k == "images"
            else np.zeros((n, labels), np.uint8)
        )
        for s in ("train", "val", "test")
        for k in ("images", "labels")
    }


def test_not_a_zip(tmp_path):
    path = tmp_path / "chestmnist.npz"
    path.write_text("this is not a zip file")
    with pytest.raises(UserError, match=f"{path}.*not a readable .npz") as error:
        read_npz(path, "chestmnist", 28)
    assert "it is no zip archive, which an .npz is" in str(error.value)
    assert "allow_pickle" not in str(error.value)  # numpy's advice: unsafe, and beside the point
    assert path.read_text() == "this is not a zip file"  # the user's file is left alone


def test_mmap_of_a_file_that_is_no_archive_says_what_reading_says(tmp_path):
    """data.mmap=true on a single saved array (np.save) or text: the message of reading it
    (it said "damaged (BadZipFile)"), and no empty <name>_npy/ folder left."""
    single = tmp_path / "single.npz"
    with open(single, "wb") as f:
        np.save(f, np.zeros((2, 28, 28), np.uint8))
    text = tmp_path / "text.npz"
    text.write_text("this is not a zip file")
    for path, said in ((single, "holds a single array"), (text, "it is no zip archive")):
        with pytest.raises(UserError, match=said):
            npz_module.extract_npy(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["single.npz", "text.npz"]


def test_truncated_zip(tmp_path):
    good = write_synthetic(tmp_path / "good.npz", n_train=8, n_val=4, n_test=4)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(UserError, match="bad.npz"):
        read_npz(bad, "chestmnist", 28)


def test_missing_key(tmp_path):
    arrays = _good_arrays()
    del arrays["val_labels"]
    with pytest.raises(UserError, match="has no key 'val_labels'"):
        read_npz(_write(tmp_path / "x.npz", **arrays), "chestmnist", 28)


def test_wrong_image_shape(tmp_path):
    arrays = _good_arrays()
    arrays["train_images"] = np.zeros((4, 32, 32), np.uint8)
    with pytest.raises(
        UserError, match=r"train_images is uint8 \(4, 32, 32\), expected uint8 \(N, 28, 28\)"
    ):
        read_npz(_write(tmp_path / "x.npz", **arrays), "chestmnist", 28)


def test_wrong_number_of_label_columns(tmp_path):
    arrays = _good_arrays()
    arrays["test_labels"] = np.zeros((4, 13), np.uint8)
    with pytest.raises(
        UserError, match=r"test_labels has shape \(4, 13\), expected \(4, 14\).*14 labels"
    ):
        read_npz(_write(tmp_path / "x.npz", **arrays), "chestmnist", 28)


def test_labels_not_zero_one(tmp_path):
    arrays = _good_arrays()
    arrays["train_labels"][0, 3] = 2
    with pytest.raises(UserError, match=r"train_labels holds values outside 0..1"):
        read_npz(_write(tmp_path / "x.npz", **arrays), "chestmnist", 28)


@pytest.mark.parametrize("bad", [0.5, float("nan"), float("inf")])
def test_labels_that_are_not_whole_numbers_are_refused(tmp_path, bad):
    """A uint8 cast would make 0.5 a 0: every label negative, and a run that trains on
    nothing with exit code 0."""
    arrays = _good_arrays()
    arrays["train_labels"] = arrays["train_labels"].astype(np.float32)
    arrays["train_labels"][2, 5] = bad
    path = _write(tmp_path / "x.npz", **arrays)
    with pytest.raises(UserError) as error:
        read_npz(path, "chestmnist", 28)
    message = str(error.value)
    assert f"{path}: train_labels holds 1 values that are not whole numbers" in message
    assert f"the first {bad} (image 2, column 5)" in message


def test_labels_stored_as_whole_floats_are_read(tmp_path):
    arrays = _good_arrays()
    arrays["val_labels"] = arrays["val_labels"].astype(np.float64)
    splits = read_npz(_write(tmp_path / "x.npz", **arrays), "chestmnist", 28)
    np.testing.assert_array_equal(splits["val"][1], arrays["val_labels"].astype(np.uint8))


@pytest.mark.parametrize(
    ("flag", "said"),
    [
        ("nosuchmnist", "is not a MedMNIST dataset; choose one of pathmnist, chestmnist"),
        ("organmnist3d", "is a 3D MedMNIST dataset, which this pipeline of 2D images does not"),
    ],
)
def test_a_flag_this_pipeline_cannot_read_is_refused_with_those_it_can(flag, said):
    with pytest.raises(UserError, match=f"data.flag='{flag}' {said}") as error:
        MedMNISTDataModule(flag=flag)
    assert "3d" not in str(error.value).split("choose one of")[1]


@pytest.mark.parametrize("size", [0, 32, 100, 256])
def test_size_not_a_medmnist_size(size):
    with pytest.raises(
        UserError, match=f"data.size={size} is not a MedMNIST size; choose one of 28, 64, 128, 224"
    ):
        MedMNISTDataModule(size=size)


def test_root_that_does_not_exist(tmp_path):
    dm = MedMNISTDataModule(root=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match=f"data.root={tmp_path / 'nowhere'} does not exist"):
        dm.prepare_data()


def test_root_that_cannot_be_written(tmp_path, monkeypatch):
    monkeypatch.setattr(
        npz_module.os, "access", lambda path, mode: False
    )  # tests run as root: fake it
    with pytest.raises(UserError, match=f"data.root={tmp_path} cannot be written"):
        MedMNISTDataModule(root=str(tmp_path)).prepare_data()


def test_without_medmnists_folder_data_root_is_asked_for(monkeypatch):
    """medmnist sets its folder to None when it cannot create ~/.medmnist (a HOME that cannot
    be written): the run asks for data.root (it was a TypeError from pathlib)."""
    from chest_mnist import data as data_module

    monkeypatch.setattr(data_module, "DEFAULT_ROOT", None)
    with pytest.raises(UserError, match=r"could not create ~/.medmnist .*Set data.root to a"):
        MedMNISTDataModule().prepare_data()


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match=f"data.path={tmp_path / 'x.npz'} does not exist"):
        MedMNISTDataModule(path=str(tmp_path / "x.npz")).prepare_data()


# --- the download, up to the network boundary -------------------------------------------------


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def file_server(tmp_path):
    """An HTTP server on loopback serving tmp_path/server: the download's real code path."""
    served = tmp_path / "server"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield served, f"http://127.0.0.1:{server.server_address[1]}"
        server.shutdown()


def test_no_network_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setitem(
        INFO["chestmnist"], "url", "http://127.0.0.1:9/chestmnist.npz"
    )  # nothing listens
    with pytest.raises(UserError) as error:
        fetch_official("chestmnist", 28, tmp_path)
    message = str(error.value)
    assert "Could not download chestmnist.npz" in message
    assert "http://127.0.0.1:9/chestmnist.npz" in message and INFO["chestmnist"]["MD5"] in message
    assert str(tmp_path / "chestmnist.npz") in message and "data=synthetic" in message
    assert list(tmp_path.iterdir()) == []  # no partial file left behind


def test_download_with_wrong_md5_is_deleted(tmp_path, monkeypatch, file_server):
    served, url = file_server
    source = write_synthetic(served / "file.npz", n_train=8, n_val=4, n_test=4)
    root = tmp_path / "root"
    root.mkdir()
    monkeypatch.setitem(INFO["chestmnist"], "url", f"{url}/file.npz")
    with pytest.raises(
        UserError, match=f"has MD5 {_md5(source)}, not the official {INFO['chestmnist']['MD5']}"
    ):
        fetch_official("chestmnist", 28, root)
    assert list(root.iterdir()) == []


def test_download_with_right_md5_lands_in_root(tmp_path, monkeypatch, file_server):
    served, url = file_server
    source = write_synthetic(served / "file_64.npz", n_train=8, n_val=4, n_test=4, size=64)
    root = tmp_path / "root"
    root.mkdir()
    monkeypatch.setitem(INFO["chestmnist"], "url_64", f"{url}/file_64.npz")
    monkeypatch.setitem(INFO["chestmnist"], "MD5_64", _md5(source))
    path = fetch_official("chestmnist", 64, root)
    assert path == root / "chestmnist_64.npz" and _md5(path) == _md5(source)
    assert [p.name for p in root.iterdir()] == ["chestmnist_64.npz"]
    assert (
        fetch_official("chestmnist", 64, root, download=False) == path
    )  # found, not fetched again


def test_a_part_file_left_by_a_killed_download_is_replaced(tmp_path, monkeypatch, file_server):
    served, url = file_server
    source = write_synthetic(served / "file.npz", n_train=8, n_val=4, n_test=4)
    root = tmp_path / "root"
    root.mkdir()
    (root / "chestmnist.npz.part").write_bytes(source.read_bytes()[:100])  # the first 100 bytes
    monkeypatch.setitem(INFO["chestmnist"], "url", f"{url}/file.npz")
    monkeypatch.setitem(INFO["chestmnist"], "MD5", _md5(source))
    path = fetch_official("chestmnist", 28, root)
    assert _md5(path) == _md5(source)
    assert [p.name for p in root.iterdir()] == ["chestmnist.npz"]


def test_ctrl_c_during_a_download_leaves_no_part_file(tmp_path, monkeypatch):
    import torchvision.datasets.utils

    def interrupted(url, root, filename, md5=None):
        Path(root, filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torchvision.datasets.utils, "download_url", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fetch_official("chestmnist", 28, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_existing_file_with_wrong_md5_is_kept_and_named(tmp_path):
    path = write_synthetic(tmp_path / "chestmnist.npz", n_train=8, n_val=4, n_test=4)
    before = path.read_bytes()
    with pytest.raises(UserError, match=f"{path} has MD5 .* not the official .* left as it is"):
        fetch_official("chestmnist", 28, tmp_path)
    assert path.read_bytes() == before
    assert fetch_official("chestmnist", 28, tmp_path, verify=False) == path


def test_missing_file_without_download(tmp_path):
    with pytest.raises(
        UserError, match=f"{tmp_path / 'chestmnist_128.npz'} does not exist and data.download=false"
    ):
        fetch_official("chestmnist", 128, tmp_path, download=False)


def test_download_of_a_missing_url(tmp_path, monkeypatch, file_server):
    _, url = file_server
    monkeypatch.setitem(INFO["chestmnist"], "url", f"{url}/gone.npz")  # the server answers 404
    with pytest.raises(UserError, match="Could not download chestmnist.npz .*HTTP Error 404"):
        fetch_official("chestmnist", 28, tmp_path)
    assert list(tmp_path.iterdir()) == [tmp_path / "server"]


def test_a_download_that_gets_no_answer_times_out_with_the_message(tmp_path, monkeypatch):
    """A network that takes the connection and never answers (a captive proxy): the download
    gives up after DOWNLOAD_TIMEOUT_S with the usual message, and leaves no part file (it hung
    for ever: torchvision's urlopen has no timeout)."""
    import socket
    import time

    silent = socket.create_server(("127.0.0.1", 0))  # accepts (the backlog), never answers
    monkeypatch.setattr(npz_module, "DOWNLOAD_TIMEOUT_S", 0.5)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/chestmnist.npz"
    monkeypatch.setitem(INFO["chestmnist"], "url", url)
    started = time.monotonic()
    with silent, pytest.raises(UserError, match=r"Could not download chestmnist.npz \(.*timed out"):
        fetch_official("chestmnist", 28, tmp_path)
    assert time.monotonic() - started < 10 and list(tmp_path.iterdir()) == []
    assert socket.getdefaulttimeout() is None  # put back


def test_augmentation_is_applied_in_training_and_off_at_eval(synthetic_npz):
    from types import SimpleNamespace

    dm = MedMNISTDataModule(path=str(synthetic_npz), augment=True, max_shift=2)
    images, labels = (
        torch.from_numpy(read_npz(synthetic_npz, "chestmnist", 28)["train"][0][:64]),
        torch.zeros(64, 14),
    )
    plain = to_model_input(images, 0.5, 0.5)
    dm.trainer = SimpleNamespace(training=False)
    x, y = dm.on_after_batch_transfer((images, labels), 0)
    assert torch.equal(x, plain) and y is labels
    dm.trainer = SimpleNamespace(training=True)
    torch.manual_seed(0)
    x, y = dm.on_after_batch_transfer((images, labels), 0)
    assert x.shape == plain.shape and y is labels and not torch.equal(x, plain)


def test_mmap_reads_the_same_arrays_without_loading_them(tmp_path):
    """data.mmap=true on the real (compressed) PneumoniaMNIST file: the same images and labels,
    memory-mapped from .npy copies made once and reused while the npz is unchanged."""
    npz = tmp_path / "pneumoniamnist.npz"
    npz.write_bytes(PNEUMONIA_NPZ.read_bytes())
    mapped = read_npz(npz, "pneumoniamnist", 28, mmap=True)
    loaded = read_npz(npz, "pneumoniamnist", 28)
    for split in ("train", "val", "test"):
        assert isinstance(mapped[split][0], np.memmap)
        np.testing.assert_array_equal(mapped[split][0], loaded[split][0])
        np.testing.assert_array_equal(mapped[split][1], loaded[split][1])
    folder = tmp_path / "pneumoniamnist_npy"
    images = folder / "train_images.npy"
    assert images.stat().st_size == 4707 * 28 * 28 + 128  # plain, uncompressed .npy
    written = images.stat().st_mtime_ns
    read_npz(npz, "pneumoniamnist", 28, mmap=True)
    assert images.stat().st_mtime_ns == written  # reused, not extracted again

    dm = MedMNISTDataModule(flag="pneumoniamnist", path=str(npz), mmap=True, subset=100)
    dm.setup()
    assert len(dm.splits["train"]) == 100 and dm.splits["train"].images.dtype == torch.uint8
    np.testing.assert_array_equal(dm.splits["test"].images.numpy(), loaded["test"][0][:100])
    assert npz.read_bytes() == PNEUMONIA_NPZ.read_bytes()  # the user's file is untouched

    # a changed npz is extracted again
    arrays = {key: value.copy() for key, value in np.load(npz).items()}
    arrays["train_images"][0] = 255 - arrays["train_images"][0]
    np.savez_compressed(npz, **arrays)
    again = read_npz(npz, "pneumoniamnist", 28, mmap=True)
    np.testing.assert_array_equal(again["train"][0][0], arrays["train_images"][0])


def test_mmap_without_room_for_the_copies_says_what_to_do(tmp_path, monkeypatch):
    npz = tmp_path / "chest.npz"
    write_synthetic(npz, n_train=64, n_val=32, n_test=32, seed=0)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(npz_module.shutil, "copyfileobj", full_disk)
    with pytest.raises(UserError, match="free some, or set data.mmap=false") as error:
        read_npz(npz, "chestmnist", 28, mmap=True)
    assert "No space left on device" in str(error.value)
    assert not list((tmp_path / "chest_npy").glob("*.part"))  # no half-written file left
    assert npz.exists()


def _damaged_deflate(tmp_path: Path) -> Path:
    """A compressed npz whose train_images stream starts with an invalid deflate block: reading
    it raises zlib.error, neither BadZipFile nor OSError."""
    good = write_synthetic(tmp_path / "good.npz", n_train=64, n_val=8, n_test=8)
    data = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as archive:
        header = archive.getinfo("train_images.npy").header_offset
    name_length, extra_length = struct.unpack("<HH", data[header + 26 : header + 30])
    start = header + 30 + name_length + extra_length  # the member's compressed data
    data[start : start + 8] = b"\xff" * 8  # block type 3: reserved, invalid
    bad = tmp_path / "damaged.npz"
    bad.write_bytes(bytes(data))
    with pytest.raises(zlib.error):
        np.load(bad)["train_images"]
    return bad


@pytest.mark.parametrize("mmap", [False, True])
def test_a_damaged_compressed_npz_is_named_and_kept(tmp_path, mmap):
    bad = _damaged_deflate(tmp_path)
    before = bad.read_bytes()
    with pytest.raises(UserError, match=r"damaged\.npz.*damaged") as error:
        read_npz(bad, "chestmnist", 28, mmap=mmap)
    assert "invalid block type" in str(error.value)  # zlib's own words
    assert bad.read_bytes() == before  # the user's file is left as it is
    if mmap:
        assert not list((tmp_path / "damaged_npy").glob("*.part"))


def test_an_unreadable_extraction_stamp_means_extract_again(tmp_path):
    """source.json cut short (a full disk while it was written): the arrays are extracted
    again rather than the run stopping on a JSON error."""
    npz = write_synthetic(tmp_path / "chest.npz", n_train=16, n_val=8, n_test=8, seed=0)
    read_npz(npz, "chestmnist", 28, mmap=True)
    stamp = tmp_path / "chest_npy" / "source.json"
    stamp.write_text('{"file": "ch')
    mapped = read_npz(npz, "chestmnist", 28, mmap=True)
    np.testing.assert_array_equal(mapped["val"][0], read_npz(npz, "chestmnist", 28)["val"][0])
    assert json.loads(stamp.read_text())["file"] == "chest.npz"


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_an_empty_split_is_refused_by_name(tmp_path, split):
    arrays = _good_arrays()
    arrays[f"{split}_images"] = arrays[f"{split}_images"][:0]
    arrays[f"{split}_labels"] = arrays[f"{split}_labels"][:0]
    with pytest.raises(UserError, match=rf"x\.npz: {split}_images holds no images"):
        read_npz(_write(tmp_path / "x.npz", **arrays), "chestmnist", 28)


def test_md5_is_a_file_check_that_fips_builds_allow(tmp_path, monkeypatch):
    """A FIPS build of Python refuses hashlib.md5() unless usedforsecurity=False is given."""
    real_md5 = hashlib.md5

    def fips_md5(*args, usedforsecurity=True, **kwargs):
        if usedforsecurity:
            raise ValueError("[digital envelope routines] unsupported")
        return real_md5(*args, usedforsecurity=False, **kwargs)

    monkeypatch.setattr(hashlib, "md5", fips_md5)
    path = tmp_path / "file.npz"
    path.write_bytes(b"MedMNIST")
    assert npz_module.md5sum(path) == real_md5(b"MedMNIST").hexdigest()
