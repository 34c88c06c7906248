"""A synthetic ChestMNIST: same file format, learnable labels, no network.

The file has the keys, shapes and dtypes of the official `chestmnist[_SIZE].npz`
(`{train,val,test}_images` uint8 (N, S, S), `{train,val,test}_labels` uint8 (N, 14)) and each
label's prevalence follows the real NIH ChestX-ray14 rates, so class imbalance, the
all-negative baseline and the metrics behave as on the real data. Labels are drawn
independently, so an image can carry several findings.

Each finding k owns a faint blob at its own place in a smooth chest-like background; an
image carries the blob of every finding it has, plus per-image brightness and pixel noise.
The blobs are weak next to the noise, so a model must learn them (val AUROC starts at 0.5)
and can (a short CPU run goes well above 0.5).

    python -m chest_mnist.synthetic out.npz --train 4000 --val 1000 --test 1000
    python -m chest_mnist.synthetic out.npz --official-sizes --size 28   # 78,468/11,219/22,433
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from medmnist import INFO

from chest_mnist import UserError
from chest_mnist.cli import report_user_errors
from chest_mnist.npz import SPLITS, open_npz  # open_npz: its messages for a file that is no npz

# Findings per label over all 112,120 ChestX-ray14 images (Wang et al., CVPR 2017, the source
# of ChestMNIST), in medmnist's label order. The mean rate is 5.2%, which is why predicting
# "no finding" everywhere scores about 0.948 accuracy.
NIH_COUNTS = {
    "atelectasis": 11559,
    "cardiomegaly": 2776,
    "effusion": 13317,
    "infiltration": 19894,
    "mass": 5782,
    "nodule": 6331,
    "pneumonia": 1431,
    "pneumothorax": 5302,
    "consolidation": 4667,
    "edema": 2303,
    "emphysema": 2516,
    "fibrosis": 1686,
    "pleural": 3385,
    "hernia": 227,
}
NIH_IMAGES = 112_120
LABELS = [INFO["chestmnist"]["label"][str(i)] for i in range(len(INFO["chestmnist"]["label"]))]
PREVALENCE = np.array([NIH_COUNTS[name] / NIH_IMAGES for name in LABELS])

CHUNK = 2048  # images generated at once: bounds memory at size 224 (2048 x 224 x 224 float32)
# the npz key of the settings a file was made with, when `data.synthetic` made it (a JSON string)
SETTINGS = "synthetic_settings"


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    centres = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(centres, centres, indexing="ij")  # rows (y), columns (x) in [0, 1]


def _background(size: int) -> np.ndarray:
    """Two dark lung fields in a brighter body: a rough frontal chest X-ray, 0..255."""
    y, x = _grid(size)
    lungs = np.zeros_like(x)
    for cx in (0.32, 0.68):
        lungs += np.exp(-((((x - cx) / 0.16) ** 2 + ((y - 0.5) / 0.3) ** 2) ** 2))
    return 170.0 - 90.0 * np.clip(lungs, 0.0, 1.0)


def _finding_patterns(size: int, rng: np.random.Generator) -> np.ndarray:
    """One blob per finding, (14, size, size) in [0, 1], at places drawn once from `rng`."""
    y, x = _grid(size)
    cy = rng.uniform(0.2, 0.8, len(LABELS))
    cx = rng.uniform(0.2, 0.8, len(LABELS))
    radius = rng.uniform(0.06, 0.14, len(LABELS))
    blobs = np.exp(
        -((x - cx[:, None, None]) ** 2 + (y - cy[:, None, None]) ** 2)
        / (2 * radius[:, None, None] ** 2)
    )
    return blobs.astype(np.float32)


def sample_labels(n: int, rng: np.random.Generator, min_positives: int = 2) -> np.ndarray:
    """(n, 14) uint8 labels at the NIH prevalence, each label positive at least `min_positives`
    times so that per-label AUROC is defined even on a small split."""
    labels = (rng.random((n, len(LABELS))) < PREVALENCE).astype(np.uint8)
    floor = min(min_positives, n)
    for k in range(len(LABELS)):
        missing = floor - int(labels[:, k].sum())
        if missing > 0:
            negatives = np.flatnonzero(labels[:, k] == 0)
            labels[rng.choice(negatives, missing, replace=False), k] = 1
    return labels


def render_images(
    labels: np.ndarray,
    size: int,
    patterns: np.ndarray,
    rng: np.random.Generator,
    signal: float,
    noise: float,
) -> np.ndarray:
    """uint8 (n, size, size) images that carry the blob of each positive label."""
    background = _background(size)
    flat_patterns = patterns.reshape(len(LABELS), -1)
    images = np.empty((len(labels), size, size), dtype=np.uint8)
    for start in range(0, len(labels), CHUNK):
        chunk = labels[start : start + CHUNK].astype(np.float32)
        findings = (chunk @ flat_patterns).reshape(-1, size, size)
        brightness = rng.uniform(0.85, 1.15, (len(chunk), 1, 1)).astype(np.float32)
        pixels = background * brightness + signal * findings
        pixels += rng.normal(0.0, noise, pixels.shape).astype(np.float32)
        images[start : start + CHUNK] = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    return images


def make_synthetic(
    n_train: int = 4000,
    n_val: int = 1000,
    n_test: int = 1000,
    size: int = 28,
    seed: int = 0,
    signal: float = 40.0,
    noise: float = 30.0,
) -> dict[str, np.ndarray]:
    """The arrays of a ChestMNIST-format npz. Same seed, same arrays."""
    rng = np.random.default_rng(seed)
    patterns = _finding_patterns(size, np.random.default_rng(seed + 1))
    arrays = {}
    for split, n in zip(SPLITS, (n_train, n_val, n_test), strict=True):
        labels = sample_labels(n, rng)
        arrays[f"{split}_images"] = render_images(labels, size, patterns, rng, signal, noise)
        arrays[f"{split}_labels"] = labels
    return arrays


# data.synthetic's keys and their defaults: make_synthetic's arguments but the size (data.size)
KEYS = {
    name: p.default
    for name, p in inspect.signature(make_synthetic).parameters.items()
    if name != "size"
}


def _filled(given: Mapping) -> dict:
    """`given`'s values of KEYS, each missing one at its default."""
    return {key: given.get(key, default) for key, default in KEYS.items()}


