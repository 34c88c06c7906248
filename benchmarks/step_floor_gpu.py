"""How long one training step of the protocol takes on this GPU without Lightning, and how much
of it is the GPU's own work: the floor under `python -m chest_mnist.train`'s step.

ResNet-18 (the 28px model), batch 128 at 28px, 14 labels, bf16 autocast, channels-last, Adam,
BCE loss, measured over STEPS steps after a warm-up (wall time with one sync at the end):
  eager         the step as written (zero_grad, forward, loss, backward, fused Adam)
  graphed_fb    forward and backward replayed as CUDA graphs (torch.cuda.make_graphed_callables,
                what model.cuda_graph=true does), the loss and fused Adam eager
  whole_step    forward, loss, backward and Adam (capturable foreach, the learning rate a device
                tensor) captured as one graph and replayed: one launch a step, so its time is the GPU's
  whole_fused   the same with fused Adam (capturable): what model.compile=false replays
  whole_fused_kernels  the CUDA kernel time of a whole_fused step (and its 15 costliest kernels,
                whole_fused_kernels_top: name, ms and launches per step)
  whole_compiled  whole_fused with the network torch.compile'd (inductor's kernels: batch norm
                and ReLU fused), what the default replays on one GPU; its
                compilation (cold when TORCHINDUCTOR_CACHE_DIR is new), warm-up and capture
                took whole_compiled_setup_s
  whole_compiled_kernels  its CUDA kernel time (and whole_compiled_kernels_top)
  whole_nchw    whole_step with the network and batch in NCHW
  kernels       the CUDA kernel time of a graphed_fb step, from torch.profiler (the GPU's busy time)
  compiled      the eager step with the network torch.compile'd (inductor's kernels: batch norm
                and ReLU fused), fused Adam; its compile time is not counted
  compiled_kernels  the CUDA kernel time of a compiled step: whether inductor's kernels lower
                the floor that `kernels` measures for cuDNN's
  eval_1024     an inference forward of 1,024 images (the evaluation batch)
Whether the GPU has room for more at once (issue 15: at 2.183 ms of kernels a step, an H200's
whole_compiled_kernels, 100 epochs take about 137 s of replays alone):
  whole_compiled_pair  two independent whole_compiled steps (two networks, two graphs) replayed
                side by side on two streams, ms per pair: against twice whole_compiled, how much
                of the GPU one step leaves idle
  whole_streams  whole_fused with each convolution's weight gradient on a second stream while
                its input gradient runs on the current one (benchmarks/two_stream_conv.py)
  whole_compiled_streams  the same, the network compiled (whole_compiled with two streams)
  whole_compiled_streams_kernels  its kernels' time (summed: more than the step's time where
                they overlap) and by kind, against whole_compiled_kernels': the custom
                convolutions' own copies to the promised strides show under copy, copies
                inductor adds around them under inductor_fused
  streams_max_grad_diff  the largest difference of a gradient between the two-stream network and
                the plain one after one bf16 forward and backward on the same batch and weights
                (not ms)
  whole_compiled_combo  whole_compiled with inductor's combo kernels (independent small kernels,
                the weights' casts to bf16 for instance, launched as one:
                torch._inductor.config.combo_kernels); its cold setup whole_compiled_combo_setup_s
  whole_compiled_combo_kernels  its kernels' time, by kind and launches
The whole_*_kernels measurements also sum their kernels by kind (<name>_by_kind: convolution
forward, input and weight gradients, inductor's fused kernels, batch norm, Adam, copies, other)
and count their launches a step (<name>_launches_by_kind: a launch costs a few microseconds
even in a graph, so many small kernels cost more than their work).
Prints one line per measurement, and after each writes those so far as JSON to the path given
(if any).

    python benchmarks/step_floor_gpu.py [OUT.json [NAME...]] [--cudnn-benchmark-limit N]
      NAME: only those measurements. --cudnn-benchmark-limit: how many of cuDNN's algorithms
      its benchmark tries per convolution (PyTorch's default 10; 0: all), for the whole process
      (cuDNN keeps the first choice for each shape, so compare limits in separate processes)
"""

