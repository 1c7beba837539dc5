"""The mathematics of the gates as plain functions of tensors.

Every function here is elementwise (or broadcasts), differentiable where it
says so, and free of module state, so that tests can compare it with an
independent computation. Equations follow Lee et al., "Adaptive Network
Sparsification via Dependent Variational Beta-Bernoulli Dropout" (SPEC.md
sections 1 and 2).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from bbdrop import kernels

EULER_GAMMA = 0.5772156649015329

__all__ = [
    "EULER_GAMMA",
    "gaussian_kl",
    "kumaraswamy_beta_kl",
    "kumaraswamy_logit_rsample",
    "kumaraswamy_mean",
    "kumaraswamy_rsample",
    "logistic_noise",
    "relaxed_bernoulli_mul",
    "relaxed_bernoulli_mul2",
    "relaxed_bernoulli_rsample",
    "safe_logit",
]


def kumaraswamy_beta_kl(a: Tensor, b: Tensor, c: float | Tensor) -> Tensor:
    """KL( Kumaraswamy(a, b) || Beta(c, 1) ), elementwise and in closed form.

    Nalisnick & Smyth (2017), "Stick-breaking variational autoencoders",
    Eq. (11). With the Beta's second parameter equal to 1 the infinite series
    of the general formula vanishes and ``log B(c, 1) = -log c``::

        (1 - c/a) (-gamma_E - digamma(b) - 1/b) + log(a b) - log c - (b - 1)/b

    Gradients w.r.t. ``a`` and ``b`` are written out (one autograd node)::

        dKL/da = (c / a^2) (-gamma_E - digamma(b) - 1/b) + 1/a
        dKL/db = (1 - c/a) (1/b^2 - trigamma(b)) + 1/b - 1/b^2
    """
    c = torch.as_tensor(c, dtype=a.dtype, device=a.device)
    if c.requires_grad:  # a learned prior: let autograd differentiate the formula
        return _kumaraswamy_beta_kl_terms(a, b, c)
    return _KumaraswamyBetaKL.apply(a, b, c)


def _kumaraswamy_beta_kl_terms(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    return (
        (1.0 - c / a) * (-EULER_GAMMA - torch.digamma(b) - 1.0 / b)
        + torch.log(a * b)
        - torch.log(c)
        - (b - 1.0) / b
    )


class _KumaraswamyBetaKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
        inv_b = b.reciprocal()
        t = (-EULER_GAMMA - torch.digamma(b)).sub_(inv_b)  # -gamma - psi(b) - 1/b
        ctx.save_for_backward(a, b, c, t)
        return _kumaraswamy_beta_kl_from(a, b, c, t, inv_b)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        a, b, c, t = ctx.saved_tensors
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            inv_a = a.reciprocal()
            grad_a = grad * (c * inv_a.square() * t + inv_a)
        if ctx.needs_input_grad[1]:
            inv_b = b.reciprocal()
            inv_b2 = inv_b.square()
            grad_b = grad * ((1.0 - c / a) * (inv_b2 - torch.polygamma(1, b)) + inv_b - inv_b2)
        return grad_a, grad_b, None


def _kumaraswamy_beta_kl_from(a: Tensor, b: Tensor, c: Tensor, t: Tensor, inv_b: Tensor) -> Tensor:
    # (1 - c/a) t + log(a b) - log c - (b - 1)/b, with (b - 1)/b = 1 - 1/b
    return (1.0 - c / a) * t + torch.log(a * b) - torch.log(c) - 1.0 + inv_b


def gaussian_kl(mean: Tensor, std: Tensor, prior_std: float | Tensor) -> Tensor:
    """KL( N(mean, std^2) || N(0, prior_std^2) ), elementwise."""
    prior_std = torch.as_tensor(prior_std, dtype=mean.dtype, device=mean.device)
    return (
        torch.log(prior_std / std)
        + (std.square() + mean.square()) / (2.0 * prior_std.square())
        - 0.5
    )


def kumaraswamy_mean(a: Tensor, b: Tensor) -> Tensor:
    """E[pi] for pi ~ Kumaraswamy(a, b): ``b B(1 + 1/a, b)``, computed in log space.

    The log-gamma form stays finite for the tiny ``a`` (about 4.5e-5) that the
    parameter clamps allow, where ``1/a`` is in the tens of thousands.
    """
    inv_a = 1.0 / a
    return torch.exp(
        torch.log(b) + torch.lgamma(1.0 + inv_a) + torch.lgamma(b) - torch.lgamma(1.0 + inv_a + b)
    )


def kumaraswamy_rsample(
    a: Tensor, b: Tensor, sample_shape: tuple[int, ...] = (), eps: float = 1e-6
) -> Tensor:
    """Reparameterised Kumaraswamy sample ``(1 - u^(1/b))^(1/a)``, u ~ U(eps, 1 - eps).

    The clamp on ``u`` is the authors' (SPEC.md section 1); it keeps the
    gradient finite at the ends of the interval.
    """
    shape = torch.Size(sample_shape) + torch.broadcast_shapes(a.shape, b.shape)
    u = torch.rand(shape, dtype=a.dtype, device=a.device).clamp_(eps, 1.0 - eps)
    # 1 - u^(1/b) as -expm1(log(u) / b): in float32 u^(1/b) rounds to 1 near u = 1
    # for large b, and the gradient of 0^(1/a) is infinite.
    return torch.expm1(torch.log(u) / b).neg().pow(1.0 / a)


def kumaraswamy_logit_rsample(
    a: Tensor, b: Tensor, u: Tensor | None = None, eps: float = 1e-6
) -> Tensor:
    """``logit(pi)`` for a reparameterised ``pi ~ Kumaraswamy(a, b)``, one autograd node.

    Equal to ``safe_logit(kumaraswamy_rsample(a, b))`` for the same noise ``u``
    (drawn from U(eps, 1 - eps) when not given), computed in log space::

        log w = log(u) / b,  v = 1 - w,  log pi = log(v) / a

    with the gradient written out (zero where pi is clamped by safe_logit)::

        d logit / d log pi = 1 / (1 - pi)
        d log pi / d a = -log(pi) / a
        d log pi / d b = (w / v) log(w) / (a b)
    """
    if u is None:
        u = torch.rand(torch.broadcast_shapes(a.shape, b.shape), dtype=a.dtype, device=a.device)
    return _KumaraswamyLogit.apply(a, b, u.clamp(eps, 1.0 - eps))


class _KumaraswamyLogit(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, a: Tensor, b: Tensor, u: Tensor) -> Tensor:
        tiny = torch.finfo(a.dtype).eps
        log_w = torch.log(u) / b
        v = torch.expm1(log_w).neg_()  # 1 - w, accurate when w is close to 1
        log_pi = torch.log(v) / a
        pi = torch.exp(log_pi)
        inside = (pi > tiny) & (pi < 1.0 - tiny)
        pi_c = pi.clamp(tiny, 1.0 - tiny)
        ctx.save_for_backward(a, b, log_w, v, log_pi, pi, inside)
        return torch.log(pi_c) - torch.log1p(-pi_c)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        a, b, log_w, v, log_pi, pi, inside = ctx.saved_tensors
        g = torch.where(inside, grad / (1.0 - pi), 0.0)  # d/d log pi
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = g * (-log_pi / a)
        if ctx.needs_input_grad[1]:
            w = 1.0 - v
            grad_b = g * ((w / v) * log_w / (a * b))
        return grad_a, grad_b, None


def safe_logit(p: Tensor) -> Tensor:
    """``log p - log(1 - p)`` clamped at the dtype's resolution.

    With p clamped to [1e-10, 1 - 1e-10] in float32, ``1 - 1e-10`` rounds to
    1 and a plain logit is infinite; ``torch.logit`` with ``eps`` keeps it
    finite and gives zero gradient outside the clamp, never NaN.
    """
    return torch.logit(p, eps=torch.finfo(p.dtype).eps)


def logistic_noise(shape: torch.Size | tuple[int, ...], like: Tensor) -> Tensor:
    """Standard logistic noise ``log u - log(1 - u)`` with u ~ U(0, 1), no gradient."""
    u = torch.rand(shape, dtype=like.dtype, device=like.device)
    return u.logit_(torch.finfo(like.dtype).eps)


def relaxed_bernoulli_rsample(
    logits: Tensor, temperature: float, sample_shape: tuple[int, ...] = ()
) -> Tensor:
    """Concrete / relaxed Bernoulli sample ``sigmoid((logits + L) / temperature)``.

    L is standard logistic noise. This is the sampler of
    ``torch.distributions.RelaxedBernoulli(temperature, logits=logits)`` written
    without the distribution object: a gate draws one per unit and example on
    every training step, and the object's construction and checks cost more
    than the arithmetic. The tests compare the two distributions.
    """
    shape = torch.Size(sample_shape) + logits.shape
    noise = logistic_noise(shape, logits)
    return torch.sigmoid((noise + logits) * (1.0 / temperature))


class _RelaxedBernoulliMul(torch.autograd.Function):
    """``x * z`` with ``z ~ RelaxedBernoulli(temperature, logits)`` drawn per (example, unit).

    One autograd node instead of five: the mask is drawn and applied with
    in-place arithmetic, and the backward pass is written out:
    ``dy/dx = z`` and ``dy/dlogits = x z (1 - z) / temperature``.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, logits: Tensor, temperature: float) -> Tensor:
        n, k = x.shape[:2]
        z = logistic_noise((n, k), x)  # (N, K)
        z.add_(logits).mul_(1.0 / temperature).sigmoid_()
        ctx.temperature = temperature
        ctx.logits_shape = logits.shape
        ctx.save_for_backward(x, z)
        return x * _broadcast_units(z, x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, z = ctx.saved_tensors
        grad_x = grad_logits = None
        if ctx.needs_input_grad[0]:
            grad_x = grad * _broadcast_units(z, x)
        if ctx.needs_input_grad[1]:
            g = grad * x
            if g.dim() == 4:
                g = g.sum(dim=(2, 3))  # (N, K, H, W) -> (N, K)
            g.mul_(z)
            g.sub_(g * z).mul_(1.0 / ctx.temperature)  # x z (1 - z) / tau
            grad_logits = g.sum(dim=0) if len(ctx.logits_shape) == 1 else g
        return grad_x, grad_logits, None


def _broadcast_units(z: Tensor, like: Tensor) -> Tensor:
    """View a per-(example, unit) tensor (N, K) so that it broadcasts against ``like``."""
    return z if like.dim() == 2 else z.view(*z.shape, *([1] * (like.dim() - 2)))


def relaxed_bernoulli_mul(x: Tensor, logits: Tensor, temperature: float) -> Tensor:
    """``x`` times a relaxed Bernoulli mask, one draw per example and unit.

    Args:
        x: activations (N, K) or (N, K, H, W); the mask is shared over H, W.
        logits: (K,) (one probability per unit) or (N, K) (per example).
        temperature: tau of the concrete relaxation.

    Equal in distribution to
    ``x * relaxed_bernoulli_rsample(logits, temperature, (N,))`` (broadcast),
    with the same gradients, at a fraction of the cost. Float32 CPU tensors go
    to bbdrop's compiled kernels where they are available (:mod:`bbdrop.kernels`).
    """
    if kernels.use_compiled(x, logits):
        return kernels.masked_mul(x, logits, None, temperature)
    return _RelaxedBernoulliMul.apply(x, logits, temperature)


def relaxed_bernoulli_mul2(
    x: Tensor, logits1: Tensor, logits2: Tensor, temperature: float
) -> Tensor:
    """``x`` times the product of two independent relaxed Bernoulli masks (DBB's
    ``z_pi * z_phi``), each drawn per example and unit; the arguments as in
    :func:`relaxed_bernoulli_mul`. Equal in distribution to applying that twice."""
    if kernels.use_compiled(x, logits1, logits2):
        return kernels.masked_mul(x, logits1, logits2, temperature)
    y = _RelaxedBernoulliMul.apply(x, logits1, temperature)
    return _RelaxedBernoulliMul.apply(y, logits2, temperature)


def softplus_inverse(y: float) -> float:
    """The raw value whose softplus is ``y`` (for initialising parameters)."""
    if not y > 0:
        raise ValueError(f"softplus_inverse needs y > 0, got {y!r}")
    return y + math.log(-math.expm1(-y))
