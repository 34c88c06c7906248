"""Predict with a trained checkpoint on image files, folders of them, or MedMNIST npz files.

    python -m chest_mnist.predict ckpt_path=<run> inputs=[xray.png,scans/]   # the run's best checkpoint
    python -m chest_mnist.predict ckpt_path=<run>/checkpoints/<file>.ckpt inputs=[xray.png]
    python -m chest_mnist.predict ckpt_path=... inputs=[data/chestmnist.npz] split=test
    python -m chest_mnist.predict ckpt_path=... inputs=[scans/] format=json output=preds.json

Each image is made what the model was trained on: read with Pillow, gray (or RGB for a colour
dataset), center-cropped to a square and resized to the checkpoint's `data.size` when it is not
that size already (bicubic: medmnist.INFO says "resize" without naming the filter), then
normalised on the device exactly as in training (`chest_mnist.batches.to_model_input`). The output has one row per image: its path, one
probability per label, and the labels predicted at the per-label thresholds that evaluation
tuned on validation for these very weights (`<run>/report/thresholds.json`, found next to the
checkpoint, names the weights it was tuned for); for other weights (`last.ckpt` after a later
best epoch, say) or without that file the threshold is 0.5, and the output says why.
`thresholds=PATH` uses that file's thresholds whatever they were tuned for. A multi-class
model predicts its arg-max class and has no thresholds: the decision rule is the checkpoint's
task's (`MedMNISTClassifier.kind`, task.py).

A file that cannot be used (not an image, truncated, empty, missing, 4 channels, 16-bit, a
folder with no images, an npz of another dataset) gets its own row with the reason, and a
line on stderr; every other file is still predicted. Exit code 1 when any input failed, 2 for
a usage error (no checkpoint, bad thresholds file, an output file that already exists).
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import numpy as np
import torch
from medmnist import INFO
from omegaconf import DictConfig, ListConfig
from PIL import Image, UnidentifiedImageError

from chest_mnist import UserError
from chest_mnist.batches import to_model_input
from chest_mnist.checkpoints import load_model, weights_digest
from chest_mnist.cli import report_user_errors, resolve_device
from chest_mnist.config import register
from chest_mnist.metrics import THRESHOLD
from chest_mnist.model import MedMNISTClassifier
from chest_mnist.npz import SPLITS, read_npz
from chest_mnist.run_files import REPORT, THRESHOLDS, read_thresholds, run_of
from chest_mnist.task import Task

log = logging.getLogger(__name__)
register()  # before Hydra composes the config (hydra.run.dir uses the resolvers)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# Pillow modes we read as they are; anything else (RGBA, LA, CMYK, 16-bit, float) is refused:
# dropping an alpha channel or choosing a window for 16-bit pixels is the user's call.
READABLE_MODES = {"1": "1-bit", "L": "8-bit gray", "P": "palette", "RGB": "8-bit RGB"}


@dataclass
class Item:
    """One row of the output: an image to predict, or an input that failed."""

    path: str
    pixels: np.ndarray | None = None
    error: str | None = None
    scores: list[float] = field(default_factory=list)


def load_image(path: Path, size: int, channels: int) -> np.ndarray:
    """uint8 (size, size) gray, or (size, size, 3) for a colour model, the way medmnist.INFO
    describes making its images: center-crop to a square, resize. The filter, bicubic, is our
    choice (INFO does not name one). ValueError says why a file cannot be used."""
    if path.stat().st_size == 0:
        raise ValueError("empty file")
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not later
            mode = image.mode
            if mode == "P" and "transparency" in image.info:
                mode = "PA"
            if mode not in READABLE_MODES:
                bands = len(image.getbands())
                kind = f"{bands} channels" if bands > 1 else "1 channel"
                raise ValueError(
                    f"unsupported pixel format {image.mode} ({kind}"
                    + (", 16 or 32 bits per pixel" if mode.startswith(("I", "F")) else "")
                    + "): save it as 8-bit gray or RGB (no alpha channel)"
                )
            image = image.convert("L" if channels == 1 else "RGB")
    except UnidentifiedImageError:
        raise ValueError("not an image Pillow can read") from None
    except Image.DecompressionBombError as e:
        raise ValueError(f"too large to open safely ({e})") from None
    except (OSError, SyntaxError) as e:  # Pillow's truncated / damaged file errors
        raise ValueError(f"damaged or truncated image ({e})") from None
    width, height = image.size
    side = min(width, height)
    if width != height:
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def collect(inputs: list[str], size: int, channels: int, flag: str, split: str) -> list[Item]:
    """Every input as rows: image files, the images of folders (recursively, sorted), the
    `split` images of MedMNIST npz files. Failures become rows with an error."""
    items: list[Item] = []
    for name in inputs:
        path = Path(name).expanduser()
        if not path.exists():
            items.append(Item(name, error="no such file or folder"))
        elif path.is_dir():
            files = sorted(
                p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
            )
            if not files:
                items.append(
                    Item(name, error=f"folder with no images ({', '.join(IMAGE_SUFFIXES)})")
                )
            items.extend(_image_item(p, size, channels) for p in files)
        elif path.suffix.lower() == ".npz":
            try:
                images, _ = read_npz(path, flag, size)[split]
            except UserError as e:  # its message starts with the file's name: the row has it
                items.append(Item(name, error=str(e).removeprefix(str(path)).lstrip(": ")))
                continue
            items.extend(Item(f"{name}:{split}[{i}]", pixels=p) for i, p in enumerate(images))
        else:
            items.append(_image_item(path, size, channels))
    return items


def _image_item(path: Path, size: int, channels: int) -> Item:
    try:
        return Item(str(path), pixels=load_image(path, size, channels))
    except (ValueError, OSError) as e:
        return Item(str(path), error=str(e))
    except Exception as e:  # a decoder's own error: still one file's problem, not the run's
        return Item(str(path), error=f"cannot read it ({type(e).__name__}: {e})")


@torch.inference_mode()
def predict_scores(
    model: MedMNISTClassifier,
    images: np.ndarray,
    mean: float,
    std: float,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Probabilities (N, labels) for uint8 images (N, H, W[, C]), in batches on `device`, with
    the same input conversion as training; bf16 autocast on a GPU, as in training."""
    model = model.to(device).eval()
    device = torch.device(device)
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start : start + batch_size]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append(model.probabilities(to_model_input(batch, mean, std)).float().cpu())
    return torch.cat(out) if out else torch.empty(0, len(model.hparams.labels))