import argparse
import copy
import functools
import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from two_stream_conv import two_streams  # benchmarks/ is the script's folder

from chest_mnist import cuda_graphs
from chest_mnist.model import build_resnet18

BATCH, SIZE, LABELS, STEPS = 128, 28, 14, 300


def network(channels_last: bool = True, streams: bool = False) -> torch.nn.Module:
    net = build_resnet18("cifar", num_classes=LABELS).cuda()
    if streams:
        net = two_streams(net)
    return net.to(memory_format=torch.channels_last) if channels_last else net


def batch(channels_last: bool = True):
    x = torch.rand(BATCH, 3, SIZE, SIZE, device="cuda")
    y = (torch.rand(BATCH, LABELS, device="cuda") < 0.1).float()
    return (x.contiguous(memory_format=torch.channels_last) if channels_last else x), y


def timed(step, steps: int = STEPS) -> float:
    """ms per call of `step`, after 20 warm-up calls."""
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps * 1e3


def training_step(forward, opt, x, y, cache_enabled: bool = False):
    """One step of the protocol's training: `forward` (the network, or its graphed copy)
    under bf16 autocast, BCE, backward, `opt`. Graphs need autocast without its weight cache.
    The gradients are set to None first, so the backward writes them instead of adding them to
    zeros; in a captured step, into the graph's own memory, which each replay writes again (as
    chest_mnist.cuda_graphs.StepGraph does). The whole steps here used to zero them and add
    to them: most likely the 65 float additions, 0.119 ms a step, among the costliest kernels
    of h200_step_floor_whole_step.json (BENCHMARKS.md)."""

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", torch.bfloat16, cache_enabled=cache_enabled):
            loss = F.binary_cross_entropy_with_logits(forward(x).float(), y)
        loss.backward()
        opt.step()

    return step


def eager() -> float:
    net, (x, y) = network(), batch()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)
    return timed(training_step(net, opt, x, y, cache_enabled=True))


def graphed_fb(profile: bool = False) -> float:
    net, (x, y) = network(), batch()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)
    with torch.autocast("cuda", torch.bfloat16, cache_enabled=False):
        graphed = torch.cuda.make_graphed_callables(net, (x.clone(),))
    step = training_step(graphed, opt, x, y)
    return kernel_ms(step) if profile else timed(step)


@functools.cache
def compiled_step():
    """Built (and compiled) once, for both the time and the kernel time."""
    net, (x, y) = network(), batch()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)
    return training_step(torch.compile(net), opt, x, y, cache_enabled=True)


def compiled(profile: bool = False) -> float:
    step = compiled_step()
    return kernel_ms(step) if profile else timed(step)


TOP: dict[str, list] = {}  # the costliest kernels of each profiled step, by its name
BY_KIND: dict[str, dict] = {}  # ms a step of each kind of kernel, by the step's name
LAUNCHES_BY_KIND: dict[str, dict] = {}  # kernels launched a step of each kind, by the step's name
KINDS = [  # (kind, a part of the kernel's name), the first that matches
    # first: inductor names a kernel by the operators it came from, and a layout copy for a
    # convolution (triton_poi_fused_convolution_0) or a cast (..._convert_element_type_...)
    # would otherwise count as a convolution
    ("inductor_fused", "triton_"),
    ("conv_weight_grad", "wgrad"),
    ("conv_input_grad", "dgrad"),
    ("conv_forward", "fprop"),
    ("conv_other", "conv"),
    ("batch_norm", "batch_norm"),
    ("adam", "multi_tensor_apply"),  # fused or foreach Adam (any foreach op would count)
    ("copy", "copy"),
    ("elementwise", "elementwise"),
]


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    return next((kind for kind, part in KINDS if part in name), "other")


