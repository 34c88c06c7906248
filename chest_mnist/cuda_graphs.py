"""The training step as CUDA graphs, replayed at every step: the network's forward and backward
(model.cuda_graph=auto, the default), or the whole step (model.cuda_graph=step).

A training step of ResNet-18 at batch 128 on 28px images is a few hundred small kernels; on
a GPU, launching them one by one from Python costs more time than running them (issue 15:
about 10 ms of host time per step against well under 1 ms of GPU work). Here they are
recorded once, with `torch.cuda.make_graphed_callables`, and each step copies its batch into
the graph's input and replays the forward graph, then (in `loss.backward()`) the backward
graph: the same kernels and the same arithmetic, a handful of launches. Lightning still runs
the step (automatic optimisation, its hooks, the callbacks); the loss, the optimizer update
(fused: one kernel) and everything else run as before.

`model.cuda_graph`: auto (the default) captures on one CUDA GPU, without torch.compile, without
DDP (whose gradient all-reduce runs in autograd hooks between the kernels) and without gradient
accumulation; true asks for it and says why when it cannot; false runs the plain step. The
graph is captured at the first full batch of a fit and dropped at its end; a batch of another
shape (the last, partial one of an epoch) and evaluation run the network eagerly.

`model.cuda_graph=step` goes further where graphs apply (else it runs the plain step, as auto
does): the whole step, forward, loss, backward and the optimizer's update (capturable, the
learning rate read from a device tensor that follows the schedule), is one graph, replayed by
`training_step`, so the step's Python (autograd's engine, the optimizer) runs once, at the
capture (`StepGraph`). Lightning's loop and the callbacks' batch and epoch hooks still run
around it; the module skips the backward and the update, which the graph has done, and with
them the hooks that see gradients (on_before_optimizer_step; `.grad` is empty after the step).
It also takes a compiled network (`model.compile=true`, or a mode without graphs of its own:
not reduce-overhead or max-autotune): the graph then records inductor's kernels, and the
batches it does not take run the eager code, so that a run compiles once. Unless the run is
deterministic (or model.compile_in_background=false), a separate process compiles the network
meanwhile, the graph replays the network uncompiled until then, and the run then compiles it
from that process's caches and captures the step again (`chest_mnist.background_compile`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from chest_mnist import UserError

SETTINGS = ("auto", True, False, "step")
# torch.compile modes whose compiled code replays CUDA graphs of its own (inductor's cudagraphs)
GRAPHING_COMPILE_MODES = ("reduce-overhead", "max-autotune")


def check_setting(setting: bool | str) -> None:
    if setting not in SETTINGS:
        raise UserError(f"model.cuda_graph={setting!r} must be auto, true, false or step.")


def wanted(
    setting: bool | str,
    device: torch.device,
    world_size: int = 1,
    compile_mode: bool | str = False,
    accumulate_grad_batches: int = 1,
) -> bool:
    """Whether training should replay CUDA graphs, for `model.cuda_graph=setting` (step: as
    auto, with the whole step as the graph) and `model.compile=compile_mode`."""
    check_setting(setting)
    compile_key = f"model.compile={str(compile_mode).lower()}"  # as typed: true, not True
    reasons = {
        "it needs a CUDA GPU (this run is on the CPU)": device.type != "cuda",
        f"{compile_key} makes its own graphs": compile_mode in GRAPHING_COMPILE_MODES,
        f"{compile_key}: a compiled network is graphed only as the whole step "
        f"(model.cuda_graph=step)": bool(compile_mode) and setting != "step",
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


def check_whole_step(clip: float | None, precision: str, optimizer: torch.optim.Optimizer) -> None:
    """Refuse model.cuda_graph=step where the graph would leave out part of Lightning's step."""
    reasons = {
        # Lightning clips between the backward and the update, inside the graph
        f"trainer.gradient_clip_val={clip} clips the gradients between the backward and the "
        f"update, which the graph runs as one": bool(clip),
        # the scaler scales the loss and may skip an update: neither is in the graph
        f"trainer.precision={precision} scales the loss (GradScaler)": precision == "16-mixed",
        # their fresh state is zeros, which the warm-up's state is reset to (see _Snapshot)
        f"the graph captures Adam or AdamW, not {type(optimizer).__name__}": not isinstance(
            optimizer, torch.optim.Adam | torch.optim.AdamW
        ),
    }
    why_not = next((why for why, applies in reasons.items() if applies), None)
    if why_not:
        raise UserError(
            f"model.cuda_graph=step, but {why_not}. Set model.cuda_graph=auto (the forward and "
            f"backward as graphs) or false."
        )


def warm_up(step: Callable[[], object], times: int = 3) -> None:
    """Run `step` on a side stream before capturing it, as CUDA graphs need (cuDNN's choices,
    the allocator's pools and the optimizer's state are made outside the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(times):
            step()
    torch.cuda.current_stream().wait_stream(side)


def capture(step: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
    """Record `step` as a CUDA graph (its kernels do not run now): the graph's replay, and the
    tensor `step` returned, which each replay overwrites."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = step()
    return graph.replay, output


