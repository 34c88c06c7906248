"""model.cuda_graph: when the training step replays CUDA graphs, and that it learns exactly what
the plain step learns. Capturing needs a GPU; here torch.cuda.make_graphed_callables is
replaced by a stand-in that does what it does to the model (warm-up forwards in training mode,
which move the batch-norm statistics) and returns the network unchanged, so the rest of the
fast step (which batches take the graph, the statistics put back, the fused optimizer, the
schedule) runs for real. For the whole-step graph (model.cuda_graph=auto or step) the
stand-ins warm up on the CPU and "replay" by running the recorded step again, writing its loss
into the captured output. The capture itself is checked on a GPU (benchmarks/)."""

import logging
import os
import re
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn

from chest_mnist import UserError, cuda_graphs
from chest_mnist.background_compile import BackgroundCompile, spec_for
from chest_mnist.checkpoints import load_checkpoint
from chest_mnist.model import MedMNISTClassifier, Network
from chest_mnist.train import train
from tests.conftest import ONE_GPU, compose_train, trainer_for_setup

CPU, GPU = torch.device("cpu"), ONE_GPU


def test_auto_graphs_one_gpu_without_ddp_or_compiled_graphs():
    assert cuda_graphs.wanted("auto", GPU, 1)
    assert not cuda_graphs.wanted("auto", CPU, 1)
    assert not cuda_graphs.wanted("auto", GPU, 2)
    assert not cuda_graphs.wanted(False, GPU, 1)
    assert not cuda_graphs.wanted("auto", GPU, 1, accumulate_grad_batches=2)
    # a compiled network is graphed as the whole step, where compile makes no graphs of its own
    assert not cuda_graphs.wanted("auto", GPU, 1, compile_mode=True)
    assert cuda_graphs.wanted("auto", GPU, 1, compile_mode=True, whole_step=True)
    for mode in ("reduce-overhead", "max-autotune"):  # graphs of their own: step is refused
        with pytest.raises(UserError, match=f"model.cuda_graph=step, but model.compile={mode} "):
            cuda_graphs.wanted("step", GPU, 1, compile_mode=mode, whole_step=True)
    assert not cuda_graphs.wanted("auto", GPU, 1, compile_mode="reduce-overhead", whole_step=True)
    assert cuda_graphs.wanted("step", GPU, 1, compile_mode=True, whole_step=True)
    assert cuda_graphs.wanted(
        "step", GPU, 1, compile_mode="max-autotune-no-cudagraphs", whole_step=True
    )


@pytest.mark.parametrize(
    ("clip", "precision", "optimizer", "whole"),
    [
        (None, "bf16-mixed", torch.optim.Adam, True),
        (None, "32-true", torch.optim.AdamW, True),
        (1.0, "bf16-mixed", torch.optim.Adam, False),
        (None, "16-mixed", torch.optim.Adam, False),
        (None, "bf16-mixed", torch.optim.SGD, False),
    ],
)
def test_auto_makes_the_whole_step_the_graph_where_it_leaves_nothing_out(
    clip, precision, optimizer, whole, caplog
):
    """model.cuda_graph=auto (the default) on one GPU: the whole step as one graph where it
    would leave nothing of Lightning's step out, else the forward and backward graphs, and
    it says why; it never refuses the run, as step does."""
    from functools import partial

    caplog.set_level(logging.INFO, logger="chest_mnist.model")
    model = MedMNISTClassifier(["a", "b"], optimizer=partial(optimizer, lr=1e-3))
    model._trainer = trainer_for_setup(gradient_clip_val=clip, precision=precision)
    model.setup("fit")
    assert model.graphs_wanted and model.whole_step_wanted is whole
    fallback = "model.cuda_graph=auto: not the whole step as one CUDA graph, as "
    assert (fallback in caplog.text) is not whole
    if not whole:
        why = cuda_graphs.why_not_whole_step(clip, precision, optimizer)
        assert f"{why}; the forward and backward as graphs instead." in caplog.text
    assert isinstance(model.configure_optimizers(), optimizer)


