"""Obligations that every registered gate meets, whatever its method."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import bbdrop
from bbdrop.gates import Gate, TestTimeMask, create_gate, get_gate_class, list_gates, register_gate

GATES = list_gates()
SHAPES = [(8, 6), (8, 6, 5, 4)]  # dense (N, K), convolutional (N, K, H, W)
# Multiplicative unit gates, which also work on their own (gate(x) = x * mask); a method
# that needs its layer (SVD owns its layer's computation, SSL's values are its layer's
# weight-group norms) is tested through a layer only (the section "through a layer"
# covers every gate). Derived from the classes, so that no method skips a test unseen.
ALONE = [n for n in GATES if not get_gate_class(n).needs_bound_layer]
# The beta-Bernoulli family: its settings (alpha, temperature, threshold) and its
# Bernoulli masks under Monte Carlo sampling.
BB_FAMILY = [n for n in GATES if issubclass(get_gate_class(n), bbdrop.BetaBernoulliGate)]
DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_the_paper_gates_are_registered() -> None:
    assert {"bb", "dbb", "svd", "ssl", "sbp", "l0", "vib"} <= set(GATES)


@pytest.mark.parametrize("name", ALONE)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_output_has_input_shape(name: str, shape: tuple[int, ...], training: bool) -> None:
    gate = create_gate(name, 6).train(training)
    x = torch.randn(shape)
    y = gate(x)
    assert y.shape == x.shape
    assert y.dtype == x.dtype
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", ALONE)
@pytest.mark.parametrize("shape", SHAPES)
def test_eval_is_deterministic_and_train_is_stochastic(name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    gate = create_gate(name, 6)
    x = torch.randn(shape)
    gate.eval()
    torch.testing.assert_close(gate(x), gate(x), rtol=0, atol=0)
    gate.train()
    assert not torch.equal(gate(x), gate(x))


@pytest.mark.parametrize("name", ALONE)
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


@pytest.mark.parametrize("name", ALONE)
def test_conv_mask_is_shared_over_space(name: str) -> None:
    """One gate per channel: within a channel every position is scaled alike."""
    torch.manual_seed(0)
    gate = create_gate(name, 6).train()
    x = torch.ones(4, 6, 5, 5)
    y = gate(x)
    torch.testing.assert_close(y, y[:, :, :1, :1].expand_as(y), rtol=0, atol=0)


@pytest.mark.parametrize("name", ALONE)
def test_kl_is_a_finite_differentiable_scalar(name: str) -> None:
    gate = create_gate(name, 6)
    kl = gate.regularizer(nn.Identity())
    assert kl.shape == ()
    assert torch.isfinite(kl)
    kl.backward()
    grads = [p.grad for p in gate.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", ALONE)
def test_keep_mask_agrees_with_gate_values(name: str) -> None:
    gate = create_gate(name, 6)
    values = gate.gate_values()
    keep = gate.keep_mask()
    assert values.shape == (6,) and keep.shape == (6,) and keep.dtype == torch.bool
    assert torch.equal(keep, values != 0)
    assert gate.num_kept() == int(keep.sum())
    assert isinstance(gate.num_kept(), int)


@pytest.mark.parametrize("name", ALONE)
@pytest.mark.parametrize(
    "bad",
    [
        torch.tensor(1.0),
        torch.randn(6),
        torch.randn(2, 5),
        torch.randn(2, 5, 6),  # the units are dimension 1 of what a gate itself sees
        torch.randn(2, 7, 3, 3),
        torch.randn(2, 7, 3, 3, 3),
    ],
    ids=["rank0", "rank1", "dense-K", "tokens-K", "conv-K", "conv3d-K"],
)
def test_bad_input_raises_value_error(name: str, bad: torch.Tensor) -> None:
    gate = create_gate(name, 6)
    with pytest.raises(ValueError, match=r"6|rank"):
        gate(bad)


@pytest.mark.parametrize("name", BB_FAMILY)
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
    ],
)
def test_bad_settings_raise_value_error_naming_the_argument(
    name: str, arg: str, value: float
) -> None:
    with pytest.raises(ValueError, match=arg):
        create_gate(name, 6, **{arg: value})


@pytest.mark.parametrize("name", ALONE)
@pytest.mark.parametrize("num_units", [0, -3, 2.5, True])
def test_bad_num_units(name: str, num_units: object) -> None:
    with pytest.raises(ValueError, match="num_units"):
        create_gate(name, num_units)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ALONE)
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


@pytest.mark.parametrize("name", ALONE)
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


@pytest.mark.parametrize("name", BB_FAMILY)  # Bernoulli masks; the others' are not 0/1
def test_mc_sampling_draws_hard_masks_in_eval(name: str) -> None:
    torch.manual_seed(0)
    gate = create_gate(name, 6).eval()
    gate.mc_sampling = True
    x = torch.ones(50, 6)
    y = gate(x)
    assert set(y.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("name", ALONE)
def test_float64(name: str) -> None:
    gate = create_gate(name, 6).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    assert gate(x).dtype == torch.float64
    assert gate.regularizer(nn.Identity()).dtype == torch.float64


# -- through a layer: every method ---------------------------------------------------
def gated(name: str, kind: str) -> nn.Module:
    """A layer whose gate has 6 units: a dense layer's 6 inputs or a convolution's 6
    output channels."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 3) if kind == "dense" else nn.Conv2d(3, 6, 3, padding=1)
    return bbdrop.attach_gates_(layer, name)


