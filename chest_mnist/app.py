"""A local web page on a trained checkpoint: drop X-ray files, see for each one what the model
saw, every label's probability next to its tuned threshold, the predicted findings, and a
heatmap of the finding you pick. Not for clinical use.

    python -m chest_mnist.app ckpt_path=<run>                     # http://127.0.0.1:7860
    python -m chest_mnist.app ckpt_path=<run>/checkpoints/<file>.ckpt port=8000 device=cpu

The numbers are predict's, through predict's code: the same checkpoint loading, thresholds
and temperatures (calibration=temperature), image reading, probabilities and decisions
(`chest_mnist.analyser.Analyser`, the model in Python, testable without a browser).
The page binds to this machine only unless `host=0.0.0.0`, and loads nothing from the internet.
Its probabilities are also an API (Gradio's own):

    from gradio_client import Client, handle_file
    Client("http://127.0.0.1:7860/").predict(handle_file("xray.png"), api_name="/predict")
"""

from __future__ import annotations

import gradio as gr
import hydra
import numpy as np
from matplotlib.figure import Figure
from omegaconf import DictConfig

from chest_mnist import UserError, cam
from chest_mnist.analyser import Analyser, Analysis
from chest_mnist.cli import report_user_errors
from chest_mnist.run_files import ckpt_path_given

NOT_CLINICAL = (
    "**Not for clinical use.** A research model trained on MedMNIST's small images: its "
    "output is not a diagnosis and was not validated on patients."
)
SHOWN_HEIGHT = 240  # px on the page for the image and its heatmap


def by_probability(analysis: Analysis) -> list[str]:
    return sorted(analysis.probabilities, key=analysis.probabilities.get, reverse=True)


def bar_chart(analysis: Analysis, thresholds: dict[str, float] | None) -> Figure:
    """Horizontal bars, most probable on top; predicted findings in red; each label's
    threshold as a black tick."""
    order = by_probability(analysis)[::-1]  # barh draws bottom-up
    figure = Figure(figsize=(5, 1.4 + 0.3 * len(order)), layout="constrained")
    axes = figure.subplots()
    colours = ["tab:red" if label in analysis.predicted else "tab:gray" for label in order]
    axes.barh(order, [analysis.probabilities[label] for label in order], color=colours)
    if thresholds is not None:
        axes.scatter(
            [thresholds[label] for label in order], order, marker="|", s=300, color="black"
        )
    axes.set_xlim(0, 1)
    axes.set_xlabel("probability (| threshold; red: predicted)")
    return figure


def table(analysis: Analysis, thresholds: dict[str, float] | None) -> str:
    """The numbers as a Markdown table, most probable first, to 4 decimals."""
    rows = ["| finding | probability | threshold | predicted |", "|---|---:|---:|:---:|"]
    for label in by_probability(analysis):
        cut = "arg-max" if thresholds is None else f"{thresholds[label]:.4f}"
        mark = "yes" if label in analysis.predicted else ""
        rows.append(f"| {label} | {analysis.probabilities[label]:.4f} | {cut} | {mark} |")
    return "\n".join(rows)


def page(analyser: Analyser) -> gr.Blocks:
    """The page: an upload box, then one panel per file. Layout only; numbers come from
    `analyser`."""
    with gr.Blocks(title="chest_mnist", analytics_enabled=False) as demo:
        gr.Markdown(
            f"# X-ray findings: {analyser.data['flag']} model\n{NOT_CLINICAL}\n\n"
            f"Checkpoint `{analyser.checkpoint}`, on {analyser.device}. "
            f"Thresholds: {analyser.thresholds_from}. Calibration: {analyser.calibration_from}."
        )
        files = gr.File(file_count="multiple", label="X-ray files (drop one or more)")

        @gr.render(inputs=files)
        def results(paths: list[str] | None):
            for path in paths or []:
                panel(analyser, analyser.analyse(path))

        # the API only: one file in, its probabilities out (a hidden pair of components)
        api_file, api_json = gr.File(visible=False), gr.JSON(visible=False)
        api_file.upload(analyser.api_result, api_file, api_json, api_name="predict")
    return demo


def panel(analyser: Analyser, analysis: Analysis) -> None:
    """One file's results, or its error."""
    with gr.Column(variant="panel", elem_classes="result"):
        if analysis.error:
            gr.Markdown(
                f"### {analysis.name}\n**Cannot use this file:** {analysis.error}",
                elem_classes="file-error",
            )
            return
        found = ", ".join(analysis.predicted) or "nothing above its threshold"
        note = f"\n\nConverted: {analysis.note}" if analysis.note else ""
        gr.Markdown(f"### {analysis.name}\n**Predicted:** {found}{note}")
        with gr.Row(equal_height=False):
            gr.Image(
                cam.enlarged(analysis.pixels), label="What the model sees", height=SHOWN_HEIGHT
            )
            heatmap_view(analyser, analysis)
        with gr.Row(equal_height=False):
            gr.Plot(bar_chart(analysis, analyser.thresholds), label="Probabilities")
            gr.Markdown(table(analysis, analyser.thresholds), elem_classes="probabilities")


def heatmap_view(analyser: Analyser, analysis: Analysis) -> None:
    """A choice of finding (the most probable first), and its heatmap over the image."""
    order = by_probability(analysis)

    def draw(label: str) -> tuple[np.ndarray, str]:
        heatmap = analyser.heatmap(analysis.pixels, label)
        # an empty map is Grad-CAM's answer, not a failure: say so rather than show a blank
        empty = "" if heatmap.any() else f"Grad-CAM found no evidence for {label} in this image."
        return cam.overlay(analysis.pixels, heatmap), empty

    picture, empty = draw(order[0])
    with gr.Column():
        choice = gr.Radio(
            order, value=order[0], label="Heatmap of (click a finding)", interactive=True
        )
        image = gr.Image(
            picture, label="Where it looked (Grad-CAM)", height=SHOWN_HEIGHT, elem_classes="heatmap"
        )
        caption = gr.Markdown(empty, elem_classes="heatmap-note")
        choice.change(draw, choice, [image, caption], api_visibility="private")


def serve(cfg: DictConfig) -> None:
    if not ckpt_path_given(cfg.get("ckpt_path")):
        raise UserError("ckpt_path is missing: python -m chest_mnist.app ckpt_path=<run>")
    port = cfg.port
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise UserError(f"port={port!r} must be a whole number from 1 to 65535, e.g. port=7860.")
    analyser = Analyser(cfg.ckpt_path, cfg.get("thresholds"), cfg.device)
    try:
        page(analyser).launch(server_name=cfg.host, server_port=cfg.port, ssr_mode=False)
    except OSError as e:  # Gradio's message tells to edit launch(): ours names the options
        raise UserError(
            f"cannot serve on host={cfg.host} port={cfg.port}: the port is in use, or the host "
            f"is not an address of this machine. Choose another, e.g. port={cfg.port + 1}."
        ) from e


@hydra.main(version_base="1.3", config_path="conf", config_name="app")
def main(cfg: DictConfig) -> None:
    report_user_errors(lambda: serve(cfg))


if __name__ == "__main__":
    main()
