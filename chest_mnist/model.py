"""ResNet-18 for MedMNIST images and the LightningModule that trains and tests it.

Two stems: `cifar` (3x3 stride-1 first convolution, no max-pool), which keeps a 28px image
at 28px through the first stage, as the MedMNIST v2 ResNet-18 (28) baseline does; and
`imagenet`, torchvision's own, the one ImageNet weights fit (`pretrained=true`).

The loss and the scores are the task's (task.py): BCE with logits per label, optionally
weighted by (1 - p) / p from the train prevalence p (`pos_weight: auto`) so that rare findings
count, or cross-entropy over the classes of a multi-class task. The classifier head runs in
float32 even under bf16 autocast: scores in bf16 would tie often and blur AUROC.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18
from typing_extensions import override

from chest_mnist import UserError, cuda_graphs
from chest_mnist.background_compile import BackgroundCompile, cache_lookups, caches_on, spec_for
from chest_mnist.calibration import scale
from chest_mnist.metrics import scalar_metrics
from chest_mnist.task import MULTI_LABEL, Task

log = logging.getLogger(__name__)

STEMS = ("cifar", "imagenet")
OPTIMIZER_CLASS = "optimizer_class"  # the checkpoint's key for its optimizer's class
RAW_WEIGHTS = "current_model_state"  # Lightning's WeightAveraging: the weights it did not average


def build_resnet18(
    stem: str = "cifar", pretrained: bool = False, num_classes: int = 14
) -> nn.Module:
    """torchvision's ResNet-18 with `num_classes` outputs and the chosen stem."""
    if stem not in STEMS:
        raise UserError(f"model.stem={stem!r} is unknown; choose one of {', '.join(STEMS)}.")
    if pretrained:
        if stem != "imagenet":
            raise UserError(
                "model.pretrained=true loads ImageNet weights, which fit only model.stem=imagenet."
            )
        weights = ResNet18_Weights.IMAGENET1K_V1
        try:
            net = resnet18(weights=weights)
        except Exception as e:  # URLError, OSError, hash mismatch: all mean "no usable file"
            filename = weights.url.rsplit("/", 1)[-1]
            raise UserError(
                f"Could not load torchvision's ImageNet weights for ResNet-18 ({type(e).__name__}: {e}). "
                f"Download {weights.url} and put {filename} in {torch.hub.get_dir()}/checkpoints/ "
                f"(or set TORCH_HOME), or set model.pretrained=false."
            ) from e
        net.fc = nn.Linear(net.fc.in_features, num_classes)
    else:
        net = resnet18(num_classes=num_classes)
    if stem == "cifar":
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    return net


def compile_modes() -> list[str]:
    """torch.compile's modes, as this torch lists them."""
    try:
        from torch._inductor import list_mode_options

        return list(list_mode_options())
    except (ImportError, TypeError):  # a torch that lists them otherwise
        return ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


def check_compile(compile: bool | str) -> None:
    """model.compile: true, false, auto, or one of torch.compile's modes."""
    modes = compile_modes()
    if isinstance(compile, bool) or (isinstance(compile, str) and compile in [*modes, "auto"]):
        return
    raise UserError(
        f"model.compile={compile!r} is unknown: set true, false, auto (compiled only where the "
        f"whole training step is one CUDA graph) or a torch.compile mode ({', '.join(modes)})."
    )


def backbone_and_head(
    stem: str, pretrained: bool, num_classes: int, compile: bool | str = False
) -> tuple[nn.Module, nn.Module]:
    """The model's ResNet-18 (`build_resnet18`) as its backbone, channels-last and, with
    `compile` (true or a torch.compile mode), compiled in place, and its classifier head."""
    net = build_resnet18(stem, pretrained, num_classes=num_classes)
    head = net.fc
    net.fc = nn.Identity()
    backbone = net.to(memory_format=torch.channels_last)
    if compile:
        backbone.compile(mode=None if compile is True else compile)
    return backbone, head


