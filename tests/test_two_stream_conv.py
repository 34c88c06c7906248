"""benchmarks/two_stream_conv.py, the issue-15 experiment that step_floor_gpu.py times on a GPU:
its convolution must compute what nn.Conv2d computes, eager and compiled, or the time it
measures would be the time of something else. Here on the CPU, where its backward runs the two
gradients in order on one stream; the GPU call checks the two-stream path
(streams_max_grad_diff)."""

import copy
import json
import re
import sys

import pytest
import torch
import torch.nn.functional as F

from chest_mnist.model import build_resnet18
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import each other as files do
import step_floor_gpu  # noqa: E402
from two_stream_conv import TwoStreamConv2d, _laid_out_as, two_streams  # noqa: E402


def grads_of(net, x, y, autocast: bool = False) -> list[torch.Tensor]:
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        loss = F.binary_cross_entropy_with_logits(net(x).float(), y)
    loss.backward()
    return [p.grad for p in net.parameters()]


@pytest.mark.slow
@pytest.mark.parametrize("autocast", [False, True])
def test_resnet18_with_two_stream_convolutions_has_the_same_gradients(autocast):
    torch.manual_seed(0)
    plain = build_resnet18("cifar", num_classes=14).to(memory_format=torch.channels_last)
    streamed = two_streams(copy.deepcopy(plain))
    assert sum(isinstance(m, TwoStreamConv2d) for m in streamed.modules()) == 20
    assert not any(isinstance(m, torch.nn.Conv2d) for m in streamed.modules())
    x = torch.rand(4, 3, 28, 28).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(4, 14) < 0.2).float()
    expected, got = grads_of(plain, x, y, autocast), grads_of(streamed, x, y, autocast)
    assert len(got) == len(expected) == 62
    for a, b in zip(expected, got, strict=True):
        assert (
            a.dtype == b.dtype == torch.float32
        )  # the fp32 weights' gradients, under autocast too
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("autocast", [False, True])
def test_compiled_two_stream_convolutions_match_eager_conv2d(autocast):
    """torch.compile sees the custom operators (their fake kernels give the output's shape and
    strides): a strided convolution of channels-last input, and one whose input needs no
    gradient (a network's first); under bf16 autocast too, as step_floor_gpu compiles them."""
    torch.manual_seed(0)
    first = torch.nn.Conv2d(3, 8, 3, 1, 1, bias=False)
    second = torch.nn.Conv2d(8, 16, 3, 2, 1, bias=False)
    plain = torch.nn.Sequential(first, torch.nn.ReLU(), second)
    streamed = torch.nn.Sequential(TwoStreamConv2d(first), torch.nn.ReLU(), TwoStreamConv2d(second))
    x = torch.rand(4, 3, 12, 12).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        out = torch.compile(streamed, fullgraph=True)(x)
    out.float().square().sum().backward()
    got = [p.grad.clone() for p in streamed.parameters()]
    for p in plain.parameters():
        p.grad = None
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        expected_out = plain(x)
    expected_out.float().square().sum().backward()
    torch.testing.assert_close(out, expected_out)
    for a, b in zip((p.grad for p in plain.parameters()), got, strict=True):
        torch.testing.assert_close(b, a)


def test_a_gradient_in_another_layout_is_copied_to_the_promised_one():
    """What aten's gradient kernels may return in another memory format than the operand's (the
    fake kernels promise the operand's strides): the same values, the operand's strides."""
    like = torch.empty(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    t = torch.rand(2, 3, 4, 5)
    laid_out = _laid_out_as(t, like)
    assert laid_out.stride() == like.stride() != t.stride()
    assert torch.equal(laid_out, t)
    same = torch.rand(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    assert _laid_out_as(same, like) is same


def test_a_convolution_it_cannot_run_is_refused():
    with pytest.raises(ValueError, match="bias-free"):
        TwoStreamConv2d(torch.nn.Conv2d(3, 8, 3, bias=True))
    with pytest.raises(ValueError, match="bias-free"):
        TwoStreamConv2d(torch.nn.Conv2d(8, 8, 3, groups=2, bias=False))
    with pytest.raises(ValueError, match="zero-padded"):
        TwoStreamConv2d(torch.nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect", bias=False))


def test_kernel_kinds_of_the_h200_profile():
    """step_floor_gpu's sums by kind, on kernel names an H200 profile recorded: cuDNN's
    convolutions by direction, inductor's fused batch norm as inductor's, not as batch norm."""
    floor = json.loads((ROOT / "benchmarks/results/h200_step_floor_whole_step.json").read_text())
    names = [
        row[0]
        for key in ("whole_fused_kernels_top", "whole_compiled_kernels_top")
        for row in floor[key]
    ]
    expected = {
        "sm90_xmma_fprop_implicit_gemm_bf16": "conv_forward",
        "sm90_xmma_wgrad_indexed_implicit_gemm": "conv_weight_grad",
        "sm90_xmma_dgrad_implicit_gemm_indexed": "conv_input_grad",
        "triton_red_fused__native_batch_norm": "inductor_fused",
        "void at::native::batch_norm_collect_statistics": "batch_norm",
        "void at::native::(anonymous namespace)::multi_tensor_apply": "adam",
        "void at::native::unrolled_elementwise_kernel<at::native::direct_copy": "copy",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add": "elementwise",
        "void cask_plugin__5x_cudnn::xmma__5x_cudnn::init_device_workspace": "other",
    }
    for start, kind in expected.items():
        name = next(name for name in names if name.startswith(start))
        assert step_floor_gpu.kind_of(name) == kind, name
    # inductor names a kernel after its operators: a convolution's layout copy is inductor's
    for name in ("triton_poi_fused_convolution_0", "triton_red_fused_convert_element_type_1"):
        assert step_floor_gpu.kind_of(name) == "inductor_fused", name


def test_the_gpu_script_asks_for_measurements_that_exist():
    """step_floor_gpu.sh's names: an unknown one stops step_floor_gpu.py before it measures
    anything, and the GPU's minutes are few."""
    script = (ROOT / "benchmarks/step_floor_gpu.sh").read_text().replace("\\\n", " ")
    calls = re.findall(r"python3 benchmarks/step_floor_gpu\.py (.*)", script)
    assert len(calls) == 2
    for call in calls:
        words = call.split("--")[0].split()[1:]  # after OUT.json, before the options
        assert words and set(words) <= set(step_floor_gpu.MEASURES), words


def test_the_combo_measurement_names_an_inductor_setting():
    """torch.compile refuses an option inductor does not know: on the GPU that measurement
    would be lost."""
    import torch._inductor.config as inductor

    assert step_floor_gpu.COMBO and all(hasattr(inductor, key) for key in step_floor_gpu.COMBO)
