"""Predict with a trained checkpoint on image files, folders of them, or MedMNIST npz files.

    python -m chest_mnist.predict ckpt_path=<run> inputs=[xray.png,scans/]   # the run's best checkpoint
    python -m chest_mnist.predict ckpt_path=<run>/checkpoints/<file>.ckpt inputs=[xray.png]
    python -m chest_mnist.predict ckpt_path=... inputs=[data/chestmnist.npz] split=test
    python -m chest_mnist.predict ckpt_path=... inputs=[scans/] format=json output=preds.json

Each image is made what the model was trained on (`chest_mnist.images.read_image`): read with
Pillow, or pydicom for DICOM, brought to 8 bits (a DICOM's rescale and first window, else the
full range of a 16-bit or DICOM image; MONOCHROME1 inverted; a fully opaque alpha channel
dropped), gray (or RGB for a colour dataset), center-cropped to a square and resized to the
checkpoint's `data.size` when it is not that size already (bicubic: medmnist.INFO says "resize"
without naming the filter), then normalised on the device exactly as in training
(`chest_mnist.batches.to_model_input`). What was converted is in the output's `converted`.
The output has one row per image: its path, one
probability per label, and the labels predicted at the per-label thresholds that evaluation
tuned on validation for these very weights (`<run>/report/thresholds.json`, found next to the
checkpoint, names the weights it was tuned for); for other weights (`last.ckpt` after a later
best epoch, say) or without that file the threshold is 0.5, and the output says why.
`thresholds=PATH` uses that file's thresholds whatever they were tuned for. When the report
scaled the scores first (`calibration=temperature`), the same file holds the temperatures, and
the probabilities are of the logits divided by them: both from one file, or neither
(`tuned.choose_tuned`). A multi-class
model predicts its arg-max class and has no thresholds: the decision rule is the checkpoint's
task's (`MedMNISTClassifier.task`, task.py).

`cam=true` also draws, per image, a Grad-CAM heatmap (chest_mnist/cam.py) over it for each
predicted finding (`cam_top_k=K`: the K most probable), as PNGs in `<output stem>_cam/`, which
the output's `cam` column names.

A file that cannot be used (not an image, truncated, empty, missing, transparent pixels, CMYK,
a multi-frame or compressed DICOM without its decoder, a folder with no images, an npz of
another dataset) gets its own row with the reason, and a
line on stderr; every other file is still predicted. Exit code 1 when any input failed, 2 for
a usage error (no checkpoint, bad thresholds file, an output file that already exists).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import numpy as np
import torch
from medmnist import INFO
from omegaconf import DictConfig, ListConfig

from chest_mnist import UserError
from chest_mnist.batches import to_model_input
from chest_mnist.cam import write_overlays
from chest_mnist.checkpoints import load_model, weights_digest
from chest_mnist.cli import freeze_for_exit, report_user_errors, resolve_device
from chest_mnist.config import register
from chest_mnist.images import IMAGE_SUFFIXES, is_image_file, read_image
from chest_mnist.model import MedMNISTClassifier
from chest_mnist.npz import SPLITS, open_npz, read_split
from chest_mnist.run_files import ckpt_path_given
from chest_mnist.task import Task
from chest_mnist.tuned import choose_tuned

log = logging.getLogger(__name__)
register()  # before Hydra composes the config (hydra.run.dir uses the resolvers)


@dataclass
class Item:
    """One row of the output: an image to predict, or an input that failed."""

    path: str
    pixels: np.ndarray | None = None
    error: str | None = None
    scores: list[float] = field(default_factory=list)
    converted: str = ""  # what reading it changed to get 8-bit pixels (images.read_image's note)
    cam: list[str] = field(default_factory=list)  # its heatmaps, relative to the output


def collect(inputs: list[str], size: int, channels: int, flag: str, split: str) -> list[Item]:
    """Every input as rows: image files, the images of folders (recursively, sorted), the
    `split` images of MedMNIST npz files. Failures become rows with an error."""
    items: list[Item] = []
    for name in inputs:
        path = Path(name).expanduser()
        if not path.exists():
            items.append(Item(name, error="no such file or folder"))
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if not _hidden(p, path) and is_image_file(p))
            if not files:
                items.append(
                    Item(
                        name,
                        error=f"folder with no images ({', '.join(IMAGE_SUFFIXES)}, or DICOM "
                        f"files of any name)",
                    )
                )
            items.extend(read_item(p, size, channels) for p in files)
        elif path.suffix.lower() == ".npz":
            try:
                with open_npz(path) as npz:  # that split only: not the other two's arrays
                    images, _ = read_split(npz, path, split, flag, size)
            except UserError as e:  # its message starts with the file's name: the row has it
                items.append(Item(name, error=str(e).removeprefix(str(path)).lstrip(": ")))
                continue
            items.extend(Item(f"{name}:{split}[{i}]", pixels=p) for i, p in enumerate(images))
        else:
            items.append(read_item(path, size, channels))
    return items


def _hidden(path: Path, folder: Path) -> bool:
    """Whether a file found in `folder` is hidden, or in a hidden folder below it: macOS's
    `._xray.png` copies of metadata, `.ipynb_checkpoints/`, `.git/` are not the user's images."""
    return any(part.startswith(".") for part in path.relative_to(folder).parts)


