"""A trained model in Python, as predict and the web page use it: one checkpoint loaded once,
with the thresholds and temperatures predict would use, and one file at a time analysed into
its probabilities, predicted labels and Grad-CAM heatmaps.

    from chest_mnist.analyser import Analyser

    analyser = Analyser("logs/train/runs/<run>")      # a run means its best checkpoint
    result = analyser.analyse("xray.png")             # PNG to DICOM, as predict reads them
    result.probabilities, result.predicted, result.note, result.error
    analyser.heatmap(result.pixels, "effusion")       # (H, W) in [0, 1]
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from medmnist import INFO

from chest_mnist import cam
from chest_mnist.checkpoints import load_model, weights_digest
from chest_mnist.cli import resolve_device
from chest_mnist.predict import predict_scores, predicted_labels, read_item
from chest_mnist.tuned import choose_tuned


@dataclass
class Analysis:
    """One file: the pixels the model saw, a probability per label (the model's order), the
    labels predicted at the thresholds, what reading converted, or why it could not be used."""

    name: str
    pixels: np.ndarray | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    predicted: list[str] = field(default_factory=list)
    note: str = ""
    error: str | None = None


class Analyser:
    """A checkpoint loaded once, with the thresholds and temperatures predict would use."""

    def __init__(self, ckpt_path: str | Path, thresholds: str | None = None, device="auto"):
        self.checkpoint, self.model, self.data = load_model(ckpt_path)
        self.labels = list(self.model.hparams.labels)
        tuned = choose_tuned(
            thresholds,
            self.checkpoint,
            weights_digest(self.model.state_dict()),
            self.labels,
            self.model.task,
        )
        values, self.temperature = tuned.thresholds, tuned.temperature
        self.thresholds_from, self.calibration_from = tuned.thresholds_from, tuned.calibration_from
        # None for a multi-class model: it predicts its arg-max class
        self.thresholds = None if values is None else dict(zip(self.labels, values, strict=True))
        self.device = resolve_device(device)
        self.model.to(self.device).eval()
        self.channels = INFO[self.data["flag"]]["n_channels"]
        # Gradio runs events in threads; Grad-CAM hooks a layer while it runs, so a forward
        # pass of another event meanwhile would spoil its map: one use of the model at a time
        self.lock = threading.Lock()

    def analyse(self, path: str | Path) -> Analysis:
        """Probabilities and decisions for one file; a file that cannot be read gets its
        reason in `error`, never an exception (the page goes on with the other files)."""
        path = Path(path)
        item = read_item(path, self.data["size"], self.channels)
        if item.error is not None:
            return Analysis(path.name, error=item.error)
        with self.lock:
            scores = predict_scores(
                self.model,
                np.stack([item.pixels]),
                self.data["mean"],
                self.data["std"],
                device=self.device,
                temperature=self.temperature,
            )[0].tolist()
        thresholds = None if self.thresholds is None else list(self.thresholds.values())
        return Analysis(
            path.name,
            pixels=item.pixels,
            probabilities=dict(zip(self.labels, scores, strict=True)),
            predicted=predicted_labels(scores, self.labels, thresholds, self.model.task),
            note=item.converted,
        )

    def heatmap(self, pixels: np.ndarray, label: str) -> np.ndarray:
        """The Grad-CAM heatmap (H, W) in [0, 1] of `label` on one image; all zeros where the
        model found no evidence for it (`chest_mnist.cam`)."""
        with self.lock:
            maps = cam.heatmaps(
                self.model,
                np.stack([pixels]),
                self.data["mean"],
                self.data["std"],
                [self.labels.index(label)],
                device=self.device,
            )
        return maps[0, 0]

    def api_result(self, path: str) -> dict:
        """What `/predict` answers: predict's JSON row for one file, with the thresholds."""
        analysis = self.analyse(path)
        return {
            "file": analysis.name,  # not "path": gradio_client would take the dict for a file
            "error": analysis.error,
            "probabilities": None if analysis.error else analysis.probabilities,
            "predicted": None if analysis.error else analysis.predicted,
            "thresholds": self.thresholds,
            "thresholds_from": self.thresholds_from,
            "calibration_from": self.calibration_from,
            "note": analysis.note,
        }
