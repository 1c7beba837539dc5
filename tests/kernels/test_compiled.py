"""bbdrop's compiled CPU kernels against independent computations.

The generator is checked against the uniform law; each kernel against the same
formula evaluated by torch in float64 from the kernel's own noise; gradients
against autograd of that float64 formula.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from scipy import stats

import bbdrop
from bbdrop import kernels
from bbdrop.gates import functional as BF
from bbdrop.gates.bb import A_RAW_MIN, B_RAW_MAX, B_RAW_MIN

F64 = torch.float64


def _available() -> bool:
    try:
        kernels.load()
    except RuntimeError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _available(), reason="the compiled kernels do not build here")


@pytest.fixture(autouse=True)
def compiled() -> Iterator[None]:
    before = kernels.get_backend()
    kernels.set_backend("compiled")
    yield
    kernels.set_backend(before)


def noise_for(seed: int, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two logistic noises the kernels use for (example, unit), as float64 (N, K)."""
    u = kernels.load().uniforms(n * k, seed).to(F64)
    noise = torch.log(u) - torch.log1p(-u)  # computed by torch, not by the kernel's log
    return noise[:, 0].view(n, k), noise[:, 1].view(n, k)


# -- the generator ----------------------------------------------------------------------


def test_uniforms_are_uniform_and_independent() -> None:
    n = 1_000_000
    u = kernels.load().uniforms(n, 2024).to(F64)
    assert 0 < u.min() and u.max() < 1
    # the documented grid: (j + 1/2) 2^-23
    j = u * 2**23 - 0.5
    assert torch.equal(j, j.round())
    bound = 1.95 / math.sqrt(n)  # KS critical value at p = 0.001
    for col in (0, 1):
        assert stats.kstest(u[:, col].numpy(), "uniform").statistic < bound
    # the two halves of a draw, and neighbouring counters, are uncorrelated (5 sigma)
    corr = torch.corrcoef(torch.stack([u[:-1, 0], u[:-1, 1], u[1:, 0], u[1:, 1]]))
    off_diagonal = corr[~torch.eye(4, dtype=torch.bool)]
    assert off_diagonal.abs().max() < 5 / math.sqrt(n)


def test_seeds_give_different_streams_and_a_seed_the_same_one() -> None:
    m = kernels.load()
    assert torch.equal(m.uniforms(1000, 7), m.uniforms(1000, 7))
    a, b = m.uniforms(1000, 7), m.uniforms(1000, 8)
    assert (a == b).float().mean() < 0.01


def test_logistic_noise_matches_torch_on_the_same_uniforms() -> None:
    m = kernels.load()
    u = m.uniforms(200_000, 3).to(F64)
    expected = torch.log(u) - torch.log1p(-u)
    got = m.logistic_noise(200_000, 3).to(F64)
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=2e-6)
    assert stats.kstest(got[:, 0].numpy(), "logistic").statistic < 1.95 / math.sqrt(200_000)


# -- the masks --------------------------------------------------------------------------

CASES = [
    ((7, 5), (5,), None),
    ((7, 5), (7, 5), None),
    ((7, 5), (5,), (7, 5)),
    ((6, 4, 3, 2), (4,), None),
    ((6, 4, 3, 2), (4,), (6, 4)),
    ((300, 200), (200,), (300, 200)),  # large enough to be split between threads
]


def reference(x, l1, l2, tau, seed):
    """y, z1, z2 in float64 from the kernel's uniforms (z2 = None with one mask)."""
    n, k = x.shape[:2]
    n1, n2 = noise_for(seed, n, k)
    z1 = torch.sigmoid((l1.to(F64) + n1) / tau)
    z2 = None if l2 is None else torch.sigmoid((l2.to(F64) + n2) / tau)
    z = z1 if z2 is None else z1 * z2
    y = x.to(F64) * z.view(n, k, *([1] * (x.dim() - 2)))
    return y, z1, z2


