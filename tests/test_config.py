import re

import pytest

from polyattn.errors import UserError
from polyattn.train.config import RunConfig, build_config, coerce, find_recipe, list_recipes


def test_overrides_are_typed():
    config = build_config("default", ["train.lr=3e-4", "train.epochs=2", "data.crop_scale=[0.2, 1]",
                                      "train.grad_clip=null", "model.depth=2", "train.precision=fp32"])
    assert config.train.lr == 3e-4 and isinstance(config.train.lr, float)
    assert config.train.epochs == 2
    assert config.data.crop_scale == (0.2, 1.0)
    assert config.train.grad_clip is None
    assert config.train.precision == "fp32"
    assert config.resolved_model_args()["depth"] == 2


@pytest.mark.parametrize("override, message", [
    ("train.epochs=abc", "train.epochs expects an integer"),
    ("train.epochs=2.5", "train.epochs expects an integer"),
    ("train.precision=fp8", "one of 'auto', 'bf16', 'fp16', 'fp32'"),
    ("train.lrr=1", "Did you mean 'train.lr'?"),
    ("trian.lr=1", "Did you mean 'train.lr'?"),
    ("train.compile=maybe", "true or false"),
    ("model=vit_tny", "Did you mean 'vit_tiny'?"),
    ("lr", "not of the form key=value"),
])
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(UserError, match=re.escape(message)):
        build_config("default", [override])


def test_unknown_model_argument_names_the_nearest():
    config = build_config("default", ["model.depht=3"])
    with pytest.raises(UserError, match=re.escape("no argument 'depht'. Did you mean 'depth'?")):
        config.resolved_model_args()


def test_model_argument_types_come_from_the_constructor():
    config = build_config("default", ["model.embed_dim=64", "model.patch_size=4"])
    args = config.resolved_model_args()
    assert args["embed_dim"] == 64 and args["patch_size"] == 4
    config = build_config("default", ["model.embed_dim=wide"])
    with pytest.raises(UserError, match=re.escape("model.embed_dim expects an integer")):
        config.resolved_model_args()


def test_unknown_recipe():
    with pytest.raises(UserError, match=re.escape("Unknown recipe 'defualt'. Did you mean 'default'")):
        find_recipe("defualt")
    assert "default" in list_recipes() and "vit_tiny_cifar10" in list_recipes()


def test_round_trip_through_a_dict():
    config = build_config("default", ["train.lr=5e-4", "model.depth=3"])
    again = RunConfig.from_dict(config.to_dict(), origin="test")
    assert again.to_dict() == config.to_dict()


def test_unknown_section_in_a_recipe():
    with pytest.raises(UserError, match="Unknown section 'trian'"):
        RunConfig.from_dict({"trian": {"lr": 1}}, origin="recipe.yaml")


def test_coerce_optional_and_tuples():
    assert coerce(None, int | None, "k") is None
    assert coerce(4, tuple[int, int], "k") == (4, 4)
    assert coerce([3, 5], int | tuple[int, int], "k") == (3, 5)
    with pytest.raises(UserError):
        coerce([1, 2, 3], tuple[int, int], "k")


def test_every_numeric_setting_has_a_rule():
    """A new int or float field cannot be added without saying which values it takes (see Rule)."""
    import dataclasses
    import typing

    from polyattn.train.config import section_classes

    for cls in (cls for classes in section_classes().values() for cls in classes):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kinds = set(typing.get_args(hints[f.name])) | {hints[f.name]}
            if kinds & {int, float} or any(typing.get_args(k) and {int, float} & set(typing.get_args(k))
                                           for k in kinds):
                assert "rule" in f.metadata, f"{cls.__name__}.{f.name} has no Rule"


@pytest.mark.parametrize("value, message", [
    (float("nan"), "must be a finite number"), (float("inf"), "must be a finite number"),
    (0.0, "must be greater than 0 and less than 1"), (1.0, "must be greater than 0 and less than 1"),
])
def test_rules_refuse_non_finite_and_out_of_range_values(value, message):
    config = build_config("default", [])
    config.train.ema_decay = value
    with pytest.raises(UserError, match=message):
        config.validate()