def read_item(path: Path, size: int, channels: int) -> Item:
    """One image file as a row: its pixels and what reading converted, or why it cannot be
    used (any reader's error is this file's problem, not the run's)."""
    try:
        pixels, converted = read_image(path, size, channels)
        return Item(str(path), pixels=pixels, converted=converted)
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
    temperature: torch.Tensor | None = None,
) -> torch.Tensor:
    """Probabilities (N, labels) for uint8 images (N, H, W[, C]), in batches on `device`, with
    the same input conversion as training; bf16 autocast on a GPU, as in training. With
    `temperature` (`tuned.choose_tuned`), of the logits divided by it."""
    model = model.to(device).eval()
    device = torch.device(device)
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start : start + batch_size]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            x = to_model_input(batch, mean, std)
            out.append(model.probabilities(x, temperature).float().cpu())
    return torch.cat(out) if out else torch.empty(0, len(model.hparams.labels))


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
    sources: dict[str, str],
    checkpoint: Path,
    task: Task,
    cam: bool = False,
) -> None:
    """The output file. `sources`: where the "thresholds" and the "calibration" come from (a
    column each in CSV, "thresholds_from" and "calibration_from" in JSON); with `cam`, a
    `cam` column (a "cam" list in JSON) naming each row's heatmap files."""
    if fmt == "json":
        document = {
            "checkpoint": str(checkpoint),
            "labels": labels,
            "thresholds": None
            if thresholds is None
            else dict(zip(labels, thresholds, strict=True)),
            "thresholds_from": sources["thresholds"],
            "calibration_from": sources["calibration"],
            "predictions": [_json_row(item, labels, thresholds, task, cam) for item in items],
        }
        text = json.dumps(document, indent=2) + "\n"
    else:
        columns = ["path", *(f"p_{label}" for label in labels), "predicted"]
        columns += [*(["cam"] if cam else []), "error", "converted", "thresholds", "calibration"]
        out = io.StringIO(newline="")
        writer = csv.DictWriter(out, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(_csv_row(item, labels, thresholds, task, cam) | sources for item in items)
        text = out.getvalue()
    # whole or not at all (beside it, then renamed); a file name that is not UTF-8 (a Latin-1
    # zip's) keeps its undecodable bytes as \udcXX escapes, as JSON writes them
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8", errors="backslashreplace", newline="")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _csv_row(
    item: Item, labels: list[str], thresholds: list[float] | None, task: Task, cam: bool
) -> dict:
    row = {"path": item.path, "error": item.error or "", "converted": item.converted}
    if item.error is None:
        row |= {f"p_{label}": s for label, s in zip(labels, item.scores, strict=True)}
        row["predicted"] = ";".join(predicted_labels(item.scores, labels, thresholds, task))
    if cam:
        row["cam"] = ";".join(item.cam)
    return row


def _json_row(
    item: Item, labels: list[str], thresholds: list[float] | None, task: Task, cam: bool
) -> dict:
    failed = item.error is not None
    row = {
        "path": item.path,
        "error": item.error,
        "converted": item.converted,
        "probabilities": None if failed else dict(zip(labels, item.scores, strict=True)),
        "predicted": None if failed else predicted_labels(item.scores, labels, thresholds, task),
    }
    if cam:
        row["cam"] = None if failed else item.cam
    return row


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
    tuned = choose_tuned(
        cfg.get("thresholds"), ckpt_path, weights_digest(model.state_dict()), labels, model.task
    )
    thresholds, source, calibration = (
        tuned.thresholds,
        tuned.thresholds_from,
        tuned.calibration_from,
    )
    device = resolve_device(cfg.device)
    flag = data["flag"]
    items = collect(inputs, data["size"], INFO[flag]["n_channels"], flag, cfg.split)
    score_items(model, items, data, cfg.batch_size, device, tuned.temperature)
    if cfg.cam:
        write_heatmaps(model, items, data, thresholds, cam_folder(output), cfg.cam_top_k, device)
    write_output(
        output,
        cfg.format,
        items,
        labels,
        thresholds,
        {"thresholds": source, "calibration": calibration},
        ckpt_path,
        model.task,
        cfg.cam,
    )
    failed = [item for item in items if item.error is not None]
    for item in failed:
        print(f"error: {item.path}: {item.error}", file=sys.stderr)
    predicted = len(items) - len(failed)
    print(
        f"Predicted {predicted} images ({', '.join(labels) if len(labels) < 5 else f'{len(labels)} labels'}), "
        f"{len(failed)} failed; thresholds: {source}; calibration: {calibration}. Wrote {output}"
        + (
            f" and {sum(len(item.cam) for item in items)} heatmaps in {cam_folder(output)}"
            if cfg.cam
            else ""
        ),
        file=sys.stderr,
    )
    return {"output": output, "predicted": predicted, "failed": len(failed)}