class StepGraph:
    """One training step, forward, loss, backward and `optimizer`'s update, captured as one
    CUDA graph for batches shaped like `x`; each call copies a batch into the graph's inputs,
    replays it, and returns the loss (overwritten by the next call).

    `network`: the model's own layers (`chest_mnist.model.Network`); `loss(logits, targets)`:
    the training loss. The optimizer becomes capturable (its step count on the device), and
    its update reads the learning rates from device tensors (a group's "lr" is one only while
    the update is recorded): each call copies the schedule's current values into them. The
    warm-up steps that capturing needs would train; the weights, buffers (batch-norm
    statistics) and optimizer state are put back as they were, so that the first replay is the
    step the plain loop would take. Autocast is kept as the caller has it (Lightning's bf16)
    for the forward and the loss, without its weight cache, which graphs do not allow.
    The gradients live in the graph's memory, not in `.grad`.
    """

    def __init__(
        self,
        network: nn.Module,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        optimizer: torch.optim.Optimizer,
        x: torch.Tensor,
        targets: torch.Tensor,
    ):
        self.shape = x.shape
        self.x, self.targets = x.detach().clone(), targets.detach().clone()
        self.optimizer = optimizer
        device = x.device
        self.capturable = [group["capturable"] for group in optimizer.param_groups]
        _make_capturable(optimizer, on=device.type == "cuda")
        dtype = torch.get_autocast_dtype(device.type)
        autocast = torch.is_autocast_enabled(device.type)

        groups = optimizer.param_groups
        self.lr_values = [group["lr"] for group in groups]
        # CUDA's fused Adam reads a float32 learning rate (4.7e-8 of 1e-3 off the configured
        # number); the CPU's takes the tensor's value as a double: exact in float64
        lr_dtype = torch.float32 if device.type == "cuda" else torch.float64
        self.lrs = [torch.tensor(float(lr), dtype=lr_dtype, device=device) for lr in self.lr_values]

        def step() -> torch.Tensor:
            # no gradients before the backward: it writes them (not adds); in the graph, into
            # the graph's own memory, which every replay writes again
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype, enabled=autocast, cache_enabled=False):
                value = loss(network(self.x), self.targets)
            with torch.autocast(device.type, enabled=False):
                value.backward()
                try:  # the update reads the learning rates from the device tensors
                    for group, lr in zip(groups, self.lrs, strict=True):
                        group["lr"] = lr
                    optimizer.step()
                finally:  # the scheduler and the logs go on with plain numbers
                    for group, lr in zip(groups, self.lr_values, strict=True):
                        group["lr"] = lr
            return value.detach()

        saved = _Snapshot(network, optimizer)
        try:
            warm_up(step)
            saved.restore()
            self.replay, self.loss = capture(step)
        except BaseException:  # a failed capture, Ctrl-C: no warm-up step kept, as configured
            saved.restore()
            self.close()
            raise

    def fits(self, x: torch.Tensor) -> bool:
        return x.shape == self.shape

    def __call__(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        for i, group in enumerate(self.optimizer.param_groups):
            if group["lr"] != self.lr_values[i]:  # the schedule moved (once an epoch at most)
                self.lrs[i].fill_(group["lr"])
                self.lr_values[i] = group["lr"]
        self.x.copy_(x)
        self.targets.copy_(targets)
        self.replay()
        return self.loss

    def portable(self, optimizer_state: dict) -> None:
        """A checkpoint's optimizer state as it was configured (capturable as it was), so that
        it resumes on the CPU or without graphs too."""
        for group, capturable in zip(optimizer_state["param_groups"], self.capturable, strict=True):
            group["capturable"] = capturable

    def close(self) -> None:
        """The optimizer as it was configured again (the graph and its memory go with self)."""
        self.portable({"param_groups": self.optimizer.param_groups})


def _make_capturable(optimizer: torch.optim.Optimizer, on: bool) -> None:
    """A capturable update (on a CUDA device: the CPU has none) keeps its step count on the
    device; a state loaded from a run without it has the count on the host."""
    if not on:
        return
    # the warm-up steps and the partial batches run it uncaptured, on purpose: torch's "you
    # should set capturable=False" warning would only confuse (it warns once per optimizer)
    optimizer._warned_capturable_if_run_uncaptured = True
    for group in optimizer.param_groups:
        group["capturable"] = True
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "step" in state:
                state["step"] = state["step"].to(device=p.device, dtype=torch.float32)


class _Snapshot:
    """Copies of a network's weights and buffers and of an optimizer's state, to put back in
    place (the graph captures the tensors' addresses, so they are written over, not replaced).
    State that did not exist yet (a fresh optimizer) is put back as Adam's fresh state: zeros."""

    def __init__(self, network: nn.Module, optimizer: torch.optim.Optimizer):
        self.network, self.optimizer = network, optimizer
        self.tensors = [t.detach().clone() for t in self._tensors()]
        self.state = {
            p: {k: v.clone() for k, v in state.items() if torch.is_tensor(v)}
            for p, state in optimizer.state.items()
        }

    def _tensors(self) -> list[torch.Tensor]:
        return [*self.network.parameters(), *self.network.buffers()]

    @torch.no_grad()
    def restore(self) -> None:
        for tensor, saved in zip(self._tensors(), self.tensors, strict=True):
            tensor.copy_(saved)
        for p, state in self.optimizer.state.items():
            saved = self.state.get(p)
            for key, value in state.items():
                if not torch.is_tensor(value):
                    continue
                if saved:
                    value.copy_(saved[key])
                else:
                    value.zero_()  # Adam's fresh state