def example(kind: str, n: int = 8, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(n, 6) * scale if kind == "dense" else torch.randn(n, 3, 5, 4) * scale


KINDS = ["dense", "conv"]


@pytest.mark.parametrize("name", GATES)
@pytest.mark.parametrize("kind", KINDS)
def test_a_gated_layer_keeps_its_output_shape_and_is_deterministic_in_eval(
    name: str, kind: str
) -> None:
    g = gated(name, kind)
    x = example(kind)
    plain = g.forward(x)
    for training in (True, False):
        y = g.train(training)(x)
        assert y.shape == plain.shape and y.dtype == plain.dtype
        assert torch.isfinite(y).all()
    g.eval()
    torch.testing.assert_close(g(x), g(x), rtol=0, atol=0)
    g.train()
    if not get_gate_class(name).deterministic_training:
        assert not torch.equal(g(x), g(x))


@pytest.mark.parametrize("name", GATES)
@pytest.mark.parametrize("kind", KINDS)
def test_the_regularizer_is_a_finite_differentiable_scalar_of_the_layer(
    name: str, kind: str
) -> None:
    g = gated(name, kind)
    reg = g.gate.regularizer(g)
    assert reg.shape == () and torch.isfinite(reg)
    reg.backward()
    grads = [p.grad for p in g.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(t).all() for t in grads)
    assert torch.isfinite(bbdrop.total_kl(g))


@pytest.mark.parametrize("name", GATES)
@pytest.mark.parametrize("kind", KINDS)
def test_units_kept_count_the_non_zero_test_time_values(name: str, kind: str) -> None:
    g = gated(name, kind)
    values = g.gate.gate_values()
    keep = g.gate.keep_mask()
    assert values.shape == (6,) and keep.dtype == torch.bool and torch.equal(keep, values != 0)
    assert bbdrop.units_kept(g) == {"": int(keep.sum())}
    assert isinstance(g.gate.num_kept(), int)


@pytest.mark.parametrize("name", GATES)
@pytest.mark.parametrize("kind", KINDS)
def test_pruned_units_do_not_reach_the_next_layer_in_eval(name: str, kind: str) -> None:
    """prune_ removes units for good: in eval their features (dense: inputs of the
    layer, whose effect on the output vanishes) or channels (conv: outputs, exactly 0)."""
    g = gated(name, kind).eval()
    keep = torch.tensor([True, False, True, True, False, True])
    g.gate.prune_(keep)
    assert g.gate.num_kept() <= 4 and not g.gate.keep_mask()[[1, 4]].any()
    x = example(kind)
    if kind == "dense":
        x2 = x.clone()
        x2[:, [1, 4]] += 100.0  # what the pruned inputs carry no longer matters
        torch.testing.assert_close(g(x), g(x2), rtol=1e-5, atol=1e-5)
    else:
        assert torch.count_nonzero(g(x)[:, [1, 4]]) == 0


@pytest.mark.parametrize("name", GATES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scale", [0.0, 1e4])
@pytest.mark.parametrize("n", [1, 16])
def test_training_steps_stay_finite_for_zero_huge_and_single_example_batches(
    name: str, kind: str, scale: float, n: int
) -> None:
    g = gated(name, kind).train()
    opt = torch.optim.Adam(g.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        y = g(example(kind, n, scale))
        loss = y.square().mean() * 1e-8 + bbdrop.total_kl(g) / 100
        loss.backward()
        opt.step()
        assert torch.isfinite(y).all() and torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in g.parameters())
    assert torch.isfinite(g.eval()(example(kind))).all()


@pytest.mark.parametrize("name", GATES)
@pytest.mark.parametrize("kind", KINDS)
def test_a_gated_layer_round_trips_through_its_state_dict(name: str, kind: str) -> None:
    src = gated(name, kind)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    src.train()(example(kind))  # moves any running statistics
    dst = gated(name, kind)
    dst.load_state_dict(src.state_dict())
    x = example(kind)
    torch.testing.assert_close(dst.eval()(x), src.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", GATES)
def test_a_negative_kl_scale_is_refused_naming_it(name: str) -> None:
    with pytest.raises(ValueError, match="kl_scale"):
        bbdrop.attach_gates_(nn.Linear(6, 3), name, kl_scale=-1.0)


@pytest.mark.parametrize("name", GATES)
def test_the_method_trains_through_the_trainer(name: str) -> None:
    """A short train_stage on a linear problem: the loss goes down, the figures are sane."""
    from bbdrop.config import OptimConfig
    from bbdrop.train.loop import train_stage

    torch.manual_seed(0)
    x = torch.randn(256, 6)
    y = (x[:, 0] > 0).long()
    net = bbdrop.attach_gates_(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2)), name)
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 256, 64)]
    history = train_stage(net, batches, stage=name, epochs=6, num_train=256,
                          optim=OptimConfig(), evaluate_on=(x, y))  # fmt: skip
    assert all(r.loss == r.loss for r in history)  # no NaN
    assert history[-1].cross_entropy < history[0].cross_entropy
    assert set(history[-1].units) == {"0", "2"}


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


