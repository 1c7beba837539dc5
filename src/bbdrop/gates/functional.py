"""The mathematics of the gates as plain functions of tensors.

Every function here is elementwise (or broadcasts), plain torch that autograd
differentiates, and free of module state, so that tests can compare it with an
independent computation and ``torch.compile`` can fuse it. Equations follow
Lee et al., "Adaptive Network Sparsification via Dependent Variational
Beta-Bernoulli Dropout" (docs/method.md sections 1 and 2).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bbdrop.distributed import example_noise

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
    """
    c = torch.as_tensor(c, dtype=a.dtype, device=a.device)
    return (
        (1.0 - c / a) * (-EULER_GAMMA - torch.digamma(b) - 1.0 / b)
        + torch.log(a * b)
        - torch.log(c)
        - (b - 1.0) / b
    )


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

    The clamp on ``u`` is the authors' (docs/method.md section 1); it keeps the
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
    """``logit(pi)`` for a reparameterised ``pi ~ Kumaraswamy(a, b)``, in log space.

    Equal to ``safe_logit(kumaraswamy_rsample(a, b))`` for the same noise ``u``
    (drawn from U(eps, 1 - eps) when not given), but accurate where pi is close
    to 1, where ``1 - pi`` cancels in float32::

        log w = log(u) / b,  log pi = log(1 - w) / a,  logit = log pi - log(1 - pi)

    with ``1 - w = -expm1(log w)`` and ``1 - pi = -expm1(log pi)``. pi is clamped
    to [eps_dtype, 1 - eps_dtype] as :func:`safe_logit` does, with zero gradient
    outside.
    """
    if u is None:
        u = torch.rand(torch.broadcast_shapes(a.shape, b.shape), dtype=a.dtype, device=a.device)
    tiny = torch.finfo(a.dtype).eps
    log_w = torch.log(u.clamp(eps, 1.0 - eps)) / b
    log_pi = torch.log(-torch.expm1(log_w)) / a
    log_pi = log_pi.clamp(math.log(tiny), math.log1p(-tiny))
    return log_pi - torch.log(-torch.expm1(log_pi))


def safe_logit(p: Tensor) -> Tensor:
    """``log p - log(1 - p)`` clamped at the dtype's resolution.

    With p clamped to [1e-10, 1 - 1e-10] in float32, ``1 - 1e-10`` rounds to
    1 and a plain logit is infinite; ``torch.logit`` with ``eps`` keeps it
    finite and gives zero gradient outside the clamp, never NaN.
    """
    return torch.logit(p, eps=torch.finfo(p.dtype).eps)


def logistic_noise(shape: torch.Size | tuple[int, ...], like: Tensor) -> Tensor:
    """Standard logistic noise ``log u - log(1 - u)`` with u ~ U(0, 1), no gradient."""
    u = example_noise(lambda s: torch.rand(s, dtype=like.dtype, device=like.device), shape)
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


def relaxed_bernoulli_mul(x: Tensor, logits: Tensor, temperature: float) -> Tensor:
    """``x`` times a relaxed Bernoulli mask, one draw per example and unit.

    Args:
        x: activations (N, K) or (N, K, H, W); the mask is shared over H, W.
        logits: (K,) (one probability per unit) or (N, K) (per example).
        temperature: tau of the concrete relaxation.

    The same as ``x * relaxed_bernoulli_rsample(logits, temperature, (N,))``
    (broadcast over H, W), with the noise drawn as (N, K) whatever the shape of
    ``logits``.
    """
    n, k = x.shape[:2]
    z = relaxed_bernoulli_rsample(logits.expand(n, k), temperature)  # (N, K)
    return x * _broadcast_units(z, x)


def relaxed_bernoulli_mul2(
    x: Tensor, logits1: Tensor, logits2: Tensor, temperature: float
) -> Tensor:
    """``x`` times the product of two independent relaxed Bernoulli masks (DBB's
    ``z_pi * z_phi``), each drawn per example and unit; the arguments as in
    :func:`relaxed_bernoulli_mul`. The same as applying that twice."""
    n, k = x.shape[:2]
    z1 = relaxed_bernoulli_rsample(logits1.expand(n, k), temperature)  # (N, K)
    z2 = relaxed_bernoulli_rsample(logits2.expand(n, k), temperature)
    return x * _broadcast_units(z1 * z2, x)


def _broadcast_units(z: Tensor, like: Tensor) -> Tensor:
    """View a per-(example, unit) tensor (N, K) so that it broadcasts against ``like``."""
    return z if like.dim() == 2 else z.view(*z.shape, *([1] * (like.dim() - 2)))


def softplus_inverse(y: float) -> float:
    """The raw value whose softplus is ``y`` (for initialising parameters)."""
    if not y > 0:
        raise ValueError(f"softplus_inverse needs y > 0, got {y!r}")
    return y + math.log(-math.expm1(-y))