def check_request(cfg: DictConfig) -> tuple[list[str], Path]:
    """(inputs, output file) of a valid request; a UserError for the first option that is
    wrong, before the checkpoint is loaded."""
    if not ckpt_path_given(cfg.get("ckpt_path")):
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
    given = cfg.get("output")
    given = None if given in (None, "") else str(given)  # output=1 is a name too
    if given is not None and given.endswith(("/", "\\")):
        raise UserError(
            f"output={given} names a folder: give a file, e.g. output={given}predictions.{fmt}"
        )
    output = Path(given or Path(cfg.paths.output_dir) / f"predictions.{fmt}").expanduser()
    if output.exists():
        raise UserError(
            f"output={output} already exists; it was left as it is. Choose another output."
        )
    if output.suffix.lower() in (".csv", ".json") and output.suffix.lower() != f".{fmt}":
        raise UserError(
            f"output={output} ends in {output.suffix} but format={fmt}: give "
            f"format={output.suffix.lower()[1:]}, or an output ending in .{fmt}."
        )
    if not isinstance(cfg.get("cam"), bool):
        raise UserError(f"cam={cfg.get('cam')!r} must be true or false.")
    top_k = cfg.get("cam_top_k")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise UserError(f"cam_top_k={top_k!r} must be a positive whole number or null.")
    if top_k is not None and not cfg.get("cam"):
        raise UserError(f"cam_top_k={top_k} chooses which heatmaps to draw: add cam=true.")
    if cfg.get("cam") and cam_folder(output).exists():
        raise UserError(
            f"The heatmap folder {cam_folder(output)} already exists; it was left as it is. "
            f"Choose another output, or move that folder."
        )
    _check_writable(output)
    return inputs, output


def _check_writable(output: Path) -> None:
    """A UserError, before any image is read, when `output` cannot be written: its folder is
    made (as the writing would) and a file tried in it."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=output.parent).close()
    except OSError as e:
        raise UserError(
            f"output={output} cannot be written ({e.strerror}: {e.filename or output.parent}). "
            f"Choose another output."
        ) from None


def score_items(
    model: MedMNISTClassifier,
    items: list[Item],
    data: dict,
    batch_size: int,
    device: torch.device,
    temperature: torch.Tensor | None = None,
) -> None:
    """Each item that has pixels gets its scores (one probability per label), normalised with
    the checkpoint's data config `data` (its mean and std), scaled by `temperature` if any."""
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
        temperature=temperature,
    )
    for item, row in zip(good, scores.tolist(), strict=True):
        item.scores = row


def cam_folder(output: Path) -> Path:
    """Where `cam=true` writes its heatmaps: `<output stem>_cam/` beside the output file."""
    return output.with_name(f"{output.stem}_cam")


def cam_outputs(
    scores: list[float], labels: list[str], thresholds: list[float] | None, task: Task, top_k
) -> list[int]:
    """The outputs to draw a heatmap of: the predicted ones (the output's `predicted`), or the
    `top_k` most probable, most probable first."""
    if top_k is not None:
        return np.argsort(-np.asarray(scores), kind="stable")[:top_k].tolist()
    chosen = set(predicted_labels(scores, labels, thresholds, task))
    return [k for k, label in enumerate(labels) if label in chosen]


def write_heatmaps(
    model: MedMNISTClassifier,
    items: list[Item],
    data: dict,
    thresholds: list[float] | None,
    folder: Path,
    top_k: int | None,
    device: torch.device,
) -> None:
    """`cam=true`: into the new `folder`, one overlay PNG per (image, finding) (cam.py), named
    after the row's number and input and the finding; each item's `cam` lists its files,
    relative to the output's folder. Rows that failed get none."""
    folder.mkdir(parents=True)
    labels = list(model.hparams.labels)
    width = len(str(len(items)))  # 0-padded row numbers: the files sort in the output's order
    good = [(row, item) for row, item in enumerate(items) if item.error is None]
    if not good:
        return
    files = write_overlays(
        model,
        np.stack([item.pixels for _, item in good]),
        [cam_outputs(item.scores, labels, thresholds, model.task, top_k) for _, item in good],
        [f"{row:0{width}d}_{Path(item.path).name}" for row, item in good],
        labels,
        folder,
        data["mean"],
        data["std"],
        device=device,
    )
    for (_, item), written in zip(good, files, strict=True):
        item.cam = [f"{folder.name}/{path.name}" for path in written]


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    summary = report_user_errors(lambda: predict(cfg))
    if summary["failed"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
    freeze_for_exit()
