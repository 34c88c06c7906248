"""Grad-CAM heatmaps: where in an image the model found the evidence for one of its findings.

    maps = heatmaps(model, pixels, mean, std, outputs=[labels.index("cardiomegaly")])  # (N, 1, H, W)
    picture = overlay(pixels[0], maps[0, 0])  # RGB uint8, upscaled to be seen

Grad-CAM (Selvaraju et al., https://arxiv.org/abs/1610.02391): the activations of the
ResNet-18's last convolutional stage, weighted per channel by the mean gradient of the
finding's logit (the sigmoid task's label logit, the softmax task's class logit), summed, ReLU,
upsampled bilinearly to the image and scaled to [0, 1] per map. Computed by Captum's
`LayerGradCam` and `LayerAttribution.interpolate`, not by hand. Captum rather than
pytorch-grad-cam (grad-cam on PyPI): both install here and give the same maps (checked to
1e-6 against pytorch-grad-cam's `GradCAM`, whose per-map min-max scaling we follow), but
Captum is PyTorch's own attribution library, a wheel with no new dependency, while grad-cam
is an sdist that pulls in OpenCV (~150 MB) and ttach. Captum has no Grad-CAM++ or Eigen-CAM;
the gradient variants it does have (gradient x activation, i.e. HiResCAM) equal Grad-CAM on
`layer4`, which only global pooling and a linear head follow, so Grad-CAM is the one method.

The stage is `layer4` unless its feature map is smaller than MIN_SIDE on a side: then the
deepest stage that is not (the ImageNet stem shrinks a 28px image to 1x1 at `layer4`, a map
with nothing in it; the cifar stem keeps 4x4 there). The model runs in eval mode, in float32
(bf16 gradients are coarse); its weights are not changed and no `.grad` is left on them
(Captum takes the gradient with `torch.autograd.grad`, which accumulates nothing). With
`tta_flip` the score averages the image and its mirror: so does the heatmap.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam
from matplotlib import colormaps
from PIL import Image
from torch import nn

from chest_mnist.batches import to_model_input

STAGES = ("layer4", "layer3", "layer2")  # the deepest first
MIN_SIDE = 4  # px of a stage's feature map: a 1x1 or 2x2 map cannot say where
SHOWN_SIDE = 224  # px: a smaller image is upscaled to at least this to be looked at
ALPHA = 0.4  # the heatmap's share of each pixel in an overlay
COLORMAP = "jet"  # Grad-CAM's usual: red is where the evidence is


def target_layer(
    model: nn.Module, size: int | tuple[int, int], device: torch.device | str = "cpu"
) -> nn.Module:
    """The stage of `model.backbone` whose activations Grad-CAM weighs, for inputs of `size`
    px (or (height, width)): the deepest of STAGES whose feature map is at least MIN_SIDE px on
    each side."""
    height, width = (size, size) if isinstance(size, int) else size
    backbone = model.backbone
    sides: dict[str, int] = {}
    hooks = [
        getattr(backbone, name).register_forward_hook(
            lambda _m, _i, out, name=name: sides.__setitem__(name, min(out.shape[-2:]))
        )
        for name in STAGES
    ]
    try:
        with torch.no_grad():  # forward, not __call__: a compiled backbone (model.compile)
            backbone.forward(torch.zeros(1, 3, height, width, device=device))  # stays eager
    finally:
        for hook in hooks:
            hook.remove()
    name = next((name for name in STAGES if sides[name] >= MIN_SIDE), STAGES[-1])
    return getattr(backbone, name)


def heatmaps(
    model: nn.Module,
    pixels: np.ndarray,
    mean: float,
    std: float,
    outputs: list[int] | np.ndarray,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
) -> np.ndarray:
    """Heatmaps (N, K, H, W), float32 in [0, 1], at the images' resolution, for uint8 images
    `pixels` (N, H, W) gray or (N, H, W, 3) colour as predict reads them, normalised with the
    checkpoint's `mean` and `std` as in training. `outputs`: K output indices (labels, or the
    classes of a softmax task) for every image, or an (N, K) array, each image its own.
    A map with no positive evidence at all is all zeros. `batch_size` (image, output) pairs
    go through the model at a time."""
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim not in (3, 4):
        raise ValueError(
            f"pixels must be uint8 (N, H, W) or (N, H, W, 3), not {pixels.dtype} {pixels.shape}"
        )
    n, height, width = pixels.shape[:3]
    outputs = np.asarray(outputs, dtype=np.int64)
    if outputs.ndim == 1:
        outputs = np.broadcast_to(outputs, (n, len(outputs)))
    if outputs.ndim != 2 or len(outputs) != n:
        raise ValueError(f"outputs must be (K,) or ({n}, K) output indices, not {outputs.shape}")
    k = outputs.shape[1]
    if n == 0 or k == 0:
        return np.zeros((n, k, height, width), np.float32)
    device = torch.device(device)
    was_training = model.training
    model.to(device).eval()
    try:
        layer = target_layer(model, (height, width), device)
        gradcam = LayerGradCam(model, layer)
        # one row per (image, output) pair: Captum takes one target per input row
        images = np.repeat(np.arange(n), k)
        maps = []
        # the caller may be under no_grad or inference_mode: Grad-CAM needs gradients, and
        # tensors made outside inference mode (an inference tensor cannot enter autograd)
        with torch.inference_mode(False), torch.enable_grad():
            targets = torch.tensor(outputs.reshape(-1))
            for start in range(0, len(images), batch_size):
                batch = torch.from_numpy(pixels[images[start : start + batch_size]]).to(device)
                x = to_model_input(batch, mean, std)
                target = targets[start : start + batch_size].to(device)
                cam = _gradcam(gradcam, x, target, (height, width))
                if getattr(getattr(model, "hparams", None), "tta_flip", False):
                    cam = (
                        cam + _gradcam(gradcam, x.flip(-1), target, (height, width)).flip(-1)
                    ) / 2
                maps.append(_scaled(cam).cpu())
    finally:
        model.train(was_training)
    return torch.cat(maps).reshape(n, k, height, width).numpy()


def _gradcam(
    gradcam: LayerGradCam, x: torch.Tensor, target: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """(B, H, W) Grad-CAM of each row's target output, upsampled to `size`, not yet scaled."""
    cam = gradcam.attribute(x, target=target, relu_attributions=True)
    return LayerAttribution.interpolate(cam, size, interpolate_mode="bilinear")[:, 0].detach()