def test_a_hook_that_reads_the_gradients_keeps_the_step_out_of_the_graph(caplog):
    """A callback's on_before_optimizer_step (or the module's on_after_backward) would see no
    gradients with the whole step as one graph: auto graphs the forward and backward instead,
    and says why; step refuses the run."""
    from functools import partial

    class GradientNorm(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            pass

    class Module(MedMNISTClassifier):
        def on_after_backward(self):
            pass

    caplog.set_level(logging.INFO, logger="chest_mnist.model")
    for setting in ("auto", "step"):
        model = Module(["a", "b"], optimizer=partial(torch.optim.Adam), cuda_graph=setting)
        model._trainer = trainer_for_setup(callbacks=[L.Callback(), GradientNorm()])
        model.setup("fit")
        why = (
            "Module.on_after_backward and GradientNorm.on_before_optimizer_step read the gradients"
        )
        if setting == "auto":
            assert model.graphs_wanted and not model.whole_step_wanted
            assert f"as {why}, which the graph keeps in its own memory; the forward" in caplog.text
            model.configure_optimizers()
        else:
            with pytest.raises(UserError, match=re.escape(f"model.cuda_graph=step, but {why}")):
                model.configure_optimizers()


@pytest.mark.parametrize(
    ("device", "world_size", "compile_mode", "why"),
    [
        (CPU, 1, False, "it needs a CUDA GPU"),
        (GPU, 1, "reduce-overhead", "model.compile=reduce-overhead makes its own graphs"),
        (GPU, 1, True, r"model.compile=true: a compiled network is graphed only as the whole step"),
        (GPU, 2, False, r"under DDP \(2 processes\)"),
    ],
)
def test_true_says_why_it_cannot(device, world_size, compile_mode, why):
    with pytest.raises(UserError, match=f"model.cuda_graph=true, but {why}.*model.cuda_graph=auto"):
        cuda_graphs.wanted(True, device, world_size, compile_mode)
    with pytest.raises(UserError, match=r"trainer.accumulate_grad_batches=4 adds gradients"):
        cuda_graphs.wanted(True, GPU, accumulate_grad_batches=4)
    with pytest.raises(UserError, match="model.cuda_graph='yes' must be auto, true, false or step"):
        cuda_graphs.wanted("yes", device, world_size, compile_mode)


def test_step_is_refused_with_why_where_no_graph_can_be_made():
    """model.cuda_graph=step asks for the whole step by name: on the CPU, under DDP or with
    accumulated gradients it is refused, as true is (it trained the plain step silently)."""
    for device, world_size, accumulate, why in (
        (CPU, 1, 1, "it needs a CUDA GPU"),
        (GPU, 2, 1, r"under DDP \(2 processes\)"),
        (GPU, 1, 4, "trainer.accumulate_grad_batches=4 adds gradients"),
    ):
        with pytest.raises(UserError, match=f"model.cuda_graph=step, but {why}.*cuda_graph=auto"):
            cuda_graphs.wanted(
                "step", device, world_size, accumulate_grad_batches=accumulate, whole_step=True
            )
    assert cuda_graphs.wanted("step", GPU, 1, whole_step=True)


class StandIn:
    """torch.cuda.make_graphed_callables without a GPU: the warm-up forwards in training mode,
    then the module, whose calls are counted with their batch sizes."""

    def __init__(self):
        self.replayed: list[int] = []

    def __call__(self, module, sample_args, num_warmup_iters=3):
        # what make_graphed_callables asserts first
        assert not (torch.is_autocast_enabled() and torch.is_autocast_cache_enabled())
        assert not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)
        assert not any(b.requires_grad for b in module.buffers())
        assert all(not a.requires_grad for a in sample_args)
        for _ in range(num_warmup_iters):
            module(*sample_args)
        forward = module.forward

        def replay(x):
            self.replayed.append(len(x))
            return forward(x)

        module.forward = replay
        return module


def test_capture_leaves_the_batch_norm_statistics_as_they_were(monkeypatch):
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", StandIn())
    network = Network(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten()), nn.LazyLinear(2)
    )
    network(torch.randn(2, 3, 5, 5))  # the lazy layer's shape
    before = [b.clone() for b in network.buffers()]
    graph = cuda_graphs.TrainingGraph(network, torch.randn(8, 3, 5, 5) + 3.0)
    assert all(torch.equal(a, b) for a, b in zip(before, network.buffers(), strict=True))
    assert graph.fits(torch.zeros(8, 3, 5, 5)) and not graph.fits(torch.zeros(7, 3, 5, 5))


def test_with_graphs_an_unset_fused_optimizer_runs_fused():
    """The fast step's update is fused Adam (one kernel): the same update as the plain step's
    foreach or for-loop Adam up to rounding (one step here: allowed 1.2e-7 apart), so the
    equivalence test below gives both steps the same optimizer."""
    from functools import partial

    def optimizer(fused, graphs, clip=None):
        model = MedMNISTClassifier(
            ["a", "b"], optimizer=partial(torch.optim.Adam, lr=1e-3, fused=fused)
        )
        model.graphs_wanted = graphs
        model._trainer = SimpleNamespace(gradient_clip_val=clip)
        return model.configure_optimizers()

    assert optimizer(None, graphs=True).param_groups[0]["fused"] is True
    assert optimizer(False, graphs=True).param_groups[0]["fused"] is False  # as configured
    assert optimizer(None, graphs=False).param_groups[0]["fused"] is None
    # Lightning refuses to clip a fused optimizer's gradients under mixed precision
    assert optimizer(None, graphs=True, clip=1.0).param_groups[0]["fused"] is None

    g = torch.Generator().manual_seed(0)
    start, grad = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    updated = []
    for fused in (True, None):
        weights = torch.nn.Parameter(start.clone())
        weights.grad = grad
        torch.optim.Adam([weights], lr=1e-3, fused=fused).step()
        updated.append(weights.detach())
    torch.testing.assert_close(updated[0], updated[1], atol=1.2e-7, rtol=0)


class CaptureStandIn:
    """cuda_graphs.warm_up and .capture without a GPU: the warm-up runs the step on the CPU;
    the capture records it without running it, and each replay runs it again and writes its
    loss into the captured output, as a graph's replay overwrites its output tensor."""

    def __init__(self):
        self.replays = 0

    def warm_up(self, step, times=3):
        for _ in range(times):
            step()

    def capture(self, step):
        output = torch.full((), float("nan"))

        def replay():
            self.replays += 1
            output.copy_(step())

        return replay, output


def whole_step_graphs_as_on_one_gpu(monkeypatch) -> CaptureStandIn:
    """Runs train as on one GPU (cuda_graphs.wanted is true) with the capture's stand-ins:
    their `replays` count the step graph's."""
    stand_in = CaptureStandIn()
    monkeypatch.setattr(cuda_graphs, "warm_up", stand_in.warm_up)
    monkeypatch.setattr(cuda_graphs, "capture", stand_in.capture)
    monkeypatch.setattr(cuda_graphs, "wanted", lambda *args, **kwargs: True)
    return stand_in


def small_network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2)
    )