def settings(size: int, given: Mapping) -> dict:
    """`data.synthetic` at `data.size` as `make_synthetic`'s arguments, defaults filled in; a
    UserError names a key it does not take, or a value it cannot use."""
    if not isinstance(given, Mapping):
        raise UserError(
            f"data.synthetic={given!r} must be a mapping of {', '.join(KEYS)}, or null."
        )
    unknown = sorted(set(given) - set(KEYS))
    if unknown:
        raise UserError(
            f"data.synthetic.{unknown[0]} is not a key of data.synthetic: its keys are {', '.join(KEYS)}."
        )
    made = _filled(given)
    for key, value in made.items():
        least = 0 if key in ("seed", "signal", "noise") else 1
        kind = (int, float) if key in ("signal", "noise") else int
        if (
            isinstance(value, bool)
            or not isinstance(value, kind)
            or not math.isfinite(value)
            or value < least
        ):
            what = "whole number" if kind is int else "number"
            raise UserError(f"data.synthetic.{key}={value!r} must be a {what} of {least} or more.")
    return made | {"size": size}


def file_name(size: int, given: Mapping) -> str:
    """The name `data=synthetic` gives the file of these settings (`settings`), so that other
    settings make another file: `synthetic_chestmnist_28_4000-1000-1000_seed0.npz`, with any
    other signal or noise than the default named too. Unchecked: the data module says what in
    the settings cannot be used (Hydra resolves this name first)."""
    made = _filled(given)
    name = f"synthetic_chestmnist_{size}_{made['n_train']}-{made['n_val']}-{made['n_test']}_seed{made['seed']}"
    for key in ("signal", "noise"):
        if made[key] != KEYS[key]:
            name += f"_{key}{made[key]}"
    return name + ".npz"