def choose_thresholds(
    cfg_thresholds: str | None,
    ckpt_path: Path,
    digest: str,
    labels: list[str],
    task: Task,
) -> tuple[list[float] | None, str]:
    """(thresholds, where they come from). The thresholds tuned for these weights (`digest`):
    the checkpoint run's report/thresholds.json when it was tuned for them, else 0.5 for every
    label, and why. A file given as `thresholds=` is used whatever it was tuned for (the
    source says when that was other weights). None for a task that tunes none (arg-max)."""
    if not task.tunes_thresholds:
        return None, "arg-max class (multi-class task)"
    if cfg_thresholds:
        path = Path(cfg_thresholds).expanduser()
        tuned = read_thresholds(path, labels)
        values = list(tuned.labels.values())  # in the model's label order
        if tuned.weights_sha256 == digest:
            return values, f"tuned on validation ({path})"
        weights = (
            f"other weights ({tuned.checkpoint or 'in no checkpoint file'})"
            if tuned.weights_sha256
            else "weights it does not name (an older thresholds.json)"
        )
        return values, f"tuned on validation for {weights}, given as thresholds={path}"
    beside = run_of(ckpt_path) / REPORT / THRESHOLDS
    if not beside.is_file():
        return [THRESHOLD] * len(labels), (
            f"{THRESHOLD} for every label (no thresholds.json next to the checkpoint: "
            f"run python -m chest_mnist.evaluate, or give thresholds=PATH)"
        )
    tuned = read_thresholds(beside, labels)
    if tuned.weights_sha256 == digest:
        return list(tuned.labels.values()), f"tuned on validation ({beside})"
    why = (
        f"{beside} was tuned for other weights ({tuned.checkpoint or 'in no checkpoint file'}), "
        f"not {ckpt_path.name}"
        if tuned.weights_sha256
        else f"{beside} does not say which weights it was tuned for"
    )
    print(
        f"warning: {why}: every label at {THRESHOLD}. To use those thresholds anyway, give "
        f"thresholds={beside}; for this checkpoint's own, python -m chest_mnist.evaluate "
        f"ckpt_path={ckpt_path}, then thresholds=<its report>/thresholds.json.",
        file=sys.stderr,
    )
    return [THRESHOLD] * len(labels), f"{THRESHOLD} for every label ({why})"


def predicted_labels(
    scores: list[float], labels: list[str], thresholds: list[float] | None, task: Task
) -> list[str]:
    """The labels whose score is above their threshold (as in the report), or the arg-max class.
    In float64, as Python compares the floats of the scores and of thresholds.json."""
    scores = torch.tensor([scores], dtype=torch.float64)
    cuts = None if thresholds is None else torch.tensor(thresholds, dtype=torch.float64)
    chosen = task.predicted(scores, cuts)[0].tolist()
    return [label for label, on in zip(labels, chosen, strict=True) if on]


