import pytest
import torch

import polyattn
from polyattn.errors import UserError
from polyattn.registry import SIZES, TASKS, count_parameters, get_entry, register_model


def test_every_name_is_family_size_and_has_a_task():
    names = polyattn.list_models()
    assert names, "no models registered"
    for name in names:
        assert name.rsplit("_", 1)[-1] in SIZES
        assert get_entry(name).task in TASKS
    assert set(polyattn.list_models("classification")) <= set(names)


def test_unknown_model_suggests_nearest():
    with pytest.raises(UserError, match="Did you mean 'vit_tiny'"):
        polyattn.create_model("vit_tinny")
    with pytest.raises(UserError, match="no argument 'dept'"):
        polyattn.create_model("vit_tiny", dept=3)
    with pytest.raises(UserError, match="Unknown task"):
        polyattn.list_models("segmentation")


def test_register_rejects_names_without_a_size():
    with pytest.raises(ValueError, match="must end in a size"):
        @register_model(torch.nn.Identity, task="classification")
        def identity_patch16():
            return {}


@pytest.mark.parametrize("name, expected", [
    # DeiT's published parameter counts at 224 px, 1000 classes (5.7M / 22M / 86M).
    ("vit_tiny", 5_717_416),
    ("vit_small", 22_050_664),
    ("vit_base", 86_567_656),
])
def test_vit_parameter_counts_match_deit(name, expected):
    assert count_parameters(name) == expected