def _scaled(cam: torch.Tensor) -> torch.Tensor:
    """Each map to [0, 1] by its own minimum and maximum, as pytorch-grad-cam's
    `scale_cam_image` does: a map says where, the probability says how sure."""
    cam = cam.float() - cam.amin(dim=(1, 2), keepdim=True)
    return cam / (cam.amax(dim=(1, 2), keepdim=True) + 1e-7)


def enlarged(pixels: np.ndarray, min_side: int = SHOWN_SIDE) -> Image.Image:
    """One uint8 image (H, W) or (H, W, 3) enlarged by the whole factor that brings its longer
    side to at least `min_side`, each pixel a square (nearest neighbour: nothing invented)."""
    height, width = pixels.shape[:2]
    scale = max(1, math.ceil(min_side / max(height, width)))
    image = Image.fromarray(np.ascontiguousarray(pixels))
    return image.resize((width * scale, height * scale), Image.Resampling.NEAREST)


def overlay(
    pixels: np.ndarray,
    heatmap: np.ndarray,
    alpha: float = ALPHA,
    colormap: str = COLORMAP,
    min_side: int = SHOWN_SIDE,
) -> np.ndarray:
    """RGB uint8 picture of one image (H, W) or (H, W, 3) uint8 with its `heatmap` (H, W) in
    [0, 1] blended over it in `colormap` at `alpha`. An image smaller than `min_side` is
    enlarged by a whole factor: its pixels as squares (nearest neighbour, nothing invented),
    the heatmap smoothly (bilinear), as it is an interpolated map anyway."""
    if pixels.shape[:2] != heatmap.shape:
        raise ValueError(f"image {pixels.shape[:2]} and heatmap {heatmap.shape} differ in size")
    shown = enlarged(pixels, min_side)
    size = shown.size
    image = np.asarray(shown.convert("RGB"), dtype=np.float32)
    heat = Image.fromarray(np.ascontiguousarray(heatmap, dtype=np.float32))  # mode "F"
    heat = np.clip(np.asarray(heat.resize(size, Image.Resampling.BILINEAR)), 0.0, 1.0)
    colour = colormaps[colormap](heat)[..., :3] * 255.0
    return np.rint((1 - alpha) * image + alpha * colour).astype(np.uint8)


def safe_name(text: str, limit: int = 80) -> str:
    """`text` as part of a file name on any system: runs of other characters than letters,
    digits, '.', '-' and '_' become one '_' (`scan.npz:test[3]` -> `scan.npz_test_3`)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_.")[:limit] or "image"


def write_overlays(
    model: nn.Module,
    pixels: np.ndarray,
    outputs: list[list[int]],
    names: list[str],
    labels: list[str],
    folder: Path,
    mean: float,
    std: float,
    device: torch.device | str = "cpu",
    chunk: int = 64,
) -> list[list[Path]]:
    """For each image i, one PNG overlay per output in `outputs[i]`, named
    `<names[i]>_<label>.png` (made safe) in `folder`, which must exist; never over a file.
    Returns each image's files. The heatmaps of `chunk` (image, output) pairs at a time: no
    more of them are held, however many images there are."""
    files: list[list[Path]] = [[] for _ in names]
    pairs = [(i, k) for i, wanted in enumerate(outputs) for k in wanted]
    for start in range(0, len(pairs), chunk):
        part = pairs[start : start + chunk]
        index = np.array([i for i, _ in part])
        maps = heatmaps(
            model, pixels[index], mean, std, np.array([[k] for _, k in part]), device=device
        )
        for (i, k), heatmap in zip(part, maps[:, 0], strict=True):
            path = folder / f"{safe_name(names[i])}_{safe_name(labels[k])}.png"
            with open(path, "xb") as f:  # "x": an existing file is an error, not overwritten
                Image.fromarray(overlay(pixels[i], heatmap)).save(f, format="PNG")
            files[i].append(path)
    return files