def write_output(
    path: Path,
    fmt: str,
    items: list[Item],
    labels: list[str],
    thresholds: list[float] | None,
    source: str,
    checkpoint: Path,
    task: Task,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for item in items:
        row = {"path": item.path, "error": item.error or ""}
        if item.error is None:
            row |= {f"p_{label}": s for label, s in zip(labels, item.scores, strict=True)}
            row["predicted"] = ";".join(predicted_labels(item.scores, labels, thresholds, task))
        rows.append(row)
    if fmt == "json":
        document = {
            "checkpoint": str(checkpoint),
            "labels": labels,
            "thresholds": None
            if thresholds is None
            else dict(zip(labels, thresholds, strict=True)),
            "thresholds_from": source,
            "predictions": [
                {
                    "path": item.path,
                    "error": item.error,
                    "probabilities": None
                    if item.error
                    else dict(zip(labels, item.scores, strict=True)),
                    "predicted": None
                    if item.error
                    else predicted_labels(item.scores, labels, thresholds, task),
                }
                for item in items
            ],
        }
        path.write_text(json.dumps(document, indent=2) + "\n")
        return
    columns = ["path", *(f"p_{label}" for label in labels), "predicted", "error", "thresholds"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(row | {"thresholds": source} for row in rows)


def _inputs(value) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | ListConfig | tuple):
        return [str(v) for v in value]
    raise UserError(f"inputs={value!r} must be a path or a list of paths: inputs=[a.png,folder/]")


def predict(cfg: DictConfig) -> dict:
    """Predict every input; write the output file; return a summary (rows, failures, output)."""
    inputs, output = check_request(cfg)
    ckpt_path, model, data = load_model(cfg.ckpt_path)
    labels = list(model.hparams.labels)
    thresholds, source = choose_thresholds(
        cfg.get("thresholds"),
        ckpt_path,
        weights_digest(model.state_dict()),
        labels,
        model.kind,
    )
    device = resolve_device(cfg.device)
    flag = data["flag"]
    items = collect(inputs, data["size"], INFO[flag]["n_channels"], flag, cfg.split)
    score_items(model, items, data, cfg.batch_size, device)
    write_output(output, cfg.format, items, labels, thresholds, source, ckpt_path, model.kind)
    failed = [item for item in items if item.error is not None]
    for item in failed:
        print(f"error: {item.path}: {item.error}", file=sys.stderr)
    predicted = len(items) - len(failed)
    print(
        f"Predicted {predicted} images ({', '.join(labels) if len(labels) < 5 else f'{len(labels)} labels'}), "
        f"{len(failed)} failed; thresholds: {source}. Wrote {output}",
        file=sys.stderr,
    )
    return {"output": output, "predicted": predicted, "failed": len(failed)}


def check_request(cfg: DictConfig) -> tuple[list[str], Path]:
    """(inputs, output file) of a valid request; a UserError for the first option that is
    wrong, before the checkpoint is loaded."""
    if not cfg.get("ckpt_path"):
        raise UserError(
            "ckpt_path is missing: python -m chest_mnist.predict "
            "ckpt_path=<run>/checkpoints/<file>.ckpt inputs=[image.png,folder/]"
        )
    inputs = _inputs(cfg.get("inputs"))
    if not inputs:
        raise UserError(
            "inputs is empty: give image files, folders or npz files, inputs=[a.png,dir/]"
        )
    fmt = cfg.format
    if fmt not in ("csv", "json"):
        raise UserError(f"format={fmt!r} must be csv or json.")
    if cfg.split not in SPLITS:
        raise UserError(f"split={cfg.split!r} must be one of {', '.join(SPLITS)} (for npz inputs).")
    if not isinstance(cfg.batch_size, int) or cfg.batch_size < 1:
        raise UserError(f"batch_size={cfg.batch_size!r} must be a positive whole number.")
    output = Path(cfg.output or Path(cfg.paths.output_dir) / f"predictions.{fmt}").expanduser()
    if output.exists():
        raise UserError(
            f"output={output} already exists; it was left as it is. Choose another output."
        )
    return inputs, output


def score_items(
    model: MedMNISTClassifier, items: list[Item], data: dict, batch_size: int, device: torch.device
) -> None:
    """Each item that has pixels gets its scores (one probability per label), normalised with
    the checkpoint's data config `data` (its mean and std)."""
    good = [item for item in items if item.error is None]
    if not good:
        return
    scores = predict_scores(
        model,
        np.stack([item.pixels for item in good]),
        data["mean"],
        data["std"],
        batch_size=batch_size,
        device=device,
    )
    for item, row in zip(good, scores.tolist(), strict=True):
        item.scores = row


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    summary = report_user_errors(lambda: predict(cfg))
    if summary["failed"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
