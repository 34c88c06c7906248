"""The training step as CUDA graphs, replayed at every step: the whole step (forward, loss,
backward and Adam's update, `StepGraph`), or only the network's forward and backward
(`TrainingGraph`).

A training step of ResNet-18 at batch 128 on 28px images is a few hundred small kernels; on
a GPU, launching them one by one from Python costs more time than running them (issue 15:
about 10 ms of host time per step against about 2.5 ms of GPU work). Here they are recorded
once and replayed: the same kernels and the same arithmetic, one launch or a handful.

`model.cuda_graph`: auto (the default) captures on one CUDA GPU, without DDP (whose gradient
all-reduce runs in autograd hooks between the kernels), without gradient accumulation and
without a torch.compile mode that makes graphs of its own; true asks for the forward and
backward graphs and says why when it cannot; step asks for the whole step and refuses what it
would leave out; false runs the plain step. Where graphs apply, auto takes the whole step
unless it would leave out part of Lightning's step (gradient clipping, fp16's loss scaling, an
optimizer other than Adam or AdamW, a hook that reads the gradients: `why_not_whole_step`), and
then the forward and backward; a network compiled with model.compile=true is graphed only as
the whole step, so there it runs the plain compiled step.

The whole step (`StepGraph`): forward, loss, backward and the optimizer's update (capturable,
the learning rate read from a device tensor that follows the schedule) are one graph, replayed
by `training_step`, so the step's Python (autograd's engine, the optimizer) runs once, at the
capture. Lightning's loop and the callbacks' batch and epoch hooks still run around it; the
module skips the backward and the update, which the graph has done, and with them Lightning's
hooks that see gradients (GRADIENT_HOOKS: `.grad` is empty after the step). It also takes
a compiled network (`model.compile=auto`, the default, or true, or a mode without graphs of its
own: not reduce-overhead or max-autotune): the graph then records inductor's kernels, and the
batches it does not take run the eager code, so that a run compiles once. Unless the run is
deterministic (or model.compile_in_background=false), a separate process compiles the network
meanwhile, the graph replays the network uncompiled until then, and the run then compiles it
from that process's caches and captures the step again (`chest_mnist.background_compile`).

The forward and backward (`TrainingGraph`, `torch.cuda.make_graphed_callables`): each step
copies its batch into the graph's input and replays the forward graph, then (in
`loss.backward()`) the backward graph; Lightning runs the rest of the step as before
(automatic optimisation, its hooks, the callbacks, the loss, the update: fused, one kernel).

Either graph is captured at the first full batch of a fit and dropped at its end; a batch of
another shape (the last, partial one of an epoch) and evaluation run the network eagerly.
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
    whole_step: bool = False,
) -> bool:
    """Whether training should replay CUDA graphs, for `model.cuda_graph=setting` and
    `model.compile=compile_mode`; `whole_step`: whether the graph would be the whole step
    (step, or auto where `why_not_whole_step` finds nothing), the only graph a compiled network
    is replayed in."""
    check_setting(setting)
    compile_key = f"model.compile={str(compile_mode).lower()}"  # as typed: true, not True
    reasons = {
        "it needs a CUDA GPU (this run is on the CPU)": device.type != "cuda",
        f"{compile_key} makes its own graphs": compile_mode in GRAPHING_COMPILE_MODES,
        f"{compile_key}: a compiled network is graphed only as the whole step "
        f"(model.cuda_graph=auto or step)": bool(compile_mode) and not whole_step,
        f"under DDP ({world_size} processes) the gradients are all-reduced between the "
        f"kernels": world_size > 1,
        # the graph hands its own gradient buffers to .grad, and the next replay overwrites them:
        # accumulated over steps, they would add up wrong (pytorch/pytorch#181723)
        f"trainer.accumulate_grad_batches={accumulate_grad_batches} adds gradients over "
        f"steps, which the graph's reused gradient buffers do not allow": accumulate_grad_batches
        != 1,
    }
    why_not = next((why for why, applies in reasons.items() if applies), None)
    if setting in (True, "step") and why_not:  # asked for by name: refused, not ignored
        raise UserError(
            f"model.cuda_graph={str(setting).lower()}, but {why_not}. Set model.cuda_graph=auto "
            f"(graphs where they apply) or false."
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


# hooks that Lightning calls with the gradients in `.grad`: with the whole step as the graph,
# the gradients stay in the graph's memory and Lightning's optimizer step does not run
GRADIENT_HOOKS = ("on_after_backward", "on_before_optimizer_step")


def why_not_whole_step(
    clip: float | None, precision: str, optimizer_class: object, gradient_hooks: list[str] = ()
) -> str | None:
    """What the whole-step graph would leave out of Lightning's step, if anything;
    `gradient_hooks`: the GRADIENT_HOOKS that the module or a callback overrides, as
    "Class.hook"."""
    name = getattr(optimizer_class, "__name__", optimizer_class)
    reasons = {
        # Lightning clips between the backward and the update, inside the graph
        f"trainer.gradient_clip_val={clip} clips the gradients between the backward and the "
        f"update, which the graph runs as one": bool(clip),
        # the scaler scales the loss and may skip an update: neither is in the graph
        f"trainer.precision={precision} scales the loss (GradScaler)": precision == "16-mixed",
        # their fresh state is zeros, which the warm-up's state is reset to (see _Snapshot)
        f"the graph captures Adam or AdamW, not {name}": not (
            isinstance(optimizer_class, type)
            and issubclass(optimizer_class, torch.optim.Adam | torch.optim.AdamW)
        ),
        f"{' and '.join(gradient_hooks)} {'reads' if len(gradient_hooks) == 1 else 'read'} the "
        f"gradients, which the graph keeps in its own memory": bool(gradient_hooks),
    }
    return next((why for why, applies in reasons.items() if applies), None)


def check_whole_step(
    clip: float | None,
    precision: str,
    optimizer_class: type,
    gradient_hooks: list[str] = (),
) -> None:
    """Refuse model.cuda_graph=step where the graph would leave out part of Lightning's step."""
    why_not = why_not_whole_step(clip, precision, optimizer_class, gradient_hooks)
    if why_not:
        raise UserError(
            f"model.cuda_graph=step, but {why_not}. Set model.cuda_graph=auto (the forward and "
            f"backward as graphs where the whole step cannot be) or false."
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
