"""model.cuda_graph: when the training step replays CUDA graphs, and that it learns exactly what
the plain step learns. Capturing needs a GPU; here torch.cuda.make_graphed_callables is
replaced by a stand-in that does what it does to the model (warm-up forwards in training mode,
which move the batch-norm statistics) and returns the network unchanged, so the rest of the
fast step (which batches take the graph, the statistics put back, the fused optimizer, the
schedule) runs for real. The capture itself is checked on a GPU (benchmarks/)."""

import logging

import pytest
import torch
from torch import nn

from chest_mnist import UserError, cuda_graphs
from chest_mnist.checkpoints import load_checkpoint
from chest_mnist.model import Network
from chest_mnist.train import train
from tests.conftest import compose_train

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


def test_auto_graphs_one_gpu_without_compile_or_ddp():
    assert cuda_graphs.wanted("auto", GPU, 1, compiled=False)
    assert not cuda_graphs.wanted("auto", CPU, 1, compiled=False)
    assert not cuda_graphs.wanted("auto", GPU, 1, compiled=True)
    assert not cuda_graphs.wanted("auto", GPU, 2, compiled=False)
    assert not cuda_graphs.wanted(False, GPU, 1, compiled=False)
    assert not cuda_graphs.wanted("auto", GPU, 1, accumulate_grad_batches=2)


@pytest.mark.parametrize(
    ("device", "world_size", "compiled", "why"),
    [
        (CPU, 1, False, "it needs a CUDA GPU"),
        (GPU, 1, True, "model.compile makes its own graphs"),
        (GPU, 2, False, r"under DDP \(2 processes\)"),
    ],
)
def test_true_says_why_it_cannot(device, world_size, compiled, why):
    with pytest.raises(UserError, match=f"model.cuda_graph=true, but {why}.*model.cuda_graph=auto"):
        cuda_graphs.wanted(True, device, world_size, compiled)
    with pytest.raises(UserError, match=r"trainer.accumulate_grad_batches=4 adds gradients"):
        cuda_graphs.wanted(True, GPU, accumulate_grad_batches=4)
    with pytest.raises(UserError, match="model.cuda_graph='yes' must be auto, true or false"):
        cuda_graphs.wanted("yes", device, world_size, compiled)


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
    from types import SimpleNamespace

    from chest_mnist.model import MedMNISTClassifier

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


@pytest.mark.slow
def test_the_fast_step_learns_what_the_plain_step_learns(
    monkeypatch, tmp_path, synthetic_npz, caplog
):
    """Three epochs of three steps (32, 32 and a partial 16), the learning rate x0.1 after the
    first and the second epoch, the same optimizer (fused Adam, what the fast step uses): the
    same weights, buffers and optimizer state to 1e-6."""
    overrides = [
        "data=synthetic",
        f"data.path={synthetic_npz}",
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
    ]
    train(
        compose_train([*overrides, "model.cuda_graph=false", f"paths.output_dir={tmp_path}/plain"])
    )

    stand_in = StandIn()
    caplog.set_level(logging.INFO, logger="chest_mnist.model")
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", stand_in)
    monkeypatch.setattr(cuda_graphs, "wanted", lambda *args, **kwargs: True)  # as on one GPU
    train(compose_train([*overrides, f"paths.output_dir={tmp_path}/fast"]))
    assert stand_in.replayed == [32, 32] * 3  # the full batches; the partial ones ran eagerly
    assert "captured for batches of (32, 3, 28, 28)" in caplog.text and "runs fused" in caplog.text

    plain = load_checkpoint(tmp_path / "plain" / "checkpoints" / "last.ckpt")
    fast = load_checkpoint(tmp_path / "fast" / "checkpoints" / "last.ckpt")
    assert fast["global_step"] == plain["global_step"] == 9
    assert [g["lr"] for g in fast["optimizer_states"][0]["param_groups"]] == pytest.approx([1e-5])
    for name, value in plain["state_dict"].items():  # buffers too: batch-norm statistics
        torch.testing.assert_close(fast["state_dict"][name], value, atol=1e-6, rtol=0)
    moments = zip(
        plain["optimizer_states"][0]["state"].values(),
        fast["optimizer_states"][0]["state"].values(),
        strict=True,
    )
    for a, b in moments:
        torch.testing.assert_close(b["exp_avg"], a["exp_avg"], atol=1e-6, rtol=0)
        torch.testing.assert_close(b["exp_avg_sq"], a["exp_avg_sq"], atol=1e-6, rtol=0)