def kernel_ms(step, name: str | None = None) -> float:
    """The CUDA kernel time of one call of `step` (the GPU's busy time), over 50 calls; with a
    `name`, its 15 costliest kernels go to TOP[name], its time and launches by kind to
    BY_KIND[name] and LAUNCHES_BY_KIND[name]."""
    timed(step, 20)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(50):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    if name:
        events.sort(key=lambda e: e.self_device_time_total, reverse=True)
        TOP[name] = [
            [e.key[:100], round(e.self_device_time_total / 50 / 1e3, 4), e.count / 50]
            for e in events[:15]
        ]
        kinds: dict[str, float] = {}
        launches: dict[str, int] = {}
        for e in events:
            kind = kind_of(e.key)
            kinds[kind] = kinds.get(kind, 0.0) + e.self_device_time_total
            launches[kind] = launches.get(kind, 0) + e.count
        BY_KIND[name] = {kind: round(us / 50 / 1e3, 4) for kind, us in sorted(kinds.items())}
        LAUNCHES_BY_KIND[name] = {kind: n / 50 for kind, n in sorted(launches.items())}
    return sum(e.self_device_time_total for e in events) / 50 / 1e3


# seconds from the first call to a captured graph: compilation, warm-up and capture
SETUP_SECONDS: dict[str, float] = {}


def captured_step(
    channels_last: bool = True,
    fused: bool = False,
    compile_it: bool = False,
    streams: bool = False,
    compile_options: dict | None = None,
) -> Callable[[], None]:
    """A whole training step (forward, loss, backward, Adam with a device learning rate)
    captured as one CUDA graph after 3 warm-up steps, as the run warms up and captures
    (chest_mnist.cuda_graphs), on its own network and batch: the graph's replay.
    `compile_options`: inductor's settings for torch.compile (its `options`)."""
    net, (x, y) = network(channels_last, streams), batch(channels_last)
    forward = torch.compile(net, options=compile_options) if compile_it else net
    lr = torch.tensor(1e-3, device="cuda")
    opt = torch.optim.Adam(
        net.parameters(),
        lr=lr,
        capturable=True,
        **({"fused": True} if fused else {"foreach": True}),
    )
    step = training_step(forward, opt, x, y)
    cuda_graphs.warm_up(step)
    graph_replay, _ = cuda_graphs.capture(step)
    torch.cuda.synchronize()

    def replay():
        graph_replay()

    # the graph reads and writes the network's weights, the batch and Adam's state, but holds
    # no reference to them: this attribute does (`step` holds them all), or their memory would
    # be freed and reused while the graph still replays into it (two graphs alive at once,
    # whole_compiled_pair, ended in an illegal memory access on an H200)
    replay.step = step
    return replay


def whole_step(
    channels_last: bool = True,
    fused: bool = False,
    profile: str | None = None,
    compile_it: bool = False,
    streams: bool = False,
    compile_options: dict | None = None,
    setup: str | None = None,
) -> float:
    """ms per replay of `captured_step(...)`, or with `profile` (a measurement's name) its
    CUDA kernel time, recorded under that name; `setup`: the name under which the seconds to
    the captured graph go to SETUP_SECONDS, if it has none yet (the first is the cold one)."""
    started = time.perf_counter()
    replay = captured_step(channels_last, fused, compile_it, streams, compile_options)
    if setup and setup not in SETUP_SECONDS:
        SETUP_SECONDS[setup] = round(time.perf_counter() - started, 2)
    if profile:
        return kernel_ms(replay, profile)
    return timed(replay)


# inductor fuses independent small kernels into one launch (torch._inductor.config.combo_kernels)
COMBO = {"combo_kernels": True}


def whole_compiled_pair() -> float:
    """ms for two compiled whole steps replayed at once, each on its own stream."""
    replays = [captured_step(fused=True, compile_it=True) for _ in range(2)]
    streams = [torch.cuda.Stream() for _ in replays]

    def both():
        main = torch.cuda.current_stream()
        for replay, stream in zip(replays, streams, strict=True):
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                replay()
        for stream in streams:
            main.wait_stream(stream)

    return timed(both)


def streams_max_grad_diff() -> float:
    """The largest absolute difference of a gradient, two-stream network against plain, after
    one bf16-autocast forward and backward of the same batch from the same weights."""
    plain = network()
    streamed = two_streams(copy.deepcopy(plain))
    x, y = batch()
    for net in (plain, streamed):
        with torch.autocast("cuda", torch.bfloat16):
            loss = F.binary_cross_entropy_with_logits(net(x).float(), y)
        loss.backward()
    torch.cuda.synchronize()
    return max(
        (a.grad - b.grad).abs().max().item()
        for a, b in zip(plain.parameters(), streamed.parameters(), strict=True)
    )