def test_the_step_graph_trains_as_the_plain_loop_and_follows_the_learning_rate(monkeypatch):
    """StepGraph alone, with the stand-ins: four steps equal the plain loop's, from a fresh
    optimizer and from one with state (the warm-up's training undone both times); a learning
    rate set on the group reaches the captured update; the checkpoint's optimizer state and the
    optimizer after close() are as configured (capturable false)."""
    stand_in = CaptureStandIn()
    monkeypatch.setattr(cuda_graphs, "warm_up", stand_in.warm_up)
    monkeypatch.setattr(cuda_graphs, "capture", stand_in.capture)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(8, 3, 6, 6, generator=g) for _ in range(4)]
    ys = [torch.randint(0, 2, (8, 2), generator=g).float() for _ in range(4)]

    def bce(logits, targets):
        return nn.functional.binary_cross_entropy_with_logits(logits, targets)

    def networks_and_optimizers(steps_before: int):
        pairs = []
        for _ in range(2):
            net = small_network()
            net(xs[0])  # the lazy layer's shape
            opt = torch.optim.Adam(net.parameters(), lr=1e-2, fused=True)
            for x, y in zip(xs[:steps_before], ys[:steps_before], strict=True):
                opt.zero_grad()
                bce(net(x), y).backward()
                opt.step()
            pairs.append((net, opt))
        return pairs

    for steps_before in (0, 2):  # a fresh optimizer; one with state, as after a resume
        (plain, plain_opt), (graphed, opt) = networks_and_optimizers(steps_before)
        graph = cuda_graphs.StepGraph(graphed, bce, opt, xs[0], ys[0])
        for x, y in zip(xs, ys, strict=True):
            plain_opt.zero_grad()
            expected = bce(plain(x), y)
            expected.backward()
            plain_opt.step()
            assert graph(x, y).item() == expected.item()
        for a, b in zip(plain.state_dict().values(), graphed.state_dict().values(), strict=True):
            assert torch.equal(a, b)  # weights and batch-norm statistics
        assert opt.state_dict()["state"][0]["step"].item() == steps_before + 4

    opt.param_groups[0]["lr"] = 0.0  # as a scheduler sets it: the update must not move anything
    before = [p.detach().clone() for p in graphed.parameters()]
    graph(xs[0], ys[0])
    assert all(torch.equal(a, b) for a, b in zip(before, graphed.parameters(), strict=True))
    assert opt.param_groups[0]["lr"] == 0.0 and isinstance(opt.param_groups[0]["lr"], float)

    state = opt.state_dict()
    state["param_groups"][0]["capturable"] = True  # what CUDA runs with
    graph.portable(state)
    opt.param_groups[0]["capturable"] = True
    graph.close()
    assert state["param_groups"][0]["capturable"] is False
    assert opt.param_groups[0]["capturable"] is False


def test_a_failed_capture_leaves_the_model_and_optimizer_as_they_were(monkeypatch):
    """The warm-up trains three steps; a capture that fails after it (or Ctrl-C) must not leave
    them in the weights, the batch-norm statistics or Adam's state, which a checkpoint would
    then keep, nor the optimizer capturable."""
    stand_in = CaptureStandIn()
    monkeypatch.setattr(cuda_graphs, "warm_up", stand_in.warm_up)

    def failing_capture(step):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graphs, "capture", failing_capture)
    net = small_network()
    x, y = torch.randn(8, 3, 6, 6), torch.ones(8, 2)
    net(x)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, fused=True)
    opt.zero_grad()
    nn.functional.binary_cross_entropy_with_logits(net(x), y).backward()
    opt.step()  # Adam has state, as in a resumed run
    before = {k: v.clone() for k, v in net.state_dict().items()}
    moments = [s["exp_avg"].clone() for s in opt.state.values()]
    with pytest.raises(RuntimeError, match="stream is capturing"):
        cuda_graphs.StepGraph(net, nn.functional.binary_cross_entropy_with_logits, opt, x, y)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(
        torch.equal(a, s["exp_avg"]) for a, s in zip(moments, opt.state.values(), strict=True)
    )
    assert [s["step"].item() for s in opt.state.values()] == [1.0] * len(moments)
    assert opt.param_groups[0]["capturable"] is False


@pytest.mark.parametrize(
    ("clip", "precision", "optimizer", "why"),
    [
        (1.0, "bf16-mixed", torch.optim.Adam, r"trainer.gradient_clip_val=1.0 clips"),
        (None, "16-mixed", torch.optim.Adam, r"trainer.precision=16-mixed scales the loss"),
        (None, "bf16-mixed", torch.optim.SGD, "the graph captures Adam or AdamW, not SGD"),
    ],
)
def test_the_step_graph_refuses_what_it_would_leave_out(clip, precision, optimizer, why):
    from functools import partial

    model = MedMNISTClassifier(["a", "b"], optimizer=partial(optimizer, lr=1e-3), cuda_graph="step")
    model.graphs_wanted = model.whole_step_wanted = True  # as setup("fit") on one GPU
    model._trainer = SimpleNamespace(gradient_clip_val=clip, precision=precision)
    with pytest.raises(UserError, match=f"model.cuda_graph=step, but {why}.*cuda_graph=auto"):
        model.configure_optimizers()
    model._trainer = SimpleNamespace(gradient_clip_val=None, precision="bf16-mixed")
    if optimizer is torch.optim.Adam:  # what it takes
        assert isinstance(model.configure_optimizers(), torch.optim.Adam)