@pytest.mark.parametrize(("shape", "shape1", "shape2"), CASES)
def test_forward_is_the_formula_on_the_generators_noise(shape, shape1, shape2) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g)
    l1 = 2 * torch.randn(shape1, generator=g)
    l2 = None if shape2 is None else 2 * torch.randn(shape2, generator=g)
    y, z1, z2 = kernels.load().masked_forward(x, l1, l2, 0.3, 99)
    ey, ez1, ez2 = reference(x, l1, l2, 0.3, 99)
    torch.testing.assert_close(z1.to(F64), ez1, rtol=1e-5, atol=1e-6)
    if ez2 is not None:
        torch.testing.assert_close(z2.to(F64), ez2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y.to(F64), ey, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("shape", "shape1", "shape2"), CASES)
def test_gradients_match_autograd_of_the_formula(shape, shape1, shape2) -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=g, requires_grad=True)
    l1 = (2 * torch.randn(shape1, generator=g)).requires_grad_()
    l2 = None if shape2 is None else (2 * torch.randn(shape2, generator=g)).requires_grad_()
    weights = torch.randn(shape, generator=g)
    torch.manual_seed(5)
    y = kernels.masked_mul(x, l1, l2, 0.5)
    (y * weights).sum().backward()
    torch.manual_seed(5)
    seed = kernels._seed()  # the seed the call above drew
    x64 = x.detach().to(F64).requires_grad_()
    l1_64 = l1.detach().to(F64).requires_grad_()
    l2_64 = None if l2 is None else l2.detach().to(F64).requires_grad_()
    ey, _, _ = reference(x64, l1_64, l2_64, 0.5, seed)
    (ey * weights.to(F64)).sum().backward()
    torch.testing.assert_close(y.detach().to(F64), ey.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.to(F64), x64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l1.grad.to(F64), l1_64.grad, rtol=1e-4, atol=1e-5)
    if l2 is not None:
        torch.testing.assert_close(l2.grad.to(F64), l2_64.grad, rtol=1e-4, atol=1e-5)


def test_masks_follow_the_binary_concrete_law() -> None:
    """Two-sample KS against torch.distributions.RelaxedBernoulli."""
    n, k, tau, logit = 2000, 50, 0.5, 0.7
    z = kernels.masked_mul(torch.ones(n, k), torch.full((k,), logit), None, tau)
    ref = torch.distributions.RelaxedBernoulli(torch.tensor(tau), logits=torch.tensor(logit))
    torch.manual_seed(0)
    other = ref.sample((n * k,))
    assert stats.ks_2samp(z.flatten().numpy(), other.numpy()).pvalue > 1e-3


def test_extreme_logits_stay_finite() -> None:
    x = torch.randn(4, 6)
    l1 = torch.tensor([-1e6, -100.0, 0.0, 100.0, 1e6, 30.0])
    y, z1, _ = kernels.load().masked_forward(x, l1, None, 0.01, 1)
    assert torch.isfinite(y).all() and ((z1 >= 0) & (z1 <= 1)).all()
    assert (z1[:, 0] < 1e-30).all() and (z1[:, 4] == 1).all()


def test_same_torch_seed_same_masks() -> None:
    x = torch.randn(20, 30)
    logits = torch.zeros(30)
    torch.manual_seed(3)
    a = kernels.masked_mul(x, logits, None, 0.1)
    torch.manual_seed(3)
    b = kernels.masked_mul(x, logits, None, 0.1)
    c = kernels.masked_mul(x, logits, None, 0.1)
    assert torch.equal(a, b) and not torch.equal(b, c)


# -- the gates with the kernels -----------------------------------------------------------


@pytest.mark.parametrize("name", ["bb", "dbb"])
@pytest.mark.parametrize("shape", [(8, 6), (8, 6, 5, 4)])
def test_gate_forward_is_input_times_its_mask(name: str, shape: tuple[int, ...]) -> None:
    """The compiled training path applies the mask of the gate's own pi (and phi)."""
    gate = bbdrop.create_gate(name, 6).train()
    x = torch.randn(shape)
    torch.manual_seed(5)
    y = gate(x)
    torch.manual_seed(5)  # replay the draws in the forward pass's order
    logit_pi = gate.sample_logit_pi()
    logit_phi = gate.logit_phi(x, sample_shift=True) if name == "dbb" else None
    seed = kernels._seed()
    ey, _, _ = reference(x, logit_pi.detach(), None if logit_phi is None else logit_phi.detach(),
                         gate.temperature, seed)  # fmt: skip
    torch.testing.assert_close(y.detach().to(F64), ey, rtol=1e-5, atol=1e-6)