def _args_named(doc: str) -> set[str]:
    """The names of the entries (``    name:`` or ``    a, b:``) after a docstring's ``Args``."""
    args = re.search(r"^Args\b", doc, re.M)
    entries = re.findall(r"^ {4}(\w+(?:, \w+)*):", doc[args.start() :], re.M) if args else []
    return {name for entry in entries for name in entry.split(", ")}


@pytest.mark.parametrize("name", GATES)
def test_each_method_cites_its_defaults(name: str) -> None:
    """Each method's class documents what it implements and where its defaults come from:
    every setting of its constructor has an ``Args`` entry (its own, or that of a base class
    it points to), and it cites a source that exists: the paper or its authors, a page
    of docs/, or a reference code base (``BBcode``, ``SVDcode``, ...) that docs/ describes."""
    cls = get_gate_class(name)
    doc = inspect.getdoc(cls) or ""
    named = _args_named(doc)
    for base in cls.__mro__[1:]:
        if f":class:`{base.__name__}`" in doc:  # "Args beyond :class:`Base`'s"
            named |= _args_named(inspect.getdoc(base) or "")
    params = inspect.signature(cls.__init__).parameters.values()
    settings = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    settings.discard("self")
    assert settings <= named, f"settings without an Args entry: {sorted(settings - named)}"
    pages = re.findall(r"docs/[\w/.-]*\w\.md", doc)
    codes = set(re.findall(r"\b[A-Z][A-Z0-9]*code\b", doc))
    assert pages or codes or re.search(r"\b(paper|authors)\b", doc), "cites no source"
    assert all((DOCS.parent / page).is_file() for page in pages), pages
    described = " ".join(f.read_text(encoding="utf-8") for f in DOCS.rglob("*.md"))
    assert {c for c in codes if c not in described} == set(), "code bases docs/ does not name"


