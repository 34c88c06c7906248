"""The model group's types, declared in chest_mnist/schema.py (the data group's are tested in
test_data.py): Hydra refuses a value of the wrong type when it composes, naming the key; the
keys a user legitimately adds stay open."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from chest_mnist.schema import DataSchema, ModelSchema
from tests.conftest import compose_train


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("model.label_smoothing=abc", "could not be converted to Float"),
        ("model.tta_flip=maybe", "is not a valid bool"),
        ("model.pretrained=maybe", "is not a valid bool"),
        ("model.stem=[cifar]", "Cannot convert 'list' to string"),
    ],
)
def test_a_model_value_of_the_wrong_type_is_refused(override, says):
    with pytest.raises(ConfigCompositionException) as error:
        compose_train([override])
    cause = str(error.value.__cause__)
    assert says in cause and f"full_key: {override.split('=')[0]}" in cause


def test_the_optimizer_and_the_trainer_stay_open():
    """Another optimizer with its own arguments, and any of Lightning's Trainer arguments."""
    cfg = compose_train(
        [
            "model.optimizer._target_=torch.optim.SGD",
            "+model.optimizer.momentum=0.9",
            "+trainer.max_time=00:00:01:00",
        ]
    )
    assert OmegaConf.get_type(cfg.model) is ModelSchema
    assert cfg.model.optimizer.momentum == 0.9 and cfg.trainer.max_time == "00:00:01:00"
    assert cfg.model.label_smoothing == 0.0 and isinstance(cfg.model.label_smoothing, float)


@pytest.mark.parametrize(("group", "schema"), [("model", ModelSchema), ("data", DataSchema)])
def test_the_schema_defaults_are_the_configs(group, schema):
    """A key whose YAML default and schema default disagree would read two ways; the open
    keys (the optimizer, the scheduler, a synthetic file's sizes) are the YAML's alone."""
    config = OmegaConf.to_container(compose_train([])[group], resolve=False)
    assert set(config) == set(schema.__dataclass_fields__)
    for key, value in config.items():
        if not isinstance(value, dict) and value is not None:
            assert value == getattr(schema, key), key
