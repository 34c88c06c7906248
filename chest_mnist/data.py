"""MedMNIST splits as uint8 tensors, batched by indexing, made model-ready on the device.

`MedMNISTDataModule` fetches the official npz through the URLs and MD5 sums in
`medmnist.INFO` (or reads one already in `data.root`, medmnist's own `~/.medmnist` by
default, or any file given as `data.path`), checks it, keeps each split whole as uint8, and
serves batches that are one indexing operation each: no PIL, no per-sample Python. Float
conversion, normalisation, gray -> RGB and the optional augmentation run per batch on the
device, in `on_after_batch_transfer`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import zipfile
from pathlib import Path

import lightning as L
import numpy as np
import torch
from medmnist import INFO
from medmnist.info import DEFAULT_ROOT
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from typing_extensions import override

from chest_mnist import UserError

log = logging.getLogger(__name__)

SIZES = (28, 64, 128, 224)
SPLITS = ("train", "val", "test")


def size_suffix(size: int) -> str:
    """MedMNIST's name suffix for a size: "" at 28, "_64" at 64 (files, INFO's url_64 / MD5_64)."""
    return "" if size == 28 else f"_{size}"


def official_filename(flag: str, size: int) -> str:
    return f"{flag}{size_suffix(size)}.npz"


def md5sum(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.md5(usedforsecurity=False)  # a file check, not security: FIPS builds allow it
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _download_help(flag: str, size: int, root: Path) -> str:
    suffix = size_suffix(size)
    return (
        f"Download it by hand from {INFO[flag]['url' + suffix]} (MD5 {INFO[flag]['MD5' + suffix]}) "
        f"and put it at {root / official_filename(flag, size)}, "
        f"or train offline on generated data with data=synthetic."
    )


def fetch_official(
    flag: str, size: int, root: Path, download: bool = True, verify: bool = True
) -> Path:
    """Path of the official `flag` npz at `size` in `root`, downloaded and MD5-checked if missing.

    The download goes to a `.part` file that becomes the real name only once its MD5 matches,
    so a broken download never stands where a good file is expected. A file that is already
    there and fails the MD5 check is left untouched: it may be the user's.
    """
    suffix = size_suffix(size)
    url, md5 = INFO[flag]["url" + suffix], INFO[flag]["MD5" + suffix]
    path = root / official_filename(flag, size)
    if path.exists():
        if verify and (found := md5sum(path)) != md5:
            raise UserError(
                f"{path} has MD5 {found}, not the official {md5}: it is truncated or not the "
                f"MedMNIST file. It was left as it is. Move it away and run again to download a "
                f"fresh copy, or set data.verify_md5=false to use it anyway."
            )
        return path
    if not download:
        raise UserError(
            f"{path} does not exist and data.download=false. {_download_help(flag, size, root)}"
        )
    if not root.is_dir():
        raise UserError(
            f"data.root={root} is not a folder. Create it, or point data.root at an existing folder."
        )
    if not os.access(root, os.W_OK):
        raise UserError(
            f"data.root={root} cannot be written, so {path.name} cannot be downloaded there. "
            f"Point data.root at a writable folder. {_download_help(flag, size, root)}"
        )

    from torchvision.datasets.utils import download_url  # what medmnist's own download uses

    partial = path.with_name(path.name + ".part")
    # a .part is never a finished download (that is renamed at once): one left by a killed run
    # would pass download_url's "already there" check, so it goes first
    partial.unlink(missing_ok=True)
    log.info("Downloading %s to %s", url, path)
    try:
        download_url(url, str(root), partial.name, md5=None)
    except BaseException as e:  # Ctrl-C too: no half file left behind
        partial.unlink(missing_ok=True)
        if not isinstance(e, Exception):
            raise
        raise UserError(
            f"Could not download {path.name} ({type(e).__name__}: {e}). {_download_help(flag, size, root)}"
        ) from e
    if (found := md5sum(partial)) != md5:
        partial.unlink()
        raise UserError(
            f"The download of {url} has MD5 {found}, not the official {md5}; it was deleted. "
            f"Try again later. {_download_help(flag, size, root)}"
        )
    partial.replace(path)
    return path


def extract_npy(path: Path) -> Path:
    """The arrays of the npz `path` as plain .npy files in `<name>_npy/` beside it, what memory
    mapping needs (MedMNIST's files are compressed). Each array is streamed out of the archive
    in chunks, never whole in memory; the folder is reused while the npz is unchanged (its size
    and modification time are kept in `source.json`)."""
    folder = path.with_name(path.stem + "_npy")
    stat = path.stat()
    source = {"file": path.name, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    stamp = folder / "source.json"
    if stamp.exists() and json.loads(stamp.read_text()) == source:
        return folder
    log.info("Extracting the arrays of %s into %s for memory mapping", path.name, folder)
    part = None
    try:
        folder.mkdir(exist_ok=True)
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                if not member.filename.endswith(".npy") or "/" in member.filename:
                    continue
                target = folder / member.filename
                part = target.with_name(f"{target.name}.{os.getpid()}.part")  # ranks may race
                with archive.open(member) as src, open(part, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 24)
                part.replace(target)
        stamp.write_text(json.dumps(source) + "\n")
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        if part is not None:
            part.unlink(missing_ok=True)
        raise UserError(
            f"Could not extract the arrays of {path} into {folder} for data.mmap=true "
            f"({type(e).__name__}: {e}). It needs about the npz's uncompressed size in free disk; "
            f"free some, or set data.mmap=false to read the file into memory."
        ) from e
    return folder


class NpyFolder:
    """The arrays that `extract_npy` wrote, memory-mapped, with the part of NpzFile's interface
    that `read_npz` uses (`files`, `[key]`, `with`). Copy-on-write maps: writable for torch,
    never written back."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files = sorted(p.stem for p in folder.glob("*.npy"))

    def __getitem__(self, key: str) -> np.ndarray:
        return np.load(self.folder / f"{key}.npy", mmap_mode="c")

    def __enter__(self) -> NpyFolder:
        return self

    def __exit__(self, *exc) -> None:
        return None


def read_npz(
    path: Path, flag: str, size: int, mmap: bool = False
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (images uint8, labels uint8)} from a MedMNIST-format npz, checked against
    `medmnist.INFO[flag]`: keys, dtypes, image shape, number of label columns, label values.
    With `mmap`, the images are memory-mapped from plain .npy copies (`extract_npy`): host
    memory then holds only the pages that batches touch; the labels are read whole."""
    info = INFO[flag]
    try:
        npz = np.load(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(
            f"{path} is not a readable .npz archive ({e}). It was left as it is: replace it with "
            f"the MedMNIST file or regenerate it (python -m chest_mnist.synthetic)."
        ) from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise UserError(
            f"{path} holds a single array, not a MedMNIST .npz archive with train/val/test keys."
        )
    if mmap:
        npz.close()
        npz = NpyFolder(extract_npy(path))
    n_labels = len(info["label"])
    label_columns = n_labels if info["task"].startswith("multi-label") else 1
    image_shape = (size, size) if info["n_channels"] == 1 else (size, size, info["n_channels"])
    splits = {}
    with npz:
        for split in SPLITS:
            for key in (f"{split}_images", f"{split}_labels"):
                if key not in npz.files:
                    raise UserError(
                        f"{path} has no key '{key}' (it has {sorted(npz.files)}); a MedMNIST npz "
                        f"has {split}_images and {split}_labels for train, val and test."
                    )
            try:
                images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
                raise UserError(
                    f"{path}: cannot read the {split} arrays ({e}); the file is damaged."
                ) from e
            if images.dtype != np.uint8 or images.shape[1:] != image_shape:
                raise UserError(
                    f"{path}: {split}_images is {images.dtype} {images.shape}, expected uint8 "
                    f"(N, {', '.join(map(str, image_shape))}) for {flag} at data.size={size}."
                )
            if labels.ndim == 1:
                labels = labels[:, None]
            if labels.shape != (len(images), label_columns):
                raise UserError(
                    f"{path}: {split}_labels has shape {labels.shape}, expected ({len(images)}, "
                    f"{label_columns}): {flag} has {n_labels} labels ({info['task']})."
                )
            top = 1 if label_columns > 1 or info["task"] == "binary-class" else n_labels - 1
            check_label_values(labels, top, f"{path}: {split}_labels", flag, info["task"])
            expected = info["n_samples"][split]
            if len(images) != expected:
                log.info(
                    "%s: %s has %d images (the official %s split has %d)",
                    path.name,
                    split,
                    len(images),
                    flag,
                    expected,
                )
            splits[split] = (images, np.array(labels, dtype=np.uint8))
    return splits


def check_label_values(labels: np.ndarray, top: int, where: str, flag: str, task: str) -> None:
    """Labels are whole numbers in 0..top. Floats pass only when they are whole: a cast to
    uint8 would silently turn 0.5 into 0 (and NaN into anything)."""
    if labels.dtype.kind not in "biuf":
        raise UserError(f"{where} is {labels.dtype}, not numbers; {flag} labels are {task}.")
    if labels.dtype.kind == "f":
        bad = ~np.isfinite(labels) | (labels != np.round(labels))
        if bad.any():
            row, column = (int(i) for i in np.argwhere(bad)[0])
            raise UserError(
                f"{where} holds {int(bad.sum())} values that are not whole numbers, the first "
                f"{labels[row, column].item()} (image {row}, column {column}); {flag} labels are "
                f"{task}: 0..{top}. Fix the file's labels."
            )
    if labels.size and (labels.min() < 0 or labels.max() > top):
        raise UserError(
            f"{where} holds values outside 0..{top} (found {labels.min()}..{labels.max()}); "
            f"{flag} labels are {task}."
        )


class SplitDataset(Dataset):
    """One split as two tensors. `__getitems__` returns a whole batch with one indexing
    operation, which DataLoader calls in place of `__getitem__` per sample."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices)
        return self.images[index], self.labels[index]


class DeviceBatches:
    """Batches cut from a split that sits whole in one place (GPU memory, or host memory when
    training on the CPU): a shuffle is one `randperm` there, a batch one indexing operation.

    Under DDP each rank takes its own slice of the (shared, seeded) permutation. Training
    slices are equal (the last `len % world_size` images of a shuffled epoch sit out, as
    with DistributedSampler(drop_last=True)); evaluation slices cover every image exactly
    once, so no test image is counted twice or dropped. `drop_last` (for training) leaves out
    the epoch's last, partial batch, so that every step has the same shape.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        shuffle: bool,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ):
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle = batch_size, shuffle
        self.rank, self.world_size = rank, world_size
        self.drop_last = drop_last

    def _indices(self) -> torch.Tensor:
        n, device = len(self.images), self.images.device
        if not self.shuffle:
            return torch.arange(*shard_bounds(n, self.rank, self.world_size), device=device)
        # the same permutation on every rank: the global seed is the same everywhere
        order = torch.randperm(n, device=device)
        return order[: n - n % self.world_size].view(-1, self.world_size)[:, self.rank]

    def __len__(self) -> int:
        n = len(self.images)
        start, stop = shard_bounds(n, self.rank, self.world_size)
        per_rank = n // self.world_size if self.shuffle else stop - start
        if self.drop_last:
            return per_rank // self.batch_size
        return math.ceil(per_rank / self.batch_size)

    def __iter__(self):
        indices = self._indices()
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = indices[start : start + self.batch_size]
            yield self.images[index], self.labels[index]


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous slice [start, stop) of n items that rank `rank` evaluates: every item once."""
    return n * rank // world_size, n * (rank + 1) // world_size


class ShardSampler(DistributedSampler):
    """Evaluation under DDP for the DataLoader path: each rank reads its own contiguous slice,
    with no padding (Lightning's default DistributedSampler repeats images to even out the
    ranks, and interleaves them). Being a DistributedSampler, Lightning leaves it in place."""

    def __init__(self, dataset: Dataset, rank: int, world_size: int):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=False)
        self.start, self.stop = shard_bounds(len(dataset), rank, world_size)
        self.num_samples = self.total_size = self.stop - self.start

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def keep_batch(batch):
    """collate_fn for SplitDataset: the batch is already stacked."""
    return batch