def write_synthetic(
    path: str | Path, compress: bool = True, record: bool = False, **kwargs
) -> Path:
    """Write a synthetic ChestMNIST npz to `path` (atomically: a half-written file never
    stands at `path`) and return the path. `compress=False` writes a large file much faster.
    `record`: keep the settings in the file (SETTINGS), which `check_made_with` compares."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = make_synthetic(**kwargs)
    if record:
        arrays[SETTINGS] = np.array(json.dumps(kwargs, sort_keys=True))
    partial = path.with_name(path.name + ".part.npz")
    try:
        (np.savez_compressed if compress else np.savez)(partial, **arrays)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def check_made_with(path: Path, wanted: dict) -> None:
    """A UserError when the file at `path` was made by `data.synthetic` with other settings
    than `wanted` (`settings`): the file is reused, never made again, so they would not apply.
    A file without its settings (made by `python -m chest_mnist.synthetic`, or by hand) is
    used as it is."""
    with open_npz(path) as npz:
        if SETTINGS not in npz.files:
            return
        try:
            made = json.loads(str(npz[SETTINGS]))
        except ValueError:
            raise UserError(
                f"{path}'s {SETTINGS} is no JSON: delete the file to make it anew."
            ) from None
    if made != wanted:
        differ = sorted(k for k in made.keys() | wanted.keys() if made.get(k) != wanted.get(k))
        key = {"size": "data.size"}
        was = ", ".join(f"{k}={made.get(k)}" for k in differ)
        now = ", ".join(f"{k}={wanted.get(k)}" for k in differ)
        asked = " ".join(f"{key.get(k, 'data.synthetic.' + k)}={made.get(k)}" for k in differ)
        raise UserError(
            f"{path} was made by data.synthetic with {was}, not {now}: a file there is used, "
            f"not made again. Ask for what it holds ({asked}), give another data.path, or "
            f"delete it to make it anew."
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, help="the npz file to write")
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--val", type=int, default=1000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument(
        "--official-sizes",
        action="store_true",
        help="78,468 / 11,219 / 22,433 images, as ChestMNIST",
    )
    parser.add_argument("--size", type=int, default=28, choices=(28, 64, 128, 224))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-compress",
        action="store_true",
        help="store the arrays uncompressed (faster for large files)",
    )
    args = parser.parse_args(argv)
    counts = (
        INFO["chestmnist"]["n_samples"]
        if args.official_sizes
        else dict(train=args.train, val=args.val, test=args.test)
    )
    for split, count in counts.items():
        if count < 1:
            parser.error(f"--{split} {count}: a split needs 1 image or more")
    if args.seed < 0:
        parser.error(f"--seed {args.seed}: a seed is 0 or more")
    path = report_user_errors(lambda: _write(args, counts))
    print(
        f"wrote {path} ({counts['train']:,} / {counts['val']:,} / {counts['test']:,} images at {args.size}px)"
    )


def _write(args: argparse.Namespace, counts: dict) -> Path:
    if args.out.is_dir():
        raise UserError(f"{args.out} is a folder: give the npz file to write.")
    folder = next((p for p in args.out.absolute().parents if p.exists()), Path("/"))
    if not os.access(folder, os.W_OK):  # before the arrays are made: minutes at 224px
        raise UserError(f"Could not write {args.out}: {folder} cannot be written.")
    try:
        return write_synthetic(
            args.out,
            compress=not args.no_compress,
            n_train=counts["train"],
            n_val=counts["val"],
            n_test=counts["test"],
            size=args.size,
            seed=args.seed,
        )
    except OSError as e:
        raise UserError(f"Could not write {args.out}: {e.strerror or e}.") from None


if __name__ == "__main__":
    main()