def test_true_and_step_are_refused_from_the_config_before_any_data(monkeypatch, tmp_path):
    """What the config alone rules out is refused by check_config, before data is made and
    before any sweep job starts (it was refused only as the fit began, after the data), with
    the words the model uses; what may take a graph passes."""
    from chest_mnist.config_checks import check_config

    missing = [f"data.path={tmp_path}/none.npz", "data=synthetic"]  # read by nothing here

    def check(*overrides):
        check_config(compose_train([*missing, *overrides]))

    for setting in ("true", "step"):  # this machine, as the tests run it: no GPU
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
        with pytest.raises(UserError, match=f"cuda_graph={setting}, but it needs a CUDA GPU"):
            check(f"model.cuda_graph={setting}")
        check("model.cuda_graph=auto")  # the plain step there
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on two GPUs
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
        for overrides, why in (
            (["trainer.devices=2"], r"under DDP \(2 processes\)"),
            (["trainer.devices=auto"], r"under DDP \(2 processes\)"),
            (["trainer.devices=-1"], r"under DDP \(2 processes\)"),
            (["trainer.devices=[0,1]"], r"under DDP \(2 processes\)"),
            (["trainer.devices='0,1'"], r"under DDP \(2 processes\)"),
            (["+trainer.num_nodes=2"], r"under DDP \(2 processes\)"),
            (["+trainer.accumulate_grad_batches=4"], "trainer.accumulate_grad_batches=4 adds"),
            (["model.compile=reduce-overhead"], "model.compile=reduce-overhead makes its own"),
            (["model.compile=max-autotune"], "model.compile=max-autotune makes its own"),
            (["trainer=cpu"], "it needs a CUDA GPU"),
        ):
            with pytest.raises(UserError, match=f"model.cuda_graph={setting}, but {why}"):
                check(f"model.cuda_graph={setting}", *overrides)
        check(f"model.cuda_graph={setting}", "model.compile=false")
        check(f"model.cuda_graph={setting}", "trainer.devices=1", "model.compile=auto")
    with pytest.raises(UserError, match="model.compile=true: a compiled network is graphed only"):
        check("model.cuda_graph=true", "model.compile=true")
    check("model.cuda_graph=step", "model.compile=true")
    for overrides, why in (
        (["+trainer.gradient_clip_val=1.0"], "trainer.gradient_clip_val=1.0 clips"),
        (["trainer.precision=16-mixed"], "trainer.precision=16-mixed scales the loss"),
        (["trainer.precision=16"], "trainer.precision=16-mixed scales the loss"),
        (["model.optimizer._target_=torch.optim.SGD"], "the graph captures Adam or AdamW, not SGD"),
    ):
        with pytest.raises(UserError, match=f"model.cuda_graph=step, but {why}.*cuda_graph=auto"):
            check("model.cuda_graph=step", *overrides)
        check("model.cuda_graph=true", *overrides)  # the forward and backward graphs take these
    check("model.cuda_graph=step", "model.optimizer._target_=torch.optim.AdamW")
    for precision in ("bf16-mixed", "16-true", "32-true"):
        check("model.cuda_graph=step", f"trainer.precision={precision}")
    unknown = "model.optimizer._target_=torch.optim.Nothing"  # named when the model is built
    check("model.cuda_graph=step", unknown)
    with pytest.raises(UserError, match="trainer.gradient_clip_val=1.0 clips"):
        check("model.cuda_graph=step", unknown, "+trainer.gradient_clip_val=1.0")
    with pytest.raises(UserError, match="model.compile='bogus' is unknown"):
        check("model.cuda_graph=true", "model.compile=bogus")
    # a sweep's jobs that run elsewhere (SLURM): that machine's GPUs are not this one's, so only
    # what the config says counts, and devices=auto is not read as this machine's count
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)

    def check_elsewhere(*overrides):
        check_config(compose_train([*missing, *overrides]), check_devices=False)

    check_elsewhere("model.cuda_graph=step", "trainer.devices=auto")
    for overrides, why in (
        (["trainer=cpu"], "it needs a CUDA GPU"),
        (["trainer.devices=4"], r"under DDP \(4 processes\)"),
        (["+trainer.accumulate_grad_batches=2"], "trainer.accumulate_grad_batches=2 adds"),
        (["+trainer.gradient_clip_val=1.0"], "trainer.gradient_clip_val=1.0 clips"),
    ):
        with pytest.raises(UserError, match=f"model.cuda_graph=step, but {why}"):
            check_elsewhere("model.cuda_graph=step", *overrides)


# Three epochs of three steps (32, 32 and a partial 16), the learning rate x0.1 after the first
# and the second epoch, the same optimizer (fused Adam, what the fast steps use).
EQUIVALENCE_RUN = [
    "data=synthetic",
    "data.subset=80",
    "data.batch_size=32",
    "model.stem=imagenet",
    "model.scheduler.milestones=[1,2]",
    "trainer=cpu",
    "trainer.max_epochs=3",
    "trainer.deterministic=true",
    "+trainer.enable_progress_bar=false",
    "~callbacks.progress_bar",
    "~callbacks.model_summary",
    "test=false",
    "model.optimizer.fused=true",  # both steps: the optimizer the fast step uses
    # the default, auto, would compile the whole step (tests that want it say so)
    "model.compile=false",
]


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, synthetic_npz):
    """The equivalence run with the plain step: its last.ckpt."""
    out = tmp_path_factory.mktemp("plain")
    train(
        compose_train(
            [*EQUIVALENCE_RUN, f"data.path={synthetic_npz}", "model.cuda_graph=false"]
            + [f"paths.output_dir={out}"]
        )
    )
    return load_checkpoint(out / "checkpoints" / "last.ckpt")


def assert_same_training_state(fast: dict, plain: dict) -> None:
    """The same weights, buffers (batch-norm statistics) and Adam moments to 1e-6, after the
    same number of steps and at the same learning rate."""
    assert fast["global_step"] == plain["global_step"] == 9
    assert [g["lr"] for g in fast["optimizer_states"][0]["param_groups"]] == pytest.approx([1e-5])
    for name, value in plain["state_dict"].items():
        torch.testing.assert_close(fast["state_dict"][name], value, atol=1e-6, rtol=0)
    moments = zip(
        plain["optimizer_states"][0]["state"].values(),
        fast["optimizer_states"][0]["state"].values(),
        strict=True,
    )
    for a, b in moments:
        torch.testing.assert_close(b["exp_avg"], a["exp_avg"], atol=1e-6, rtol=0)
        torch.testing.assert_close(b["exp_avg_sq"], a["exp_avg_sq"], atol=1e-6, rtol=0)
        torch.testing.assert_close(b["step"], a["step"], atol=0, rtol=0)


