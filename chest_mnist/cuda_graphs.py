"""The network's training forward and backward as CUDA graphs, replayed at every step.

A training step of ResNet-18 at batch 128 on 28px images is a few hundred small kernels; on
a GPU, launching them one by one from Python costs more time than running them (issue 15:
about 10 ms of host time per step against well under 1 ms of GPU work). Here they are
recorded once, with `torch.cuda.make_graphed_callables`, and each step copies its batch into
the graph's input and replays the forward graph, then (in `loss.backward()`) the backward
graph: the same kernels and the same arithmetic, a handful of launches. Lightning still runs
the step (automatic optimisation, its hooks, the callbacks); the loss, the optimizer update
(fused: one kernel) and everything else run as before.

`model.cuda_graph`: auto (the default) captures on one CUDA GPU, without torch.compile (which
makes graphs of its own with mode=reduce-overhead) and without DDP (whose gradient all-reduce
runs in autograd hooks between the kernels) and without gradient accumulation; true asks for
it and says why when it cannot; false runs the plain step. The graph is captured at the first
full batch of a fit and dropped at its end; a batch of another shape (the last, partial one of
an epoch) and evaluation run the network eagerly.
"""

from __future__ import annotations

import torch
from torch import nn

from chest_mnist import UserError

SETTINGS = ("auto", True, False)


def check_setting(setting: bool | str) -> None:
    if setting not in SETTINGS:
        raise UserError(f"model.cuda_graph={setting!r} must be auto, true or false.")


def wanted(
    setting: bool | str,
    device: torch.device,
    world_size: int = 1,
    compiled: bool = False,
    accumulate_grad_batches: int = 1,
) -> bool:
    """Whether training should replay CUDA graphs, for `model.cuda_graph=setting`."""
    check_setting(setting)
    reasons = {
        "it needs a CUDA GPU (this run is on the CPU)": device.type != "cuda",
        "model.compile makes its own graphs (mode=reduce-overhead)": compiled,
        f"under DDP ({world_size} processes) the gradients are all-reduced between the "
        f"kernels": world_size > 1,
        # the graph hands its own gradient buffers to .grad, and the next replay overwrites them:
        # accumulated over steps, they would add up wrong (pytorch/pytorch#181723)
        f"trainer.accumulate_grad_batches={accumulate_grad_batches} adds gradients over "
        f"steps, which the graph's reused gradient buffers do not allow": accumulate_grad_batches
        != 1,
    }
    why_not = next((why for why, applies in reasons.items() if applies), None)
    if setting is True and why_not:
        raise UserError(
            f"model.cuda_graph=true, but {why_not}. Set model.cuda_graph=auto (graphs where "
            f"they apply) or false."
        )
    return setting is not False and why_not is None


class TrainingGraph:
    """`network`'s training forward and backward, captured for inputs shaped like `sample`
    (`network`: a module of the model's own layers, `chest_mnist.model.Network`).

    Capturing runs the forward a few times first (warm-up, as CUDA graphs need); that would
    move the batch-norm running statistics, so they are put back as they were: the first
    replay is then the same step the eager network would have taken. Autocast is kept as the
    caller has it (Lightning's bf16), without its weight cache, which graphs do not allow.
    """

    def __init__(self, network: nn.Module, sample: torch.Tensor):
        self.shape = sample.shape
        buffers = [buffer.detach().clone() for buffer in network.buffers()]
        device = sample.device.type
        with torch.autocast(
            device_type=device,
            dtype=torch.get_autocast_dtype(device),
            enabled=torch.is_autocast_enabled(device),
            cache_enabled=False,
        ):
            # its own copy of the sample becomes the graph's input, which each step overwrites
            self.graphed = torch.cuda.make_graphed_callables(network, (sample.detach().clone(),))
        with torch.no_grad():
            for buffer, saved in zip(network.buffers(), buffers, strict=True):
                buffer.copy_(saved)

    def fits(self, x: torch.Tensor) -> bool:
        return x.shape == self.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.graphed(x)
