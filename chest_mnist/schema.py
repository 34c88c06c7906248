"""The types of the config's own keys, declared once as dataclasses and stored in Hydra's
ConfigStore: a config group's YAML names its schema in its defaults list, and Hydra refuses a
value of the wrong type when it composes the config (`data.augment=maybe`,
`data.batch_size=abc`, `model.label_smoothing=abc`), naming the key, before any code runs.
The Trainer's keys stay open (`+trainer.max_time=...` adds any of Lightning's arguments). Ranges and rules that span several keys are checked in
`chest_mnist.config_checks`, and by the classes the configs build.

`register_schemas()` stores them; every entry point calls it (through
`chest_mnist.config.register`) before Hydra composes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class DataSchema:
    """`data=chestmnist` and `data=synthetic`: the arguments of `MedMNISTDataModule`."""

    _target_: str = "chest_mnist.data.MedMNISTDataModule"
    flag: str = "chestmnist"
    size: int = 28
    root: str | None = None
    path: str | None = None
    synthetic: dict[str, Any] | None = None
    download: bool = True
    verify_md5: bool = True
    batch_size: int = 128
    eval_batch_size: int = 1024
    subset: int | None = None
    augment: bool = False
    max_shift: int = 2
    drop_last: bool = False
    mean: float = 0.5
    std: float = 0.5
    num_workers: int = 0
    on_device: Any = "auto"  # true, false or auto: checked by MedMNISTDataModule
    mmap: bool = False


@dataclass
class ModelSchema:
    """`model=resnet18`: the arguments of `MedMNISTClassifier`. The optimizer and the scheduler
    stay open (any torch optimizer's arguments, `+model.optimizer.momentum=0.9`): their values
    are checked where they are used."""

    _target_: str = "chest_mnist.model.MedMNISTClassifier"
    stem: str = "cifar"
    pretrained: bool = False
    pos_weight: Any = None  # null, auto, or one weight per label
    label_smoothing: float = 0.0
    tta_flip: bool = False
    compile: Any = "auto"  # true, false, auto or a torch.compile mode
    cuda_graph: Any = "auto"  # auto, true, false or step
    compile_in_background: bool = True
    optimizer: Any = None
    scheduler: Any = None


def register_schemas() -> None:
    """Store the schemas (again: a no-op) under `schema/<group>`."""
    store = ConfigStore.instance()
    store.store(group="schema", name="data", node=DataSchema)
    store.store(group="schema", name="model", node=ModelSchema)