@pytest.mark.slow
def test_the_fast_step_learns_what_the_plain_step_learns(
    monkeypatch, tmp_path, synthetic_npz, caplog, plain_run
):
    stand_in = StandIn()
    caplog.set_level(logging.INFO, logger="chest_mnist.model")
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", stand_in)
    monkeypatch.setattr(cuda_graphs, "wanted", lambda *args, **kwargs: True)  # as on one GPU
    train(
        compose_train(
            [*EQUIVALENCE_RUN, f"data.path={synthetic_npz}", "model.cuda_graph=true"]
            + [f"paths.output_dir={tmp_path}/fast"]
        )
    )
    assert stand_in.replayed == [32, 32] * 3  # the full batches; the partial ones ran eagerly
    assert "captured for batches of (32, 3, 28, 28)" in caplog.text and "runs fused" in caplog.text
    assert_same_training_state(
        load_checkpoint(tmp_path / "fast" / "checkpoints" / "last.ckpt"), plain_run
    )


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["auto", "step"])
def test_the_whole_step_graph_learns_what_the_plain_step_learns_across_a_resume(
    monkeypatch, tmp_path, synthetic_npz, caplog, plain_run, setting
):
    """The whole step as one graph (model.cuda_graph=auto, the default, or step) for two
    epochs, then resumed from last.ckpt for the third: the training state of the plain step's
    three epochs. The learning rate changes at both epoch ends, once inside a fit and once
    across the resume, and reaches the graph's update only through its device tensors (the
    stand-in's replay reads them as the graph would)."""
    stand_in = whole_step_graphs_as_on_one_gpu(monkeypatch)
    caplog.set_level(logging.INFO, logger="chest_mnist.model")
    run = [*EQUIVALENCE_RUN, f"data.path={synthetic_npz}", f"model.cuda_graph={setting}"]
    out = tmp_path / "step"
    train(compose_train([*run, "trainer.max_epochs=2", f"paths.output_dir={out}"]))
    assert stand_in.replays == 4  # the full batches; the partial ones ran eagerly
    first = load_checkpoint(out / "checkpoints" / "last.ckpt")
    assert first["global_step"] == 6
    for group in first["optimizer_states"][0]["param_groups"]:  # plain numbers, as configured
        assert type(group["lr"]) is float and group["capturable"] is False

    ckpt = out / "checkpoints" / "last.ckpt"
    train(compose_train([*run, f"ckpt_path={ckpt}", f"paths.output_dir={tmp_path}/resumed"]))
    assert stand_in.replays == 6
    assert (
        caplog.text.count(
            "the whole training step (forward, loss, backward and Adam's update, fused) captured for batches of (32, 3, 28, 28)"
        )
        == 2
    )
    resumed = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert_same_training_state(resumed, plain_run)


@pytest.mark.slow
def test_with_clipped_gradients_auto_graphs_the_forward_and_backward(
    monkeypatch, tmp_path, synthetic_npz, caplog
):
    """model.cuda_graph=auto with trainer.gradient_clip_val, as on one GPU: Lightning clips
    between the backward and the update, so the graphs are the forward and backward (the full
    batches replay them) and the optimizer is left as configured (Lightning does not clip a
    fused one under mixed precision); the log says why."""
    stand_in = StandIn()
    caplog.set_level(logging.INFO, logger="chest_mnist.model")
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", stand_in)
    monkeypatch.setattr(cuda_graphs, "wanted", lambda *args, **kwargs: True)  # as on one GPU
    run = [*EQUIVALENCE_RUN, f"data.path={synthetic_npz}", "model.optimizer.fused=null"]
    train(
        compose_train(
            [*run, "+trainer.gradient_clip_val=1.0", f"paths.output_dir={tmp_path}/clipped"]
        )
    )
    assert stand_in.replayed == [32, 32] * 3  # the full batches; the partial ones ran eagerly
    assert "trainer.gradient_clip_val=1.0 clips the gradients" in caplog.text
    assert "the forward and backward as graphs instead" in caplog.text
    assert "runs as configured" in caplog.text  # not made fused
    assert "the whole training step" not in caplog.text