@pytest.mark.parametrize("name", [n for n in GATES if not get_gate_class(n).input_dependent])
@pytest.mark.parametrize("kind", KINDS)
def test_a_plain_layer_with_the_folded_weights_computes_the_gated_layer_in_eval(
    name: str, kind: str
) -> None:
    """fold() is what bbdrop.compact builds on: the weight and bias it returns, in a plain
    copy of the layer, give the gated layer's eval output (SVD: with its pruned
    weights), with gate values away from 1 and two units pruned for good."""
    g = gated(name, kind)
    with torch.no_grad():
        for p in g.gate.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
            if p.shape == g.weight.shape:  # a per-weight state (SVD's log sigma^2):
                p.view(-1)[::4] = 5.0  # prune every 4th weight (log alpha >= 3), no whole unit
    g.gate.prune_(torch.tensor([True, False, True, True, False, True]))
    g.eval()
    weight, bias = g.gate.fold(g, g.gate.bound_side())
    plain = nn.Linear(6, 3) if kind == "dense" else nn.Conv2d(3, 6, 3, padding=1)
    plain.load_state_dict({"weight": weight, "bias": bias})
    x = example(kind)
    torch.testing.assert_close(plain(x), g(x), rtol=0, atol=1e-6)
    assert not torch.equal(weight, g.weight.detach())  # something was folded


def test_an_input_dependent_gate_says_so() -> None:
    assert get_gate_class("dbb").input_dependent
    assert not any(get_gate_class(n).input_dependent for n in ("bb", "svd", "ssl", "sbp"))


@pytest.mark.parametrize("name", GATES)
@pytest.mark.parametrize("shape", SHAPES)
def test_to_module_is_the_eval_mask_on_the_kept_units_for_input_dependent_gates(
    name: str, shape: tuple[int, ...]
) -> None:
    """What bbdrop.compact puts beside a layer: an input-dependent gate's to_module on
    its kept units computes, bit for bit, the gate's evaluation on those units; a static
    gate has none. A trained gate (statistics moved) can be compacted."""
    g = gated(name, "dense" if len(shape) == 2 else "conv")
    gate = g.gate
    with torch.no_grad():
        for p in gate.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    g.train()(example("dense" if len(shape) == 2 else "conv"))  # moves any statistics
    assert gate.untrained_reason() is None
    units = gate.keep_mask().nonzero().flatten().tolist()
    module = gate.to_module(units)
    if not gate.input_dependent:
        assert module is None
        return
    assert isinstance(module, TestTimeMask) and units
    x = torch.randn(shape)
    with torch.no_grad():
        want = gate.eval()(x)[:, units]
        got = module.eval()(x[:, units])
    assert torch.equal(got, want)


def test_a_gate_that_steps_after_the_optimiser_must_say_so() -> None:
    """The trainer calls after_step on the gates that declare steps_after_optimiser; a
    class that overrides it without declaring it is refused when it is defined."""
    with pytest.raises(TypeError, match="steps_after_optimiser"):

        class Silent(bbdrop.BetaBernoulliGate):
            def after_step(self, lr: float, num_train: int) -> None:
                pass

    class Declared(bbdrop.BetaBernoulliGate):
        steps_after_optimiser = True

        def after_step(self, lr: float, num_train: int) -> None:
            pass

    for name in GATES:
        cls = get_gate_class(name)
        assert cls.steps_after_optimiser == (cls.after_step is not Gate.after_step), name