def eval_1024() -> float:
    net = network().eval()
    x = torch.rand(1024, 3, SIZE, SIZE, device="cuda").contiguous(memory_format=torch.channels_last)

    def forward():
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
            net(x)

    return timed(forward, 50)


def compiled_measures(name: str, **options) -> dict[str, Callable[[], float]]:
    """`name`, a compiled whole step with fused Adam (its ms a step, its cold setup under
    `name`_setup_s), and `name`_kernels (its kernel time); `options`: whole_step's others."""
    step = functools.partial(whole_step, fused=True, compile_it=True, setup=name, **options)
    return {name: step, f"{name}_kernels": functools.partial(step, profile=f"{name}_kernels")}


MEASURES = {  # what each name measures: the module's docstring
    "whole_fused": lambda: whole_step(fused=True),
    "whole_fused_kernels": lambda: whole_step(fused=True, profile="whole_fused_kernels"),
    **compiled_measures("whole_compiled"),
    "whole_step": whole_step,
    "graphed_fb": graphed_fb,
    "eager": eager,
    "whole_nchw": lambda: whole_step(channels_last=False),
    "kernels": lambda: graphed_fb(profile=True),
    "eval_1024": eval_1024,
    "compiled": compiled,
    "compiled_kernels": lambda: compiled(profile=True),
    "whole_compiled_pair": whole_compiled_pair,
    "whole_streams": lambda: whole_step(fused=True, streams=True),
    **compiled_measures("whole_compiled_streams", streams=True),
    "streams_max_grad_diff": streams_max_grad_diff,
    **compiled_measures("whole_compiled_combo", compile_options=COMBO),
}


def write(path: str, results: dict) -> None:
    """The results so far as JSON (after each measurement: a run stopped by its time limit
    keeps those it finished)."""
    with open(path, "w") as f:
        json.dump(
            {
                "device": torch.cuda.get_device_name(),
                "cudnn_benchmark_limit": torch.backends.cudnn.benchmark_limit,
                **results,
                **{f"{name}_setup_s": sec for name, sec in SETUP_SECONDS.items()},
                **{f"{name}_top": top for name, top in TOP.items()},
                **{f"{name}_by_kind": kinds for name, kinds in BY_KIND.items()},
                **{f"{name}_launches_by_kind": n for name, n in LAUNCHES_BY_KIND.items()},
            },
            f,
            indent=1,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", help="the JSON file to write")
    parser.add_argument("names", nargs="*", help="only these measurements")
    parser.add_argument("--cudnn-benchmark-limit", type=int, default=None)
    args = parser.parse_args()
    unknown = [name for name in args.names if name not in MEASURES]
    if unknown:
        parser.error(
            f"unknown measurement(s) {', '.join(unknown)}; choose from {', '.join(MEASURES)}"
        )
    torch.backends.cudnn.benchmark = True
    if args.cudnn_benchmark_limit is not None:
        torch.backends.cudnn.benchmark_limit = args.cudnn_benchmark_limit
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, batch {BATCH}, {STEPS} steps, "
        f"cudnn.benchmark_limit {torch.backends.cudnn.benchmark_limit}",
        flush=True,
    )
    results = {}
    for name in args.names or list(MEASURES):
        try:
            value = MEASURES[name]()
            if name.endswith("_diff"):  # a difference, not a time
                results[name] = value
                print(f"{name}: {value:.3e}", flush=True)
            else:
                results[name] = round(value, 4)
                print(f"{name}: {value:.3f} ms", flush=True)
            if name in BY_KIND:
                print(f"{name} by kind (ms a step): {BY_KIND[name]}", flush=True)
                print(f"{name} launches a step by kind: {LAUNCHES_BY_KIND[name]}", flush=True)
        except Exception as e:  # one failure should not lose the other numbers
            results[name] = f"{type(e).__name__}: {e}"
            print(f"{name}: failed: {results[name]}", flush=True)
        if args.out:
            write(args.out, results)


if __name__ == "__main__":
    main()
