"""The paper's three networks (docs/method.md section 4): shapes, gate placement, sizes."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import bbdrop
from bbdrop.models import create_model, get_model_factory, list_models

INPUTS = {
    "lenet_500_300": (1, 28, 28),
    "lenet5_caffe": (1, 28, 28),
    "vgg_like": (3, 32, 32),
}
VGG_WIDTHS = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]

# (gated layer name, side, units) where the paper puts its gates.
GATES = {
    "lenet_500_300": [("fc1", "input", 784), ("fc2", "input", 500), ("fc3", "input", 300)],
    "lenet5_caffe": [
        ("conv1", "output", 20),
        ("conv2", "output", 50),
        ("fc1", "input", 800),
        ("fc2", "input", 500),
    ],
    "vgg_like": [(f"features.conv{i + 1}", "output", w) for i, w in enumerate(VGG_WIDTHS)]
    + [("classifier.fc1", "input", 512), ("classifier.fc2", "input", 512)],
}


def test_every_registered_network_is_covered_here() -> None:
    assert sorted(INPUTS) == list_models() == sorted(GATES)


@pytest.mark.parametrize(  # VGG-like: a second or more per case
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n == "vgg_like" else n for n in list_models()],
)
@pytest.mark.parametrize("gate", [None, "bb", "dbb"])
@pytest.mark.parametrize("training", [True, False])
def test_forward_shape(name: str, gate: str | None, training: bool) -> None:
    torch.manual_seed(0)
    net = create_model(name)
    if gate is not None:
        bbdrop.attach_gates_(net, gate)
    net.train(training)
    y = net(torch.randn(3, *INPUTS[name]))
    assert y.shape == (3, 10)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", list_models())
def test_gates_sit_where_the_paper_puts_them(name: str) -> None:
    net = bbdrop.attach_gates_(create_model(name), "bb")
    found = [(n, g.gate.bound_side(), g.gate.num_units) for n, g in bbdrop.gated_layers(net)]
    assert found == GATES[name]


def test_lenet_500_300_flattens_images_and_takes_vectors() -> None:
    torch.manual_seed(0)
    net = create_model("lenet_500_300").eval()
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(net(x), net(x.view(4, 784)), rtol=0, atol=0)


def _vgg_parameters(num_classes: int) -> int:
    total, c_in = 0, 3
    for w in VGG_WIDTHS:
        total += 9 * c_in * w + w + 2 * w  # 3x3 kernels, bias, batch-norm scale and shift
        c_in = w
    return total + (512 * 512 + 512 + 2 * 512) + (512 * num_classes + num_classes)


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        ("lenet_500_300", {}, 784 * 500 + 500 + 500 * 300 + 300 + 300 * 10 + 10),
        ("lenet5_caffe", {}, 25 * 20 + 20 + 25 * 20 * 50 + 50 + 800 * 500 + 500 + 500 * 10 + 10),
        ("vgg_like", {"num_classes": 10}, _vgg_parameters(10)),
        ("vgg_like", {"num_classes": 100}, _vgg_parameters(100)),
    ],
)
def test_parameter_count(name: str, kwargs: dict[str, int], expected: int) -> None:
    net = create_model(name, **kwargs)
    assert sum(p.numel() for p in net.parameters()) == expected


def test_lenet5_caffe_layer_sequence() -> None:
    net = create_model("lenet5_caffe")
    kinds = [type(m).__name__ for m in net.children()]
    assert kinds == [
        "Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "MaxPool2d",
        "Flatten", "Linear", "ReLU", "Linear",
    ]  # fmt: skip
    assert net.conv1.kernel_size == net.conv2.kernel_size == (5, 5)
    assert net.conv1.padding == (0, 0)


def test_vgg_convolutions_are_3x3_same_with_batch_norm_and_relu() -> None:
    net = create_model("vgg_like")
    convs = [m for m in net.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == VGG_WIDTHS
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    children = list(net.features.children())
    for i, m in enumerate(children):
        if isinstance(m, nn.Conv2d):
            assert isinstance(children[i + 1], nn.BatchNorm2d)
            assert isinstance(children[i + 2], nn.ReLU)
    assert sum(isinstance(m, nn.MaxPool2d) for m in children) == 5
    kinds = [type(m).__name__ for m in net.classifier]
    assert kinds == ["Flatten", "Identity", "Linear", "BatchNorm1d", "ReLU", "Identity", "Linear"]


def test_vgg_dropout_follows_the_zagoruyko_recipe() -> None:
    """0.3 after conv1, 0.4 after each conv not followed by pooling, 0.5 before each dense."""
    net = create_model("vgg_like", dropout=True)
    drops = [(n, m.p) for n, m in net.named_modules() if isinstance(m, nn.Dropout)]
    assert drops == [
        ("features.drop1", 0.3),
        ("features.drop3", 0.4),
        ("features.drop5", 0.4),
        ("features.drop6", 0.4),
        ("features.drop8", 0.4),
        ("features.drop9", 0.4),
        ("features.drop11", 0.4),
        ("features.drop12", 0.4),
        ("classifier.drop1", 0.5),
        ("classifier.drop2", 0.5),
    ]
    names = [n for n, _ in net.features.named_children()]
    for name, _ in drops[:-2]:
        assert names[names.index(name.removeprefix("features.")) - 1].startswith("relu")
    assert not any(isinstance(m, nn.Dropout) for m in create_model("vgg_like").modules())


@pytest.mark.slow
def test_vgg_dropout_is_active_in_training_only() -> None:
    torch.manual_seed(0)
    net = create_model("vgg_like", dropout=True)
    x = torch.randn(4, 3, 32, 32)
    net.eval()
    torch.testing.assert_close(net(x), net(x), rtol=0, atol=0)
    net.train()
    assert not torch.equal(net(x), net(x))


@pytest.mark.slow
def test_vgg_baseline_weights_load_into_the_model_without_dropout() -> None:
    torch.manual_seed(0)
    baseline = create_model("vgg_like", dropout=True).eval()
    plain = create_model("vgg_like")
    plain.load_state_dict(baseline.state_dict())  # strict: same keys
    plain.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(plain(x), baseline(x), rtol=0, atol=0)


def test_vgg_dropout_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="dropout must be a bool"):
        create_model("vgg_like", dropout=0.5)


@pytest.mark.parametrize("name", list_models())
def test_factories_are_typed_and_documented(name: str) -> None:
    factory = get_model_factory(name)
    signature = inspect.signature(factory)
    assert signature.return_annotation is not inspect.Signature.empty
    assert all(p.annotation is not inspect.Parameter.empty for p in signature.parameters.values())
    assert "docs/method.md" in (factory.__doc__ or "")