def head_in_float32(head: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """The classifier head in float32 with autocast off, also under bf16 autocast: scores in
    bf16 would tie often and blur AUROC."""
    with torch.autocast(device_type=features.device.type, enabled=False):
        return head(features.float())


class Network(nn.Module):
    """Backbone then head as one module, what `chest_mnist.cuda_graphs` captures. Holds the
    model's own layers, not copies, and is not registered on the model (no second copy of
    their names in the checkpoint). `eager`: run the backbone's eager code even where it is
    compiled (model.compile), without compiling it."""

    def __init__(self, backbone: nn.Module, head: nn.Module, eager: bool = False):
        super().__init__()
        self.backbone, self.head, self.eager = backbone, head, eager

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone.forward(x) if self.eager else self.backbone(x)
        return head_in_float32(self.head, features)


class _StopBackgroundCompile(L.Callback):
    """Stops the model's compiling process (model.compile_in_background) when a fit raises:
    Lightning then calls callbacks' on_exception, but none of the model's hooks."""

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception) -> None:
        pl_module.stop_background_compile()


def concat_outputs(
    batches: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, labels) batches, as predict_step returns them, as two CPU tensors (the values,
    logits or probabilities, in float32)."""
    scores, labels = zip(*batches, strict=True)
    return torch.cat(scores).float().cpu(), torch.cat(labels).cpu()


class MedMNISTClassifier(L.LightningModule):
    """ResNet-18 with one sigmoid output per label (multi-label, as ChestMNIST, or binary), or
    one softmax output per class (multi-class and ordinal regression: cross-entropy).

    Args:
        labels: the output names, in the dataset's order (`MedMNISTDataModule.labels`).
        task: the `medmnist.INFO` task, which decides loss, scores and metrics: its `Task`
            is `self.task`; the checkpoint keeps the name.
        stem, pretrained: see `build_resnet18`.
        pos_weight: None, "auto" ((1 - p) / p of the train prevalence), or one weight per label.
        optimizer, scheduler: partials from Hydra (`_partial_: true`), called with the
            parameters and the optimizer. Not saved in the checkpoint's hyperparameters: the run's
            whole config is in `.hydra/` and TensorBoard.
        label_smoothing: spread this much of each target's weight over the other answers.
        tta_flip: at evaluation, average the logits of each image and its left-right mirror.
        compile: `torch.compile` the backbone in place (checkpoints keep their keys) for the
            training steps; true, or a torch.compile mode ("reduce-overhead" adds CUDA graphs,
            "max-autotune"); auto (the default): compiled (default mode) where the whole step
            is one CUDA graph (on one CUDA GPU), nowhere else. Evaluation runs the same
            weights eagerly: it runs in large batches, so it has few kernel launches to save,
            and each compiled evaluation graph (no gradients, another last-batch size,
            inference tensors in test) would be one more compilation (BENCHMARKS.md counts
            them).
        cuda_graph: replay the training step as CUDA graphs (`chest_mnist.cuda_graphs`):
            auto (the default), on one CUDA GPU without DDP, the whole step, the update
            included, as one graph, or, where that would leave out part of Lightning's step
            (clipping, fp16's loss scaling, an optimizer other than Adam or AdamW, a hook that
            reads the gradients), the forward and backward only; step: the whole step,
            refusing a run where it cannot be; true: the forward and backward, refusing a run
            where they cannot be; false: the plain step. With graphs, an optimizer whose
            `fused` is not set runs fused. The whole step also takes a network compiled without
            graphs of its own (compile=auto or true), whose partial batches then run eagerly:
            inductor compiles it in a separate process while the first steps replay a graph of
            it uncompiled, then the run compiles it from that process's caches and captures the
            step again (`chest_mnist.background_compile`).
        compile_in_background: with compile and the whole-step graph, compile in a separate
            process meanwhile, as above (should it fail: with compile=auto the run goes on
            uncompiled, with true it compiles in this process); false: at the first step, in
            this process, as also a deterministic run does (trainer.deterministic=true: its
            kernels must not change at a step that depends on timing) and one whose inductor
            caches are off.
    """

    def __init__(
        self,
        labels: list[str],
        task: str = MULTI_LABEL,
        stem: str = "cifar",
        pretrained: bool = False,
        pos_weight: str | list[float] | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        label_smoothing: float = 0.0,
        tta_flip: bool = False,
        compile: bool | str = "auto",
        cuda_graph: bool | str = "auto",
        compile_in_background: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        labels = list(labels)
        self.task = Task.from_medmnist(task)
        self.task.check_pos_weight(pos_weight)
        cuda_graphs.check_setting(cuda_graph)
        check_compile(compile)
        if not 0.0 <= label_smoothing < 1.0:
            raise UserError(f"model.label_smoothing={label_smoothing} must be in [0, 1).")
        if pos_weight not in (None, "auto") and len(pos_weight) != len(labels):
            raise UserError(
                f"model.pos_weight has {len(pos_weight)} values but there are {len(labels)} labels; "
                f"give one per label, or auto, or null."
            )
        # the backbone's compilation as it stands: with compile=auto, decided in setup("fit")
        self.compile_mode: bool | str = False if compile == "auto" else compile
        self.backbone, self.head = backbone_and_head(
            stem, pretrained, len(labels), self.compile_mode
        )
        self.register_buffer("pos_weight", None if pos_weight is None else torch.ones(len(labels)))
        self.graphs_wanted = False  # decided in setup("fit"), once the device is known
        self.whole_step_wanted = False  # the whole step as the graph: also in setup("fit")
        self.training_graph: cuda_graphs.TrainingGraph | None = None
        self.step_graph: cuda_graphs.StepGraph | None = None  # the whole step as the graph
        self.graph_steps = False  # whether this batch's step is the step graph's replay
        # model.compile with the step graph: whether the graph runs the network uncompiled
        # until the process compiling it (background_compile) is done
        self.compile_pending = False
        self.background_compile: BackgroundCompile | None = None
        self.began_training = False  # whether a fit got as far as its first step (on_train_start)
        self.val_metrics = scalar_metrics(len(labels), self.task).clone(prefix="val/")
        self.test_metrics = scalar_metrics(len(labels), self.task).clone(prefix="test/")

    @override
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        trainer = self.trainer
        auto = self.hparams.compile == "auto"
        setting = self.hparams.cuda_graph
        why_not_whole = cuda_graphs.why_not_whole_step(
            trainer.gradient_clip_val,
            str(trainer.precision),
            getattr(self.optimizer_factory, "func", self.optimizer_factory),  # Hydra's partial
            self._gradient_hooks(),
        )
        # step insists (configure_optimizers refuses what it would leave out); auto where it
        # leaves nothing out, else the forward and backward
        whole_step = setting == "step" or (setting == "auto" and why_not_whole is None)
        self.graphs_wanted = cuda_graphs.wanted(
            setting,
            trainer.strategy.root_device,
            world_size=trainer.world_size,
            compile_mode=False if auto else self.compile_mode,  # auto: decided below
            accumulate_grad_batches=trainer.accumulate_grad_batches,
            whole_step=whole_step,
        )
        self.whole_step_wanted = self.graphs_wanted and whole_step
        on_gpu = trainer.strategy.root_device.type == "cuda"
        if setting == "auto" and not whole_step and (self.graphs_wanted or on_gpu):
            log.info(
                "model.cuda_graph=auto: not the whole step as one CUDA graph, as %s; %s instead.",
                why_not_whole,
                "the forward and backward as graphs" if self.graphs_wanted else "the plain step",
            )
        if auto:
            self._compile_where_the_step_is_one_graph()
        self.training_graph = None  # captured again at the first step (a resumed fit, too)
        self._close_step_graph()
        self.stop_background_compile()
        self.compile_pending = (
            bool(self.compile_mode)
            and self.hparams.compile_in_background
            and self.whole_step_wanted
            and not torch.are_deterministic_algorithms_enabled()
            and caches_on()
        )
        if trainer.datamodule is not None:  # the model summary's FLOPs and sizes come from it
            size = trainer.datamodule.hparams.size
            self.example_input_array = {"x": torch.zeros(1, 3, size, size)}
        if self.hparams.pos_weight is None:
            return
        if self.hparams.pos_weight == "auto":
            datamodule = self.trainer.datamodule
            prevalence = datamodule.prevalence("train").clamp(
                min=1.0 / len(datamodule.splits["train"])
            )
            self.pos_weight.copy_((1 - prevalence) / prevalence)
        else:
            self.pos_weight.copy_(torch.tensor(self.hparams.pos_weight, dtype=torch.float32))

    def _gradient_hooks(self) -> list[str]:
        """The hooks that read gradients (cuda_graphs.GRADIENT_HOOKS) overridden by this module
        or the trainer's callbacks, as "Class.hook"."""
        owners = [(self, L.LightningModule)]
        owners += [(c, L.Callback) for c in getattr(self._trainer, "callbacks", [])]
        return [
            f"{type(owner).__name__}.{hook}"
            for owner, parent in owners
            for hook in cuda_graphs.GRADIENT_HOOKS
            if is_overridden(hook, owner, parent)
        ]

    def _compile_where_the_step_is_one_graph(self) -> None:
        """model.compile=auto, at each fit: the backbone compiled in place where the whole step
        is one CUDA graph; elsewhere not (undone, should an earlier fit have compiled it)."""
        compiled = self.whole_step_wanted
        self._compile_backbone(compiled)
        log.info(
            "model.compile=auto: %s",
            "compiled, as the whole training step is one CUDA graph"
            if compiled
            else f"not compiled: the whole training step is not one CUDA graph here "
            f"(model.cuda_graph={str(self.hparams.cuda_graph).lower()}, on "
            f"{self.trainer.strategy.root_device.type}, {self.trainer.world_size} process(es))",
        )

    def _compile_backbone(self, compiled: bool) -> None:
        """model.compile=auto: compile the backbone in place, or undo it."""
        if compiled and not self.compile_mode:
            self.backbone.compile()
        elif not compiled and self.compile_mode:
            self.backbone._compiled_call_impl = None  # what nn.Module.compile() set
        self.compile_mode = compiled

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.training_graph is not None and self.training_graph.fits(x):
            return self.training_graph(x)
        if self.compile_mode and (not self.training or self.whole_step_wanted):
            # the eager code (only __call__ is compiled): evaluation, and with the whole-step
            # graph the training batches it does not take (a partial last one), each of which
            # would be one more compilation; the graph records the compiled code
            features = self.backbone.forward(x)
        else:
            features = self.backbone(x)
        return head_in_float32(self.head, features)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The training loss, mean over images (and labels)."""
        return self.task.loss(logits, targets, self.pos_weight, self.hparams.label_smoothing)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities: softmax over classes, or a sigmoid per label."""
        return self.task.scores(logits)

    @override
    def on_fit_end(self) -> None:
        self.training_graph = None  # its memory pool goes; evaluation runs eagerly anyway
        self._close_step_graph()
        if self.background_compile is not None:
            log.info(
                "model.compile: the fit ended before the separate process had compiled the "
                "network; every graphed step ran it uncompiled."
            )
        self.stop_background_compile()

    @override
    def configure_callbacks(self) -> list[L.Callback]:
        return [_StopBackgroundCompile()]

    def stop_background_compile(self) -> None:
        """Stop the process compiling the network, if one is running."""
        if self.background_compile is not None:
            self.background_compile.close()
        self.background_compile = None

    def _use_background_compile(self) -> None:
        """The process is done: the next full batch compiles the network here (from its caches)
        and captures the step graph again. Should the process have failed: with compile=auto
        the run goes on with the graph of the network uncompiled (a lasting failure would stop
        the run in its own compilation), with compile=true it compiles the network here."""
        compiling, self.background_compile = self.background_compile, None
        error = compiling.error()
        compiling.close()
        self.compile_pending = False
        if error and self.hparams.compile == "auto":
            self._compile_backbone(False)
            log.warning(
                "model.compile: the separate process could not compile the network (%s); "
                "model.compile=auto goes on with it uncompiled (model.compile=true compiles "
                "it in the run's own process instead).",
                error,
            )
            return  # the step graph of the uncompiled network stays
        self._close_step_graph()
        if error:
            log.warning(
                "model.compile: the separate process could not compile the network (%s); "
                "compiling it here instead.",
                error,
            )
        else:
            log.info(
                "model.compile: a separate process compiled the network in %.1f s, while the "
                "run trained uncompiled up to step %d; compiling it here from its caches.",
                compiling.seconds,
                self.global_step,
            )

    def _close_step_graph(self) -> None:
        if self.step_graph is not None:
            self.step_graph.close()
        self.step_graph = None

    def _full_batch(self, x: torch.Tensor) -> bool:
        """Whether `x` is a whole batch (a graph captured for a partial one would fix its shape)."""
        datamodule = self.trainer.datamodule
        return len(x) == getattr(getattr(datamodule, "hparams", None), "batch_size", len(x))

    @override
    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self.background_compile is not None and self.background_compile.finished():
            self._use_background_compile()
        self.graph_steps = self.whole_step_wanted and (
            self.step_graph.fits(batch[0]) if self.step_graph else self._full_batch(batch[0])
        )

    def _capture_step_graph(self, x: torch.Tensor, targets: torch.Tensor) -> None:
        started, lookups = time.perf_counter(), cache_lookups()
        optimizer = self.trainer.optimizers[0]
        network = Network(self.backbone, self.head, eager=self.compile_pending)
        if self.compile_pending and self.background_compile is None:
            autocast = torch.is_autocast_enabled(x.device.type)
            stem, mode = self.hparams.stem, self.compile_mode
            self.background_compile = BackgroundCompile(spec_for(network, stem, mode, x, autocast))
        self.step_graph = cuda_graphs.StepGraph(network, self.loss, optimizer, x, targets)
        if self.compile_pending:
            how = "of the network uncompiled (model.compile: a separate process compiles it) "
        else:
            how = "compiled (model.compile) and " if self.compile_mode else ""
        hits, misses = (now - before for now, before in zip(cache_lookups(), lookups, strict=True))
        log.info(
            "CUDA graph: the whole training step (forward, loss, backward and %s's update, %s) "
            "%scaptured for batches of %s in %.2f s%s.",
            type(optimizer).__name__,
            # a resumed optimizer has its checkpoint's setting, not necessarily the config's
            "fused" if optimizer.param_groups[0].get("fused") else "not fused",
            how,
            tuple(x.shape),
            time.perf_counter() - started,
            f"; inductor's caches: {hits} hits, {misses} misses" if hits or misses else "",
        )

    def _capture_training_graph(self, x: torch.Tensor) -> None:
        """At the first full batch (a partial one would fix the graph to its shape)."""
        if not self._full_batch(x):
            return
        started = time.perf_counter()
        network = Network(self.backbone, self.head)
        self.training_graph = cuda_graphs.TrainingGraph(network, x)
        log.info(
            "CUDA graph: the training forward and backward captured for batches of %s in "
            "%.2f s; the optimizer runs %s.",
            tuple(x.shape),
            time.perf_counter() - started,
            "fused" if self.trainer.optimizers[0].defaults.get("fused") else "as configured",
        )

    @override
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, targets = batch
        if self.graph_steps:  # forward, backward and update: optimizer_step calls nothing more
            if self.step_graph is None:
                self._capture_step_graph(x, targets)
            loss = self.step_graph(x, targets)
        else:
            if self.graphs_wanted and not self.whole_step_wanted and self.training_graph is None:
                self._capture_training_graph(x)
            loss = self.loss(self(x), targets)
        # The epoch's mean loss is summed on the device and logged once, at the epoch's end;
        # the step's loss is logged only on the steps the loggers write (on_train_batch_end).
        # Lightning's self.log costs about as much host time as the GPU's work for a step at
        # batch 128 (BENCHMARKS.md, "Where the rest goes"), and the step is bound by the host.
        self._train_loss_sum.add_(loss.detach(), alpha=len(x))
        self._train_images += len(x)
        return loss

    @override
    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        if not self.graph_steps:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # the closure runs training_step (the graph: the update too), zero_grad (the graph
        # writes its gradients in its own memory: .grad is None after it) and the hooks around
        # the backward, which `backward` skips
        optimizer_closure()

    @override
    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        if not self.graph_steps:  # the graph ran it
            super().backward(loss, *args, **kwargs)

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.step_graph is not None and checkpoint.get("optimizer_states"):
            self.step_graph.portable(checkpoint["optimizer_states"][0])
        if checkpoint.get("optimizer_states") and self.trainer.optimizers:
            # another optimizer cannot go on from this one's state (config_checks, on resume)
            optimizer = type(self.trainer.optimizers[0])
            checkpoint[OPTIMIZER_CLASS] = f"{optimizer.__module__}.{optimizer.__qualname__}"

    @override
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # A run with callbacks.ema saves the average as its weights and the training (raw) ones
        # apart (Lightning's WeightAveraging). Resumed without it, training goes on from the raw
        # weights, the ones its optimizer state belongs to, not from the average. Only when
        # fitting: trainer.test or validate(ckpt_path=...) keeps the average it was chosen by.
        if (
            RAW_WEIGHTS in checkpoint
            and self._trainer is not None
            and self.trainer.state.fn == "fit"
            and not any(isinstance(c, WeightAveraging) for c in self.trainer.callbacks)
        ):
            checkpoint["state_dict"] = checkpoint[RAW_WEIGHTS]
            if self.trainer.is_global_zero:
                log.warning(
                    "%s is from a run that averaged its weights (callbacks.ema); resumed without "
                    "it, training goes on from the raw weights, the ones its optimizer state "
                    "belongs to, and validates and saves them from here. The best checkpoint so "
                    "far, and its score, are of the average (Lightning's warning to add the "
                    "callback is about that average).",
                    self.trainer.ckpt_path,
                )

    @override
    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # After the callbacks' hooks: a Timer or an early stop sets should_stop there, and then
        # Lightning writes this step's logs whatever the step.
        every = self.trainer.log_every_n_steps
        if every and (self.global_step % every == 0 or self.trainer.should_stop):
            # not prog_bar=True: Lightning would copy it to the host after every step (a GPU
            # sync); callbacks.ProgressBar shows the step's loss about once a second
            loss = outputs["loss"]
            self.log(
                "train/loss_step", loss, on_step=True, on_epoch=False, batch_size=len(batch[0])
            )

    @override
    def on_train_start(self) -> None:
        self.began_training = True
        self._reset_train_loss()  # also when a run resumes inside an epoch (no epoch start)

    def _reset_train_loss(self) -> None:
        self._train_loss_sum = torch.zeros((), device=self.device)
        self._train_images = 0

    @override
    def on_train_epoch_end(self) -> None:
        # the mean over every process's images (DDP): sums and counts added up, then divided
        images = self._train_loss_sum.new_tensor(self._train_images)
        total = torch.stack([self._train_loss_sum, images])
        loss_sum, images = self.trainer.strategy.reduce(total, reduce_op="sum")
        self._reset_train_loss()
        if images > 0:  # a run resumed at an epoch's very end trains no step in it
            # sync_dist: every process holds the same value; it keeps Lightning from warning
            self.log("train/loss", loss_sum / images, sync_dist=True)

    def _eval_logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.tta_flip:
            return (self(x) + self(x.flip(-1))) / 2
        return self(x)

    def probabilities(
        self, x: torch.Tensor, temperature: torch.Tensor | None = None
    ) -> torch.Tensor:
        """What evaluation and `chest_mnist.predict` report for model inputs `x`: with
        `temperature` (calibration=temperature), of the logits divided by it."""
        return self.scores(scale(self._eval_logits(x), temperature))

    def _eval_step(self, batch, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        x, targets = batch
        logits = self._eval_logits(x)
        self.log(
            f"{stage}/loss",
            self.loss(logits, targets),
            on_epoch=True,
            # a float: Lightning sums the batch sizes in their own dtype and, to sync, averages
            # them over the processes; an integer count is truncated there (101 images on 2
            # processes count as 100), and the loss with it
            batch_size=float(len(x)),
            sync_dist=True,  # the whole split's loss, not this process's share
        )
        return self.scores(logits), self.task.targets(targets)

    @override
    def validation_step(self, batch, batch_idx: int) -> None:
        scores, targets = self._eval_step(batch, "val")
        self.val_metrics.update(scores, targets)

    @override
    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.log("val/auroc", values.pop("val/auroc"), prog_bar=True)
        self.log_dict(values)
        self.val_metrics.reset()

    @override
    def test_step(self, batch, batch_idx: int) -> None:
        """Lightning's `trainer.test`, for whoever calls it: the same numbers as validation's.
        (The report does not use it: `evaluate_model` predicts each split once, with
        `predict_step`, and computes every number from the predictions.)"""
        scores, targets = self._eval_step(batch, "test")
        self.test_metrics.update(scores, targets)

    @override
    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute())
        self.test_metrics.reset()

    @override
    def predict_step(
        self, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, targets) of a batch, the raw material of the report: `scores` makes them
        probabilities, `loss` the test loss. With tta_flip, the logits averaged with the
        mirror's."""
        x, targets = batch
        return self._eval_logits(x), targets

    @override
    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise UserError(
                "model.optimizer is not set: training needs an optimizer config (see chest_mnist/conf/model/)."
            )
        options = {}
        if (
            self.graphs_wanted
            and getattr(self.optimizer_factory, "keywords", {}).get("fused", 0) is None
            # Lightning refuses to clip the gradients of a fused optimizer under mixed precision
            and not getattr(self._trainer, "gradient_clip_val", None)
        ):
            # with the network graphed, the update is most of what is left: one kernel
            options["fused"] = True
        optimizer = self.optimizer_factory(params=self.parameters(), **options)
        if self.whole_step_wanted:  # before the first step: refused runs train nothing
            cuda_graphs.check_whole_step(
                getattr(self._trainer, "gradient_clip_val", None),
                str(getattr(self._trainer, "precision", "")),
                type(optimizer),
                self._gradient_hooks(),
            )
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }
