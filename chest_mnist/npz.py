"""MedMNIST's npz files: fetch the official one, read and check any, extract it for mmap.

The official file of a dataset and size is downloaded with the URL and MD5 in
`medmnist.INFO` into a folder (medmnist's own `~/.medmnist` by default), and an existing one is
MD5-checked, never overwritten. `read_npz` reads a MedMNIST-format file (official, generated
by `chest_mnist.synthetic`, or the user's) and checks it against `medmnist.INFO`: keys, dtypes,
image shape, label columns and values; every refusal names the file, the key and the way out.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import zipfile
import zlib
from pathlib import Path

import numpy as np
from medmnist import INFO

from chest_mnist import UserError
from chest_mnist.task import Task

log = logging.getLogger(__name__)

SIZES = (28, 64, 128, 224)
SPLITS = ("train", "val", "test")
DOWNLOAD_TIMEOUT_S = 60  # a download that receives nothing for this long has failed


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
    # download_url's urlopen has no timeout: a network that takes the connection and never
    # answers would hang the run; the sockets it opens take this one (per blocking read, so a
    # slow link still works; an https URL that times out is tried once more over http)
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        download_url(url, str(root), partial.name, md5=None)
    except BaseException as e:  # Ctrl-C too: no half file left behind
        partial.unlink(missing_ok=True)
        if not isinstance(e, Exception):
            raise
        raise UserError(
            f"Could not download {path.name} ({type(e).__name__}: {e}). {_download_help(flag, size, root)}"
        ) from e
    finally:
        socket.setdefaulttimeout(before)
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
    if _stamp(stamp) == source:
        return folder
    if not zipfile.is_zipfile(path):  # what reading it says of it: no archive, or one array
        open_npz(path).close()
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
    except BaseException as e:  # Ctrl-C too: no .part left behind (its name is this process's)
        if part is not None:
            part.unlink(missing_ok=True)
        if isinstance(e, zlib.error | zipfile.BadZipFile | EOFError):
            raise UserError(
                f"Could not extract the arrays of {path} for data.mmap=true: the file is damaged "
                f"({type(e).__name__}: {e}). Replace it with the MedMNIST file or regenerate it "
                f"(python -m chest_mnist.synthetic)."
            ) from e
        if isinstance(e, OSError):
            raise UserError(
                f"Could not extract the arrays of {path} into {folder} for data.mmap=true "
                f"({type(e).__name__}: {e}). It needs about the npz's uncompressed size in free "
                f"disk; free some, or set data.mmap=false to read the file into memory."
            ) from e
        raise
    return folder


def _stamp(stamp: Path) -> dict | None:
    """What `source.json` says was extracted, or None when there is none or it cannot be read
    (an extraction cut short while writing it): the arrays are then extracted again."""
    try:
        return json.loads(stamp.read_text())
    except (OSError, ValueError):
        return None


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
    with open_npz(path, mmap) as npz:
        return {split: read_split(npz, path, split, flag, size) for split in SPLITS}


def open_npz(path: Path, mmap: bool = False) -> np.lib.npyio.NpzFile | NpyFolder:
    """The arrays of the npz archive `path`, to be used in a `with` block; with `mmap`, its
    extracted, memory-mapped copies (`NpyFolder`)."""
    try:
        npz = np.load(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        # numpy reads what is no zip as a pickle, and would suggest allow_pickle=True
        why = e if zipfile.is_zipfile(path) else "it is no zip archive, which an .npz is"
        raise UserError(
            f"{path} is not a readable .npz archive ({why}). It was left as it is: replace it "
            f"with the MedMNIST file or regenerate it (python -m chest_mnist.synthetic)."
        ) from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise UserError(
            f"{path} holds a single array, not a MedMNIST .npz archive with train/val/test keys."
        )
    if mmap:
        npz.close()
        return NpyFolder(extract_npy(path))
    return npz


def read_split(
    npz: np.lib.npyio.NpzFile | NpyFolder, path: Path, split: str, flag: str, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels uint8) of one split of the open archive `npz` (read from `path`),
    checked against `medmnist.INFO[flag]` at `size`."""
    info = INFO[flag]
    n_labels = len(info["label"])
    label_columns, top = Task.from_medmnist(info["task"]).label_file_shape(n_labels)
    image_shape = (size, size) if info["n_channels"] == 1 else (size, size, info["n_channels"])
    for key in (f"{split}_images", f"{split}_labels"):
        if key not in npz.files:
            raise UserError(
                f"{path} has no key '{key}' (it has {sorted(npz.files)}); a MedMNIST npz "
                f"has {split}_images and {split}_labels for train, val and test."
            )
    try:
        images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise UserError(
            f"{path}: cannot read the {split} arrays ({type(e).__name__}: {e}); the file is "
            f"damaged. Replace it with the MedMNIST file or regenerate it."
        ) from e
    if len(images) == 0:
        raise UserError(f"{path}: {split}_images holds no images (a MedMNIST npz fills all three).")
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
    return images, np.array(labels, dtype=np.uint8)


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