@pytest.mark.slow
def test_the_whole_step_graph_with_ema_averages_what_the_plain_step_averages(
    monkeypatch, tmp_path, synthetic_npz
):
    """callbacks=ema, averaging from the first step: the EMA callback's batch hooks run around
    each replay and average the weights the graph's update wrote, as after a plain step."""
    run = [
        *EQUIVALENCE_RUN,
        f"data.path={synthetic_npz}",
        "callbacks=ema",
        "callbacks.ema.update_starting_at_step=0",
    ]
    train(compose_train([*run, "model.cuda_graph=false", f"paths.output_dir={tmp_path}/plain"]))
    stand_in = whole_step_graphs_as_on_one_gpu(monkeypatch)
    train(compose_train([*run, "model.cuda_graph=step", f"paths.output_dir={tmp_path}/step"]))
    assert stand_in.replays == 6
    plain, step = (
        load_checkpoint(tmp_path / name / "checkpoints" / "last.ckpt") for name in ("plain", "step")
    )
    (ema_key,) = [k for k in plain["callbacks"] if "EMAWeightAveraging" in k]
    averages = plain["callbacks"][ema_key], step["callbacks"][ema_key]
    assert averages[0]["latest_update_step"] == averages[1]["latest_update_step"] == 9
    for name, value in plain["state_dict"].items():  # the averaged weights, at the end of fit
        torch.testing.assert_close(step["state_dict"][name], value, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_the_whole_step_graph_of_the_compiled_network_compiles_once_and_learns_the_same(
    monkeypatch, tmp_path, synthetic_npz, caplog
):
    """model.compile=true with model.cuda_graph=step: the graph records the compiled network's
    step (inductor's kernels), and the batches it does not take, the partial last one of each
    epoch and evaluation, run the eager code: one compilation in all. Without partial batches
    (data.drop_last=true), the same training state as the compiled plain step's. (Not the
    eager step's: inductor's kernels round otherwise, and Adam, which divides each gradient by
    its own size, makes near-zero gradients of opposite sign into steps of opposite sign.)"""
    from torch._dynamo.utils import counters

    run = [
        *EQUIVALENCE_RUN,
        f"data.path={synthetic_npz}",
        "model.compile=true",
        "trainer.check_val_every_n_epoch=3",  # validation runs eagerly in any case
    ]
    train(
        compose_train(
            [
                *run,
                "model.cuda_graph=false",
                "data.drop_last=true",
                f"paths.output_dir={tmp_path}/plain",
            ]
        )
    )
    stand_in = whole_step_graphs_as_on_one_gpu(monkeypatch)
    caplog.set_level(logging.INFO, logger="chest_mnist.model")
    run.append("model.cuda_graph=step")
    train(compose_train([*run, "data.drop_last=true", f"paths.output_dir={tmp_path}/step"]))
    assert stand_in.replays == 6
    assert "fused) compiled (model.compile) and captured for batches of (32, 3, 28, 28)" in (
        caplog.text
    )
    plain, step = (
        load_checkpoint(tmp_path / name / "checkpoints" / "last.ckpt") for name in ("plain", "step")
    )
    assert plain["global_step"] == step["global_step"] == 6
    for name, value in plain["state_dict"].items():
        torch.testing.assert_close(step["state_dict"][name], value, atol=1e-6, rtol=0)

    torch._dynamo.reset()  # compile from scratch (a new network of the same code would not)
    counters.clear()
    train(compose_train([*run, f"paths.output_dir={tmp_path}/partial"]))
    assert counters["stats"]["unique_graphs"] == 1  # the training step's, and no other
    assert stand_in.replays == 6 + 6  # the full batches; the partial ones ran eagerly
    assert load_checkpoint(tmp_path / "partial" / "checkpoints" / "last.ckpt")["global_step"] == 9


class WaitForTheBackgroundCompile(L.Callback):
    """At the second epoch's start, wait for the process that compiles the network, so that
    the run takes the compiled network from that epoch's first step (on a GPU it does not
    wait: it takes it at the first step after the process is done)."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1 and pl_module.background_compile is not None:
            pl_module.background_compile.process.wait(timeout=600)


# model.compile=true with the step graph, not deterministic (EQUIVALENCE_RUN's runs are): the
# network is compiled in a separate process; 2 full steps an epoch (data.drop_last=true); under
# Lightning's bf16 autocast, as on a GPU
BACKGROUND_RUN = [
    *[o for o in EQUIVALENCE_RUN if not o.startswith("trainer.deterministic")],
    "trainer.deterministic=false",
    "trainer.precision=bf16-mixed",
    "data.drop_last=true",
    "model.compile=true",
    "trainer.check_val_every_n_epoch=3",
]


@pytest.fixture(scope="module")
def inductor_cache(tmp_path_factory):
    """An empty inductor cache directory for this module's runs (and their processes')."""
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    with temporary_cache_dir(str(tmp_path_factory.mktemp("inductor"))):
        yield


@pytest.mark.slow
def test_the_compiled_step_graph_trains_uncompiled_while_a_process_compiles_the_network(
    monkeypatch, tmp_path, synthetic_npz, caplog, inductor_cache
):
    """model.compile=true model.cuda_graph=step: the first epoch's steps replay the network
    uncompiled while a separate process compiles it; from the second epoch's first step the run
    compiles it from that process's caches (hits only: it compiles nothing itself) and replays
    the compiled step. Its training state is the plain step's, uncompiled for the first epoch
    and compiled after it (resumed from the first epoch's last.ckpt)."""
    from torch._dynamo.utils import counters

    import chest_mnist.model

    run = [*BACKGROUND_RUN, f"data.path={synthetic_npz}"]
    caplog.set_level(logging.INFO, logger="chest_mnist.model")
    specs = []

    def recorded_spec(*args):
        specs.append(spec_for(*args))
        return specs[-1]

    with monkeypatch.context() as patch:
        patch.setattr(chest_mnist.model, "spec_for", recorded_spec)
        stand_in = whole_step_graphs_as_on_one_gpu(patch)
        torch._dynamo.reset()
        counters.clear()
        wait = "+callbacks.wait._target_=tests.test_cuda_graphs.WaitForTheBackgroundCompile"
        train(
            compose_train(
                [*run, "model.cuda_graph=step", wait, f"paths.output_dir={tmp_path}/step"]
            )
        )
    assert stand_in.replays == 6
    (spec,) = specs  # the process compiles for Lightning's autocast, as the run does
    assert (spec["autocast"], spec["shape"], spec["channels_last"]) == (
        "bfloat16",
        [32, 3, 28, 28],
        True,
    )
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["aot_autograd"]["autograd_cache_hit"] >= 1
    assert counters["inductor"]["fxgraph_cache_miss"] == 0
    assert counters["aot_autograd"]["autograd_cache_miss"] == 0
    messages = [r.getMessage() for r in caplog.records]
    uncompiled = "fused) of the network uncompiled (model.compile: a separate process compiles it) captured for batches of (32, 3, 28, 28)"
    switched = "model.compile: a separate process compiled the network in"
    compiled = "fused) compiled (model.compile) and captured for batches of (32, 3, 28, 28) in "
    order = [
        next(i for i, m in enumerate(messages) if text in m)
        for text in (uncompiled, switched, compiled)
    ]
    assert order == sorted(order) and "up to step 2;" in messages[order[1]]
    assert messages[order[2]].endswith("s; inductor's caches: 3 hits, 0 misses.")

    plain = tmp_path / "plain"
    train(
        compose_train(
            [
                *run,
                "model.compile=false",
                "model.cuda_graph=false",
                "trainer.max_epochs=1",
                f"paths.output_dir={plain}",
            ]
        )
    )
    ckpt = plain / "checkpoints" / "last.ckpt"
    train(
        compose_train(
            [
                *run,
                "model.cuda_graph=false",
                f"ckpt_path={ckpt}",
                f"paths.output_dir={tmp_path}/resumed",
            ]
        )
    )
    resumed, step = (
        load_checkpoint(tmp_path / name / "checkpoints" / "last.ckpt")
        for name in ("resumed", "step")
    )
    assert resumed["global_step"] == step["global_step"] == 6
    for name, value in resumed["state_dict"].items():
        torch.testing.assert_close(step["state_dict"][name], value, atol=1e-6, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["true", "auto"])
def test_where_the_process_fails_the_run_says_why_and_trains_on(
    setting, monkeypatch, tmp_path, synthetic_npz, caplog, inductor_cache
):
    """The process cannot compile (here: a stem it does not know): the run says why, with the
    end of the process's output; model.compile=true then compiles the network in the run's
    own process, model.compile=auto replays the graph of the uncompiled network to the end
    (captured once; nothing compiled in the run's process)."""
    from torch._dynamo.utils import counters

    import chest_mnist.model

    def bad_spec(*args):
        return spec_for(*args) | {"stem": "vit"}

    spec_for = chest_mnist.model.spec_for
    monkeypatch.setattr(chest_mnist.model, "spec_for", bad_spec)
    stand_in = whole_step_graphs_as_on_one_gpu(monkeypatch)
    caplog.set_level(logging.INFO, logger="chest_mnist.model")
    torch._dynamo.reset()
    counters.clear()
    wait = "+callbacks.wait._target_=tests.test_cuda_graphs.WaitForTheBackgroundCompile"
    run = [*BACKGROUND_RUN, f"data.path={synthetic_npz}", "model.cuda_graph=step", wait]
    run += [f"model.compile={setting}", "trainer.max_epochs=2", f"paths.output_dir={tmp_path}"]
    train(compose_train(run))
    (failed,) = [
        r for r in caplog.records if r.name == "chest_mnist.model" and r.levelno == logging.WARNING
    ]
    assert failed.getMessage().startswith(
        "model.compile: the separate process could not compile the network (exit status 1: "
    )
    assert "model.stem='vit' is unknown" in failed.getMessage()
    captures = [m for m in caplog.messages if m.startswith("CUDA graph: the whole training step")]
    assert stand_in.replays == 4
    if setting == "true":
        assert failed.getMessage().endswith("compiling it here instead.")
        assert len(captures) == 2 and "fused) compiled (model.compile) and captured" in captures[1]
        assert counters["stats"]["unique_graphs"] == 1
    else:
        assert failed.getMessage().endswith(
            "model.compile=auto goes on with it uncompiled (model.compile=true compiles it in "
            "the run's own process instead)."
        )
        assert len(captures) == 1 and "of the network uncompiled" in captures[0]
        assert counters["stats"]["unique_graphs"] == 0


class NeverDone:
    """A BackgroundCompile whose process never finishes."""

    instances: list = []

    def __init__(self, spec):
        self.closed = False
        NeverDone.instances.append(self)

    def finished(self):
        return False

    def close(self):
        self.closed = True


@pytest.mark.slow
def test_a_fit_that_ends_before_the_process_stops_it_and_trained_uncompiled(
    monkeypatch, tmp_path, synthetic_npz, caplog
):
    from torch._dynamo.utils import counters

    import chest_mnist.model

    monkeypatch.setattr(chest_mnist.model, "BackgroundCompile", NeverDone)
    stand_in = whole_step_graphs_as_on_one_gpu(monkeypatch)
    caplog.set_level(logging.INFO, logger="chest_mnist.model")
    NeverDone.instances.clear()
    torch._dynamo.reset()
    counters.clear()
    run = [*BACKGROUND_RUN, f"data.path={synthetic_npz}", "model.cuda_graph=step"]
    train(compose_train([*run, "trainer.max_epochs=2", f"paths.output_dir={tmp_path}"]))
    (process,) = NeverDone.instances
    assert process.closed and stand_in.replays == 4
    assert counters["stats"]["unique_graphs"] == 0  # nothing compiled in this process
    assert "the fit ended before the separate process had compiled the network" in caplog.text


def small_background_compile(cache_dir) -> BackgroundCompile:
    """A process compiling a small network on the CPU, with its inductor cache in cache_dir."""
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    network = Network(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), nn.Linear(4 * 26 * 26, 2))
    spec = spec_for(network, "cifar", True, torch.zeros(8, 3, 28, 28), autocast=False)
    with temporary_cache_dir(str(cache_dir)):
        return BackgroundCompile(spec)


