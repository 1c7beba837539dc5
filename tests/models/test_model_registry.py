"""The registry of networks: names, creation, loud failures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bbdrop.models import create_model, get_model_factory, list_models, register_model
from bbdrop.models import registry as registry_module


def test_the_paper_networks_are_registered() -> None:
    assert list_models() == ["lenet5_caffe", "lenet_500_300", "vgg_like"]


def test_unknown_name_lists_the_available_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'lenet'.*lenet5_caffe, lenet_500_300"):
        create_model("lenet")


def test_registering_a_name_twice_is_an_error() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("lenet_500_300")(lambda: nn.Linear(1, 1))
    assert get_model_factory("lenet_500_300").__name__ == "lenet_500_300"


def test_a_new_factory_is_created_by_name() -> None:
    @register_model("tiny_test_net")
    def tiny_test_net(width: int = 3) -> nn.Module:
        """A one-layer net for this test."""
        return nn.Linear(2, width)

    try:
        assert "tiny_test_net" in list_models()
        assert create_model("tiny_test_net", width=5).out_features == 5
    finally:
        del registry_module._MODELS["tiny_test_net"]


def test_register_rejects_non_callables_and_empty_names() -> None:
    with pytest.raises(TypeError, match="callable"):
        register_model("not_a_factory")(42)  # type: ignore[type-var]
    assert "not_a_factory" not in list_models()
    with pytest.raises(ValueError, match="non-empty"):
        register_model("")


def test_kwargs_reach_the_factory() -> None:
    assert create_model("vgg_like", num_classes=100)(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
    with pytest.raises(TypeError):
        create_model("lenet_500_300", width=3)


@pytest.mark.parametrize("name", ["lenet_500_300", "lenet5_caffe", "vgg_like"])
@pytest.mark.parametrize("num_classes", [1, 0, 2.5, True])
def test_num_classes_is_checked(name: str, num_classes: object) -> None:
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        create_model(name, num_classes=num_classes)