def to_model_input(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 (B, H, W) gray or (B, H, W, C) colour -> float (B, 3, H, W), normalised,
    channels_last. Gray is repeated to three identical channels, as ResNet-18 expects RGB."""
    x = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
    x = (x.float() / 255.0 - mean) / std
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous(memory_format=torch.channels_last)


def random_shift(
    x: torch.Tensor, max_shift: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Translate each image by its own random offset in [-max_shift, max_shift] pixels per axis,
    filling the border by replication. One gather for the whole batch."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (max_shift,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b, 1), device=x.device, generator=generator)
    rows = dy + torch.arange(h, device=x.device)  # (B, H)
    cols = dx + torch.arange(w, device=x.device)  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    shifted = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return shifted.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


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
        if flag not in INFO:
            raise UserError(
                f"data.flag={flag!r} is not a MedMNIST dataset; choose one of {', '.join(INFO)}."
            )
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
            if not isinstance(value, bool):
                raise UserError(f"data.{key}={value!r} must be true or false.")
        if on_device not in (True, False, "auto"):
            raise UserError(f"data.on_device={on_device!r} must be true, false or auto.")
        self.save_hyperparameters()
        self.info = INFO[flag]
        self.task = self.info["task"]
        names = [self.info["label"][str(i)] for i in range(len(self.info["label"]))]
        if self.task == "binary-class":
            self.labels = names[1:]  # one sigmoid output: the positive class
        else:
            self.labels = names  # one output per finding (sigmoid) or per class (softmax)
        self.splits: dict[str, SplitDataset] = {}
        self._on_device: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def file(self) -> Path:
        """The npz this module reads."""
        if self.hparams.path is not None:
            return Path(self.hparams.path).expanduser()
        root = DEFAULT_ROOT if self.hparams.root is None else self.hparams.root
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
                return
            if hp.synthetic is None:
                raise UserError(
                    f"data.path={self.file} does not exist. Point data.path at a MedMNIST-format "
                    f"npz, or leave it null to use the official file in data.root."
                )
            from chest_mnist.synthetic import write_synthetic

            log.info("Writing synthetic %s data to %s", hp.flag, self.file)
            write_synthetic(self.file, size=hp.size, **hp.synthetic)
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
        labels = self.splits[split].labels
        if self.task in ("multi-class", "ordinal-regression"):
            return torch.bincount(
                labels.reshape(-1).long(), minlength=len(self.labels)
            ).float() / len(labels)
        return labels.float().mean(0)

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
        drop_last = self.hparams.drop_last and shuffle  # training only: evaluation sees every image
        if self._keep_on_device(device):
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
            )
        # training under DDP: Lightning's DistributedSampler; evaluation: our exact shards
        sampler = (
            ShardSampler(self.splits[split], rank, world) if world > 1 and not shuffle else None
        )
        return DataLoader(
            self.splits[split],
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            drop_last=drop_last,
            collate_fn=keep_batch,
            num_workers=self.hparams.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.hparams.num_workers > 0,
        )

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
        images, labels = batch
        x = to_model_input(images, self.hparams.mean, self.hparams.std)
        if self.hparams.augment and self.trainer is not None and self.trainer.training:
            x = random_shift(x, self.hparams.max_shift)
        return x, labels
