"""The LightningDataModule of a MedMNIST 2D dataset (ChestMNIST by default).

`MedMNISTDataModule` gets its npz file (`chest_mnist.npz`: the official one, fetched and
MD5-checked; any file given as `data.path`; or a synthetic one it writes), keeps each split
whole as uint8, on the GPU when it fits, and serves batches cut by indexing
(`chest_mnist.batches`); `on_after_batch_transfer` makes them model-ready on the device.
`task` is medmnist INFO's task name and `kind` its `Task` (task.py): which outputs the model
has and how prevalence is counted.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import lightning as L
import torch
from medmnist import INFO
from medmnist.info import DEFAULT_ROOT
from torch.utils.data import DataLoader
from typing_extensions import override

from chest_mnist import UserError
from chest_mnist.batches import (
    DeviceBatches,
    ShardSampler,
    SplitDataset,
    TrainingDataLoader,
    keep_batch,
    random_shift,
    to_model_input,
)
from chest_mnist.npz import SIZES, extract_npy, fetch_official, official_filename, read_npz
from chest_mnist.synthetic import check_made_with, write_synthetic
from chest_mnist.synthetic import settings as make_settings
from chest_mnist.task import Task

log = logging.getLogger(__name__)

FLAGS = [flag for flag in INFO if not flag.endswith("3d")]  # MedMNIST's 2D datasets


class MedMNISTDataModule(L.LightningDataModule):
    """The official train/val/test splits of a MedMNIST 2D dataset (ChestMNIST by default).

    Args:
        flag: a key of `medmnist.INFO`.
        size: image side, one of 28, 64, 128, 224 (MedMNIST+ sizes).
        root: folder of the official files; None means medmnist's own (`~/.medmnist`).
        path: an npz in MedMNIST format to use instead of the official file (no download, no MD5).
        synthetic: if set, `path` is generated with these `make_synthetic` arguments when missing.
        download: fetch the official file when it is not in `root`.
        verify_md5: check an existing official file against the MD5 in `medmnist.INFO`.
        batch_size: training batch; eval_batch_size: validation and test batch.
        subset: keep the first N images of each split (quick runs); None keeps all.
        augment: random shifts of up to `max_shift` pixels on the device, training only.
        drop_last: leave out each training epoch's last, partial batch (a different few images
            each epoch), so that every training step has the same shape: one compiled graph
            and one CUDA graph instead of two under `model.compile`.
        mean, std: normalisation of [0, 1] pixels (MedMNIST's examples use 0.5 and 0.5).
        on_device: keep each split whole on the training device and cut batches there
            ("auto": when it takes under a quarter of the free GPU memory; always on the CPU);
            false streams batches from host memory through a DataLoader.
        mmap: memory-map the images instead of reading them into memory (for the large
            sizes: 224px ChestMNIST is 5.6 GB as uint8). The npz is extracted once into plain
            .npy files beside it (`extract_npy`), which costs that much disk.
    """

    def __init__(
        self,
        flag: str = "chestmnist",
        size: int = 28,
        root: str | None = None,
        path: str | None = None,
        synthetic: dict | None = None,
        download: bool = True,
        verify_md5: bool = True,
        batch_size: int = 128,
        eval_batch_size: int = 1024,
        subset: int | None = None,
        augment: bool = False,
        max_shift: int = 2,
        drop_last: bool = False,
        mean: float = 0.5,
        std: float = 0.5,
        num_workers: int = 0,
        on_device: bool | str = "auto",
        mmap: bool = False,
    ):
        super().__init__()
        if flag not in FLAGS:
            what = (
                "a 3D MedMNIST dataset, which this pipeline of 2D images does not read"
                if flag in INFO
                else "not a MedMNIST dataset"
            )
            raise UserError(f"data.flag={flag!r} is {what}; choose one of {', '.join(FLAGS)}.")
        if size not in SIZES:
            raise UserError(
                f"data.size={size} is not a MedMNIST size; choose one of {', '.join(map(str, SIZES))}."
            )
        for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if not isinstance(value, int) or value < 1:
                raise UserError(f"data.{key}={value!r} must be a positive whole number.")
        if subset is not None and (not isinstance(subset, int) or subset < 1):
            raise UserError(
                f"data.subset={subset!r} must be a positive whole number or null (all images)."
            )
        for key, value in (("augment", augment), ("drop_last", drop_last), ("mmap", mmap)):
            if not isinstance(value, bool):  # evaluate's data=from_checkpoint has no schema
                raise UserError(f"data.{key}={value!r} must be true or false.")
        if on_device not in (True, False, "auto"):
            raise UserError(f"data.on_device={on_device!r} must be true, false or auto.")
        # what a missing data.path is made from (synthetic.py), checked before any data
        self.synthetic = None if synthetic is None else make_settings(size, synthetic)
        self.save_hyperparameters()
        self.info = INFO[flag]
        self.medmnist_task = self.info["task"]
        self.task = Task.from_medmnist(self.medmnist_task)
        names = [self.info["label"][str(i)] for i in range(len(self.info["label"]))]
        self.labels = self.task.outputs(names)  # binary: one sigmoid output, the positive class
        self.splits: dict[str, SplitDataset] = {}
        self._on_device: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._said_one_image_left = False

    @property
    def file(self) -> Path:
        """The npz this module reads."""
        if self.hparams.path is not None:
            return Path(self.hparams.path).expanduser()
        root = DEFAULT_ROOT if self.hparams.root is None else self.hparams.root
        if root is None:  # medmnist could not make its folder, ~/.medmnist (it warned why)
            raise UserError(
                "medmnist has no folder for its files: it could not create ~/.medmnist "
                f"(HOME={os.environ.get('HOME')}). Set data.root to a writable folder."
            )
        return Path(root).expanduser() / official_filename(self.hparams.flag, self.hparams.size)

    @override
    def prepare_data(self) -> None:
        """Make sure the file is there (generate it, synthetic, or download it, official), and
        with data.mmap its .npy copies. Lightning runs this on one process per machine."""
        self._ensure_file()
        if self.hparams.mmap:
            extract_npy(self.file)

    def _ensure_file(self) -> None:
        hp = self.hparams
        if hp.path is not None:
            if self.file.exists():
                if self.synthetic is not None:
                    check_made_with(self.file, self.synthetic)
                return
            if self.synthetic is None:
                raise UserError(
                    f"data.path={self.file} does not exist. Point data.path at a MedMNIST-format "
                    f"npz, or leave it null to use the official file in data.root."
                )
            if hp.flag != "chestmnist":  # a file of another dataset's, already there, is read
                raise UserError(
                    f"data.path={self.file} does not exist, and data.synthetic makes "
                    f"ChestMNIST-format data only, not {hp.flag}'s: give data.path=<a {hp.flag} "
                    f"npz>, or data.flag=chestmnist."
                )
            log.info("Writing synthetic %s data to %s", hp.flag, self.file)
            write_synthetic(self.file, record=True, **self.synthetic)
            return
        if hp.root is not None and not Path(hp.root).expanduser().is_dir():
            raise UserError(
                f"data.root={hp.root} does not exist. Create it, or leave data.root null to use "
                f"medmnist's folder ({DEFAULT_ROOT})."
            )
        fetch_official(
            hp.flag, hp.size, self.file.parent, download=hp.download, verify=hp.verify_md5
        )

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if not self.file.exists():  # setup() without prepare_data(), e.g. outside a Trainer
            self.prepare_data()
        for split, (images, labels) in read_npz(
            self.file, self.hparams.flag, self.hparams.size, mmap=self.hparams.mmap
        ).items():
            if self.hparams.subset is not None:
                images, labels = images[: self.hparams.subset], labels[: self.hparams.subset]
            self.splits[split] = SplitDataset(torch.from_numpy(images), torch.from_numpy(labels))

    def prevalence(self, split: str = "train") -> torch.Tensor:
        """Fraction of the images of `split` that are positive for each output: per label, or
        per class for a multi-class task."""
        return self.task.prevalence(self.splits[split].labels, len(self.labels))

    def _keep_on_device(self, device: torch.device) -> bool:
        if self.hparams.on_device != "auto":
            return bool(self.hparams.on_device)
        if device.type != "cuda":
            return True  # the splits already sit in host memory: batches are cut in place
        free, _ = torch.cuda.mem_get_info(device)
        return sum(d.images.nbytes + d.labels.nbytes for d in self.splits.values()) < free / 4

    def _loader(self, split: str, batch_size: int, shuffle: bool):
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        on_device = self._keep_on_device(device)
        drop_last = shuffle and (  # training only: evaluation sees every image
            self.hparams.drop_last or self._one_image_left(split, batch_size, world, on_device)
        )
        # training's progress, which its loader keeps in checkpoints (resumable inside an epoch)
        batches_done = self._batches_done if shuffle and trainer is not None else None
        if on_device:
            if split not in self._on_device:
                data = self.splits[split]
                self._on_device[split] = (data.images.to(device), data.labels.to(device))
            return DeviceBatches(
                *self._on_device[split],
                batch_size,
                shuffle,
                rank=rank,
                world_size=world,
                drop_last=drop_last,
                batches_done=batches_done,
            )
        # training under DDP: Lightning's DistributedSampler; evaluation: our exact shards
        sampler = (
            ShardSampler(self.splits[split], rank, world) if world > 1 and not shuffle else None
        )
        loader = dict(
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            drop_last=drop_last,
            collate_fn=keep_batch,
            num_workers=self.hparams.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.hparams.num_workers > 0,
        )
        if batches_done:  # training: stateful, as DeviceBatches
            return TrainingDataLoader(self.splits[split], batches_done=batches_done, **loader)
        return DataLoader(self.splits[split], **loader)

    def _one_image_left(self, split: str, batch_size: int, world: int, on_device: bool) -> bool:
        """Whether each training epoch would end on a batch of one image (per process), which
        batch norm cannot train on where its maps are 1x1 (`model.stem=imagenet` at 28 px: a
        ValueError after a whole epoch) and whose statistics are one image's anywhere. It is
        then left out, a different image each epoch, as `data.drop_last=true` would; the log
        says so once."""
        n = len(self.splits[split])
        # on the device each process trains n // world images; Lightning's DistributedSampler
        # pads the DataLoader's shards to n / world rounded up
        per = n // world if on_device else -(-n // world)
        if per % batch_size != 1:
            return False
        if not self._said_one_image_left:
            log.info(
                "Each training epoch's last batch would hold one image (%d = %d x %d + 1%s), on "
                "which batch norm cannot train: it is left out, a different image each epoch "
                "(data.drop_last=true leaves out any last, partial batch).",
                per,
                per // batch_size,
                batch_size,
                " per process" if world > 1 else "",
            )
            self._said_one_image_left = True
        return True

    def _batches_done(self) -> int:
        """The training batches of this epoch that a resume from a checkpoint saved now counts
        as done, as Lightning counts them: those whose step ran (`processed`, which Lightning
        counts after the update, before on_train_batch_end; a batch stopped inside its step,
        by Ctrl-C, is trained again). 0 at an epoch's end, when the next epoch shuffles afresh."""
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return done if done < self.trainer.num_training_batches else 0

    @override
    def train_dataloader(self) -> DataLoader:
        loader = self._loader("train", self.hparams.batch_size, shuffle=True)
        if len(loader) == 0:
            n, world = len(self.splits["train"]), self.trainer.world_size if self.trainer else 1
            images = f"{n} training images" + (f", {n // world} per process" if world > 1 else "")
            if n // world == 0:
                raise UserError(f"{self.file} has {images}: nothing to train on.")
            raise UserError(
                f"data.drop_last=true with data.batch_size={self.hparams.batch_size} leaves no "
                f"training batch: {self.file} has {images}. Lower data.batch_size or set "
                f"data.drop_last=false."
            )
        return loader

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.hparams.eval_batch_size, shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.hparams.eval_batch_size, shuffle=False)

    @override
    def predict_dataloader(self) -> list:
        """Validation and test, in that order: what the report is made of."""
        return [
            self._loader(s, self.hparams.eval_batch_size, shuffle=False) for s in ("val", "test")
        ]

    @override
    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if not isinstance(batch, tuple | list):
            return batch  # not one of ours (the model summary's example input)
        images, labels = batch
        x = to_model_input(images, self.hparams.mean, self.hparams.std)
        if self.hparams.augment and self.trainer is not None and self.trainer.training:
            x = random_shift(x, self.hparams.max_shift)
        return x, labels
