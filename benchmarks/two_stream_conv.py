"""A convolution whose backward computes the weight's gradient on a second CUDA stream while the
input's gradient is computed on the current one: an experiment for issue 15 (benchmarks/
step_floor_gpu.py's whole_streams and whole_compiled_streams), not part of chest_mnist.

At batch 128 and 28px, ResNet-18's later convolutions are small GEMMs (layer4: 2,048 output
positions by 512 channels) that leave many of an H200's 132 SMs idle, and PyTorch runs a
convolution's two backward GEMMs one after the other on one stream. They do not depend on each
other, so on two streams they may overlap; a whole-step CUDA graph keeps the two branches. The
current stream waits for both before it goes on, so only a convolution's own two gradients
overlap. The kernels are aten.convolution_backward's, once per gradient, so the gradients should
be the same (step_floor_gpu's streams_max_grad_diff measures it on a GPU).

Both are custom operators (torch.library), so torch.compile treats them as opaque kernels
rather than tracing the streams. On the CPU the backward runs on one thread, in order.

    net = two_streams(build_resnet18("cifar"))   # every nn.Conv2d (all bias-free), in place
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_SIDE: dict[torch.device, torch.cuda.Stream] = {}  # one side stream per device


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _SIDE:
        _SIDE[device] = torch.cuda.Stream(device)
    return _SIDE[device]


def _check_apart(main: torch.cuda.Stream, side: torch.cuda.Stream) -> None:
    """torch.cuda.Stream() hands out PyTorch's 32 pooled streams in turn, so after 32 more the
    current stream can be the side one; the two gradients would then run in order, silently."""
    if main == side:
        raise RuntimeError(f"the current stream is the side stream ({side}): nothing would overlap")


def _backward_args(grad, x, weight, stride, padding):
    return (grad, x, weight, None, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], 1)


@torch.library.custom_op("two_stream_conv::conv", mutates_args=())
def conv(x: Tensor, weight: Tensor, stride: int, padding: int) -> Tensor:
    return F.conv2d(x, weight, None, stride, padding)


@conv.register_fake
def _(x, weight, stride, padding):
    return F.conv2d(x, weight, None, stride, padding)


@torch.library.custom_op("two_stream_conv::grads", mutates_args=())
def grads(
    grad: Tensor, x: Tensor, weight: Tensor, stride: int, padding: int, input_grad: bool
) -> tuple[Tensor, Tensor]:
    """(the input's gradient, or an empty tensor when not `input_grad`; the weight's)."""
    args = _backward_args(grad, x, weight, stride, padding)
    if not x.is_cuda:
        grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
            *args, [input_grad, True, False]
        )
        grad_x = _laid_out_as(grad_x, x) if input_grad else x.new_empty(0)
        return grad_x, _laid_out_as(grad_weight, weight)
    main, side = torch.cuda.current_stream(x.device), _side_stream(x.device)
    _check_apart(main, side)
    # the side stream starts after everything enqueued so far (this gradient, and the last
    # step's optimizer reading the weight gradient whose memory it may reuse); the current
    # stream goes on only after the side's work, so nothing it frees is still being read
    side.wait_stream(main)
    with torch.cuda.stream(side):
        grad_weight = torch.ops.aten.convolution_backward(*args, [False, True, False])[1]
        grad_weight = _laid_out_as(grad_weight, weight)
    if input_grad:
        grad_x = _laid_out_as(
            torch.ops.aten.convolution_backward(*args, [True, False, False])[0], x
        )
    else:
        grad_x = x.new_empty(0)
    main.wait_stream(side)
    return grad_x, grad_weight


@grads.register_fake
def _(grad, x, weight, stride, padding, input_grad):
    return (torch.empty_like(x) if input_grad else x.new_empty(0)), torch.empty_like(weight)


def _laid_out_as(t: Tensor, like: Tensor) -> Tensor:
    """`t` with `like`'s strides, as the fake kernel promises (compiled code relies on them):
    aten's kernels choose a gradient's memory format from both operands, and a compiled graph
    may pass an operand in another format than the one it traced."""
    return t if t.stride() == like.stride() else torch.empty_like(like).copy_(t)


def _setup_context(ctx, inputs, output):
    x, weight, ctx.stride, ctx.padding = inputs
    ctx.save_for_backward(x, weight)


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    input_grad = ctx.needs_input_grad[0]
    grad_x, grad_weight = grads(grad, x, weight, ctx.stride, ctx.padding, input_grad)
    return (grad_x if input_grad else None), grad_weight, None, None


conv.register_autograd(_backward, setup_context=_setup_context)


class TwoStreamConv2d(nn.Module):
    """An nn.Conv2d (square stride and padding, zero padding, no bias, groups or dilation) run
    through `conv`, with the same weight. Under autocast the operands are cast as autocast casts
    a convolution's (custom operators are not on its lists)."""

    def __init__(self, original: nn.Conv2d):
        super().__init__()
        stride, padding = original.stride, original.padding
        if (
            original.bias is not None
            or original.padding_mode != "zeros"
            or original.groups != 1
            or original.dilation != (1, 1)
            or stride[0] != stride[1]
            or not isinstance(padding, tuple)
            or padding[0] != padding[1]
        ):
            raise ValueError(
                f"not a square, zero-padded, bias-free, ungrouped convolution: {original}"
            )
        self.weight = original.weight
        self.stride, self.padding = stride[0], padding[0]

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight
        device = x.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            x, weight = x.to(dtype), weight.to(dtype)
        return conv(x, weight, self.stride, self.padding)


def two_streams(net: nn.Module) -> nn.Module:
    """`net` with every nn.Conv2d replaced by a TwoStreamConv2d sharing its weight (in place)."""
    for module in list(net.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Conv2d):
                setattr(module, child_name, TwoStreamConv2d(child))
    return net
