"""Obligations that every registered gate meets, whatever its method."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bbdrop
from bbdrop.gates import Gate, create_gate, get_gate_class, list_gates, register_gate

GATES = list_gates()
SHAPES = [(8, 6), (8, 6, 5, 4)]  # dense (N, K), convolutional (N, K, H, W)


def test_the_paper_gates_are_registered() -> None:
    assert {"bb", "dbb"} <= set(GATES)


@pytest.mark.parametrize("name", GATES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_output_has_input_shape(name: str, shape: tuple[int, ...], training: bool) -> None:
    gate = create_gate(name, 6).train(training)
    x = torch.randn(shape)
    y = gate(x)
    assert y.shape == x.shape
    assert y.dtype == x.dtype
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", GATES)
@pytest.mark.parametrize("shape", SHAPES)
def test_eval_is_deterministic_and_train_is_stochastic(name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    gate = create_gate(name, 6)
    x = torch.randn(shape)
    gate.eval()
    torch.testing.assert_close(gate(x), gate(x), rtol=0, atol=0)
    gate.train()
    assert not torch.equal(gate(x), gate(x))


@pytest.mark.parametrize("name", GATES)
@pytest.mark.parametrize("shape", SHAPES)
def test_training_forward_is_input_times_mask(name: str, shape: tuple[int, ...]) -> None:
    """The training forward pass draws exactly what ``mask`` describes."""
    gate = create_gate(name, 6).train()
    x = torch.randn(shape)
    torch.manual_seed(5)
    y = gate(x)
    torch.manual_seed(5)
    m = gate.mask(x)
    m = m[..., None, None] if x.dim() == 4 else m
    torch.testing.assert_close(y, x * m, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", GATES)
def test_conv_mask_is_shared_over_space(name: str) -> None:
    """One gate per channel: within a channel every position is scaled alike."""
    torch.manual_seed(0)
    gate = create_gate(name, 6).train()
    x = torch.ones(4, 6, 5, 5)
    y = gate(x)
    torch.testing.assert_close(y, y[:, :, :1, :1].expand_as(y), rtol=0, atol=0)


@pytest.mark.parametrize("name", GATES)
def test_kl_is_a_finite_differentiable_scalar(name: str) -> None:
    gate = create_gate(name, 6)
    kl = gate.regularizer(nn.Identity())
    assert kl.shape == ()
    assert torch.isfinite(kl)
    kl.backward()
    grads = [p.grad for p in gate.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", GATES)
def test_keep_mask_agrees_with_gate_values(name: str) -> None:
    gate = create_gate(name, 6)
    values = gate.gate_values()
    keep = gate.keep_mask()
    assert values.shape == (6,) and keep.shape == (6,) and keep.dtype == torch.bool
    assert torch.equal(keep, values != 0)
    assert gate.num_kept() == int(keep.sum())
    assert isinstance(gate.num_kept(), int)


@pytest.mark.parametrize("name", GATES)
@pytest.mark.parametrize(
    "bad",
    [
        torch.randn(6),
        torch.randn(2, 6, 3),
        torch.randn(2, 6, 3, 3, 3),
        torch.randn(2, 5),
        torch.randn(2, 7, 3, 3),
    ],
    ids=["rank1", "rank3", "rank5", "dense-K", "conv-K"],
)
def test_bad_input_raises_value_error(name: str, bad: torch.Tensor) -> None:
    gate = create_gate(name, 6)
    with pytest.raises(ValueError, match=r"6|rank"):
        gate(bad)


@pytest.mark.parametrize("name", GATES)
@pytest.mark.parametrize(
    ("arg", "value"),
    [
        ("alpha", 0.0),
        ("alpha", -1e-4),
        ("alpha", float("nan")),
        ("temperature", 0.0),
        ("temperature", -0.1),
        ("threshold", 0.0),
        ("threshold", 1.0),
        ("threshold", 1.5),
        ("kl_scale", -1.0),
    ],
)
def test_bad_settings_raise_value_error_naming_the_argument(
    name: str, arg: str, value: float
) -> None:
    with pytest.raises(ValueError, match=arg):
        create_gate(name, 6, **{arg: value})


@pytest.mark.parametrize("name", GATES)
@pytest.mark.parametrize("num_units", [0, -3, 2.5, True])
def test_bad_num_units(name: str, num_units: object) -> None:
    with pytest.raises(ValueError, match="num_units"):
        create_gate(name, num_units)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", GATES)
@pytest.mark.parametrize("raw", [-1e4, 1e4])
@pytest.mark.parametrize("scale", [0.0, 1e6])
@pytest.mark.parametrize("shape", [(1, 6), (1, 6, 3, 3), (16, 6), (16, 6, 3, 3)])
def test_finite_at_parameter_clamps_extreme_inputs_and_batch_of_one(
    name: str, raw: float, scale: float, shape: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    gate = create_gate(name, 6).train()
    with torch.no_grad():
        for p in gate.parameters():
            p.fill_(raw)
    x = (torch.randn(shape) * scale).requires_grad_()
    y = gate(x)
    loss = y.square().mean() + gate.regularizer(nn.Identity())
    loss.backward()
    assert torch.isfinite(y).all()
    assert torch.isfinite(gate.regularizer(nn.Identity()))
    assert torch.isfinite(x.grad).all()
    for pname, p in gate.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), pname
    gate.eval()
    assert torch.isfinite(gate(x)).all()


@pytest.mark.parametrize("name", GATES)
def test_state_dict_round_trip(name: str) -> None:
    torch.manual_seed(0)
    src = create_gate(name, 6)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p))
    src.train()(torch.randn(10, 6))  # moves any running statistics
    dst = create_gate(name, 6)
    dst.load_state_dict(src.state_dict())
    x = torch.randn(5, 6)
    torch.testing.assert_close(dst.eval()(x), src.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", GATES)
def test_mc_sampling_draws_hard_masks_in_eval(name: str) -> None:
    torch.manual_seed(0)
    gate = create_gate(name, 6).eval()
    gate.mc_sampling = True
    x = torch.ones(50, 6)
    y = gate(x)
    assert set(y.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("name", GATES)
def test_float64(name: str) -> None:
    gate = create_gate(name, 6).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    assert gate(x).dtype == torch.float64
    assert gate.regularizer(nn.Identity()).dtype == torch.float64


# -- the registry --------------------------------------------------------------------
def test_unknown_gate_lists_the_available_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown gate 'nope'.*bb.*dbb"):
        create_gate("nope", 3)


def test_registering_a_name_twice_fails() -> None:
    with pytest.raises(ValueError, match="already registered"):

        @register_gate("bb")
        class Another(bbdrop.BetaBernoulliGate):
            pass


def test_registering_a_non_gate_fails() -> None:
    with pytest.raises(TypeError, match="Gate subclass"):
        register_gate("not-a-gate-xyz")(torch.nn.Linear)  # type: ignore[arg-type]
    assert "not-a-gate-xyz" not in list_gates()


def test_registry_returns_classes() -> None:
    assert get_gate_class("bb") is bbdrop.BetaBernoulliGate
    assert get_gate_class("dbb") is bbdrop.DependentBetaBernoulliGate
    assert all(issubclass(get_gate_class(n), Gate) for n in GATES)