def backward_both(got: torch.Tensor, expected: torch.Tensor, where=None) -> None:
    """Backpropagate the same random weighting of the kernel's output and of the
    float64 reference (only at ``where`` for the reference)."""
    w = torch.randn(got.shape, dtype=F64)
    (got * w.float()).sum().backward()
    if where is None:
        (expected * w).sum().backward()
    else:
        (expected[where] * w[where]).sum().backward()


RAW = torch.tensor([-12.0, -10.0, -5.0, -1.0, -0.3, 0.0, 0.5, 1.0, 3.0, 8.0, 20.0, 49.0, 60.0])


def raw_grid() -> tuple[torch.Tensor, torch.Tensor]:
    a, b = torch.meshgrid(RAW, RAW, indexing="ij")
    return a.flatten().clone(), b.flatten().clone()


def posterior64(a_raw: torch.Tensor, b_raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (F.softplus(a_raw.clamp(min=A_RAW_MIN)),
            F.softplus(b_raw.clamp(B_RAW_MIN, B_RAW_MAX)))  # fmt: skip


def test_kumaraswamy_logit_kernel_matches_float64() -> None:
    a_raw, b_raw = raw_grid()
    u = torch.rand(a_raw.shape, generator=torch.Generator().manual_seed(0)).clamp(1e-6, 1 - 1e-6)
    a_raw.requires_grad_()
    b_raw.requires_grad_()
    got = kernels.kumaraswamy_logit(a_raw, b_raw, u, A_RAW_MIN, B_RAW_MIN, B_RAW_MAX)
    a64, b64 = (t.detach().to(F64).requires_grad_() for t in (a_raw, b_raw))
    log_pi = (
        torch.log(-torch.expm1(torch.log(u.to(F64)) / posterior64(a64, b64)[1]))
        / (posterior64(a64, b64)[0])
    )
    pi = log_pi.exp()
    # compare where float32's clamp of pi at [eps, 1 - eps] is not active
    eps = torch.finfo(torch.float32).eps
    inside = (pi > 2 * eps) & (pi < 1 - 2 * eps)
    assert inside.sum() > 50
    expected = torch.log(pi) - torch.log1p(-pi)
    torch.testing.assert_close(got.detach().to(F64)[inside], expected.detach()[inside],
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    backward_both(got, expected, inside)
    for mine, ref in ((a_raw.grad, a64.grad), (b_raw.grad, b64.grad)):
        torch.testing.assert_close(mine.to(F64)[inside], ref[inside], rtol=1e-4, atol=1e-6)
    # clamped units: no gradient, and never NaN
    assert torch.isfinite(a_raw.grad).all() and torch.isfinite(b_raw.grad).all()
    assert (a_raw.grad[a_raw.detach() < A_RAW_MIN] == 0).all()
    assert (b_raw.grad[b_raw.detach() > B_RAW_MAX] == 0).all()
    assert (got.detach().abs() <= -math.log(eps) + 1e-3).all()


@pytest.mark.parametrize("c", [1e-4, 1e-2, 1.0])
def test_kl_kernel_matches_the_float64_closed_form(c: float) -> None:
    """The closed form itself is checked against quadrature in tests/gates/test_functional.py."""
    a_raw, b_raw = raw_grid()
    a_raw.requires_grad_()
    b_raw.requires_grad_()
    got = kernels.kumaraswamy_beta_kl(a_raw, b_raw, c, A_RAW_MIN, B_RAW_MIN, B_RAW_MAX)
    a64, b64 = (t.detach().to(F64).requires_grad_() for t in (a_raw, b_raw))
    expected = BF.kumaraswamy_beta_kl(*posterior64(a64, b64), c)
    torch.testing.assert_close(got.detach().to(F64), expected.detach(), rtol=1e-6, atol=1e-5)
    backward_both(got, expected)
    torch.testing.assert_close(a_raw.grad.to(F64), a64.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(b_raw.grad.to(F64), b64.grad, rtol=1e-5, atol=1e-4)


# -- choosing the implementation ------------------------------------------------------------


def test_what_goes_to_the_kernels() -> None:
    assert kernels.use_compiled(torch.ones(2))
    assert not kernels.use_compiled(torch.ones(2, dtype=F64))  # float64: the eager path
    kernels.set_backend("torch")
    assert not kernels.use_compiled(torch.ones(2))
    assert kernels.resolved("cpu") == "torch"


def test_a_failed_build_is_an_error_or_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.utils import cpp_extension

    def broken(*args, **kwargs):
        raise OSError("g++: command not found")

    monkeypatch.setattr(kernels, "_module", None)
    monkeypatch.setattr(kernels, "_error", None)
    monkeypatch.setattr(cpp_extension, "load", broken)
    with pytest.raises(RuntimeError, match=r"g\+\+: command not found.*BBDROP_KERNELS=torch"):
        kernels.load()
    with pytest.raises(RuntimeError, match="could not build"):
        kernels.use_compiled(torch.ones(1))  # "compiled": the error
    kernels.set_backend("auto")
    monkeypatch.setattr(kernels, "_warned", False)
    with pytest.warns(RuntimeWarning, match="eager implementation"):
        assert not kernels.use_compiled(torch.ones(1))
    gate = bbdrop.create_gate("bb", 4).train()  # and the gates still train
    assert gate(torch.ones(3, 4)).shape == (3, 4)


@pytest.mark.parametrize("shape", [(64, 7), (16, 7, 3, 5), (1, 7), (300, 200)])
def test_dbb_logit_phi_kernel_matches_float64(shape: tuple[int, ...]) -> None:
    """phi written out in float64 here, gradients from autograd of that."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=g)
    k = shape[1]
    shift = torch.rand(k, generator=g).requires_grad_()
    scale = (2 * torch.rand(k, generator=g) - 1).requires_grad_()  # some phi leave [eps, 1-eps]
    eps, norm_eps = 1e-4, 1e-5
    logit, mean, var = kernels.dbb_logit_phi(x, shift, scale, norm_eps, eps)
    h = x.to(F64).mean(dim=tuple(range(2, x.dim()))) if x.dim() > 2 else x.to(F64)
    m = h.mean(0)
    v = ((h - m) ** 2).mean(0)
    s64, c64 = (t.detach().to(F64).requires_grad_() for t in (shift, scale))
    p = s64 + c64 * (h - m) / torch.sqrt(v + norm_eps)
    inside = (p > eps) & (p < 1 - eps)
    assert shape[0] == 1 or (~inside).any()  # the clamp is exercised
    pc = p.clamp(eps, 1 - eps)
    expected = torch.log(pc) - torch.log1p(-pc)
    torch.testing.assert_close(mean.to(F64), m, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.to(F64), v, rtol=1e-5, atol=1e-6)
    # Values compared as phi: float32 rounds p to about 1e-7, and near the clamp the
    # logit's slope 1 / (p (1 - p)) reaches 1e4; the same conditioning bounds the
    # gradients' agreement (relative 1e-3).
    torch.testing.assert_close(torch.sigmoid(logit.detach().to(F64)), pc.detach(),
                               rtol=0, atol=5e-7)  # fmt: skip
    w = torch.randn(logit.shape, generator=g, dtype=F64)
    (logit * w.float()).sum().backward()
    (torch.where(inside, expected, expected.detach()) * w).sum().backward()
    torch.testing.assert_close(shift.grad.to(F64), s64.grad, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(scale.grad.to(F64), c64.grad, rtol=1e-3, atol=1e-3)


def test_gaussian_kl_kernel_matches_float64() -> None:
    """Against torch.distributions' Normal-Normal KL in float64, and its autograd."""
    mean = torch.linspace(-4, 4, 13).repeat_interleave(13).requires_grad_()
    s_raw = RAW.repeat(13).clone().requires_grad_()
    rho = math.sqrt(5.0)
    got = kernels.gaussian_kl(mean, s_raw, -10.0, rho)
    m64, r64 = (t.detach().to(F64).requires_grad_() for t in (mean, s_raw))
    q = torch.distributions.Normal(m64, F.softplus(r64.clamp(min=-10.0)))
    expected = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, rho))
    torch.testing.assert_close(got.detach().to(F64), expected.detach(), rtol=1e-6, atol=1e-5)
    backward_both(got, expected)
    torch.testing.assert_close(mean.grad.to(F64), m64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s_raw.grad.to(F64), r64.grad, rtol=1e-5, atol=1e-6)
    assert (s_raw.grad[s_raw.detach() < -10] == 0).all()