def test_close_stops_the_process_at_once(tmp_path):
    """A cold compilation takes seconds; close() ends the process (and its group) now."""
    compiling = small_background_compile(tmp_path)
    compiling.close()
    assert compiling.process.returncode == -9  # killed, not ended on its own


def test_the_process_runs_nicer_than_the_run(tmp_path):
    """The process (and the compile workers it would start) yields the cores to the run."""
    from chest_mnist.background_compile import NICER_BY

    run = os.getpriority(os.PRIO_PROCESS, 0)
    compiling = small_background_compile(tmp_path)
    try:
        assert os.getpriority(os.PRIO_PROCESS, compiling.process.pid) == min(19, run + NICER_BY)
    finally:
        compiling.close()
    assert os.getpriority(os.PRIO_PROCESS, 0) == run  # the run's own is unchanged


def test_the_process_gets_the_settings_that_inductor_keys_its_caches_by():
    """A setting the run has changed (here: bf16 reductions in matmuls flipped) reaches the
    process's torch, and the others stay as they are."""
    from chest_mnist import background_compile

    matmul = torch.backends.cuda.matmul
    network = Network(nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    before = matmul.allow_bf16_reduced_precision_reduction
    try:
        matmul.allow_bf16_reduced_precision_reduction = not before
        spec = spec_for(network, "cifar", True, torch.zeros(2, 3, 4, 4), autocast=False)
    finally:
        matmul.allow_bf16_reduced_precision_reduction = before
    settings = spec["settings"]
    assert settings["backends.cuda.matmul.allow_bf16_reduced_precision_reduction"] is (not before)
    precision = matmul.fp32_precision
    try:
        background_compile.apply_settings(settings)
        assert matmul.allow_bf16_reduced_precision_reduction is (not before)
        assert matmul.fp32_precision == precision
    finally:
        matmul.allow_bf16_reduced_precision_reduction = before


class RaiseAtStep(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 2:
            raise RuntimeError("a fit that fails at step 2")


@pytest.mark.slow
def test_a_fit_that_raises_stops_the_process_and_one_without_it_compiles_here(
    monkeypatch, tmp_path, synthetic_npz, caplog
):
    """The fit raises while the process compiles: Lightning calls none of the model's hooks,
    and the process is stopped all the same. With model.compile_in_background=false no process
    starts and the first step compiles the network here. Both with model.compile=auto, which
    compiles where the whole step is one graph."""
    import chest_mnist.model

    monkeypatch.setattr(chest_mnist.model, "BackgroundCompile", NeverDone)
    stand_in = whole_step_graphs_as_on_one_gpu(monkeypatch)
    NeverDone.instances.clear()
    run = [
        *BACKGROUND_RUN,
        f"data.path={synthetic_npz}",
        "model.cuda_graph=step",
        "model.compile=auto",
    ]
    fails = "+callbacks.fail._target_=tests.test_cuda_graphs.RaiseAtStep"
    with pytest.raises(RuntimeError, match="a fit that fails at step 2"):
        train(compose_train([*run, fails, f"paths.output_dir={tmp_path}/fails"]))
    (process,) = NeverDone.instances
    assert process.closed and stand_in.replays == 2

    caplog.set_level(logging.INFO, logger="chest_mnist.model")
    off = ["model.compile_in_background=false", "trainer.max_epochs=1"]
    train(compose_train([*run, *off, f"paths.output_dir={tmp_path}/here"]))
    assert len(NeverDone.instances) == 1 and stand_in.replays == 4
    assert "fused) compiled (model.compile) and captured for batches of" in caplog.text


@pytest.mark.slow
def test_compile_auto_compiles_nothing_where_the_whole_step_is_not_one_graph(
    monkeypatch, tmp_path, synthetic_npz
):
    """model.compile=auto on the CPU (no graphs) and with the forward and backward graphs
    (cuda_graph=true, as on one GPU): nothing compiles, and the graphs are captured."""
    from torch._dynamo.utils import counters

    run = [
        *EQUIVALENCE_RUN,
        f"data.path={synthetic_npz}",
        "model.compile=auto",
        "trainer.max_epochs=1",
    ]
    torch._dynamo.reset()
    counters.clear()
    train(compose_train([*run, f"paths.output_dir={tmp_path}/cpu"]))
    stand_in = StandIn()
    asked, real_wanted = [], cuda_graphs.wanted

    def wanted(setting, device, compile_mode, **kwargs):  # the real rules, as on one GPU
        asked.append(compile_mode)
        return real_wanted(setting, GPU, compile_mode=compile_mode)

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", stand_in)
    monkeypatch.setattr(cuda_graphs, "wanted", wanted)
    train(compose_train([*run, "model.cuda_graph=true", f"paths.output_dir={tmp_path}/graphs"]))
    # not "auto", which would read as a compiled network: asked by check_config, then by setup
    assert asked == [False, False]
    assert stand_in.replayed == [32, 32]  # the forward and backward graphs took the full batches
    assert counters["stats"]["unique_graphs"] == 0
    checkpoint = load_checkpoint(tmp_path / "cpu" / "checkpoints" / "last.ckpt")
    assert checkpoint["hyper_parameters"]["compile"] == "auto"


@pytest.mark.parametrize("cuda_graph", ["auto", "step"])
def test_compile_auto_decides_at_each_fit_by_the_real_rules(caplog, cuda_graph):
    """model.compile=auto with cuda_graph=auto (the defaults) or step: compiled on one CUDA
    GPU; not on the CPU, under DDP or with accumulated gradients (cuda_graphs.wanted's own
    rules), nor, with auto, where the graph is not the whole step (clipped gradients); a later
    fit where the step is not one graph undoes an earlier fit's compilation. An unknown value
    is refused."""
    from functools import partial

    model = MedMNISTClassifier(
        ["a", "b"],
        optimizer=partial(torch.optim.Adam, lr=1e-3),
        compile="auto",
        cuda_graph=cuda_graph,
    )
    assert model.compile_mode is False and model.backbone._compiled_call_impl is None
    caplog.set_level(logging.INFO, logger="chest_mnist.model")

    def fit_on(device, world_size=1, accumulate=1, clip=None) -> bool:
        model._trainer = trainer_for_setup(
            device,
            world_size=world_size,
            accumulate_grad_batches=accumulate,
            gradient_clip_val=clip,
        )
        model.setup("fit")
        compiled = model.backbone._compiled_call_impl is not None
        assert model.compile_mode is compiled
        return compiled

    assert fit_on(GPU)
    assert (
        "model.compile=auto: compiled, as the whole training step is one CUDA graph" in caplog.text
    )
    if cuda_graph == "auto":
        assert not fit_on(CPU)  # undone
        assert (
            "not compiled: the whole training step is not one CUDA graph here "
            "(model.cuda_graph=auto, on cpu, 1 process(es))" in caplog.text
        )
        assert fit_on(GPU)
        assert not fit_on(GPU, world_size=2)
        assert not fit_on(GPU, accumulate=2)
        # the forward and backward graphs, of the network uncompiled
        assert not fit_on(GPU, clip=1.0) and model.graphs_wanted
    else:  # step, asked for by name, is refused where the step cannot be one graph
        for where in ({"device": CPU}, {"world_size": 2}, {"accumulate": 2}):
            with pytest.raises(UserError, match="model.cuda_graph=step, but "):
                fit_on(**({"device": GPU} | where))
    for typo in ("atuo", "Auto", 1):
        with pytest.raises(
            UserError, match=f"model.compile={typo!r} is unknown: set true, false, auto"
        ):
            MedMNISTClassifier(["a", "b"], compile=typo)
