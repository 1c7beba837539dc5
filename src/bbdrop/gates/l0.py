"""L0 regularisation with hard-concrete gates: Louizos, Welling & Kingma, "Learning
Sparse Neural Networks through L0 Regularization", ICLR 2018 (docs/baselines/l0.md).

Unit k is multiplied by ``z_k``, a sample of the hard-concrete distribution with
location ``log_alpha_k``, temperature beta and stretch interval (gamma, zeta)::

    s = sigmoid((log u - log(1 - u) + log_alpha) / beta),  u ~ U(0, 1)
    z = min(1, max(0, s (zeta - gamma) + gamma))

The stretch puts point masses on z = 0 and z = 1, so the expected L0 norm
``sum_k P(z_k != 0)`` has a closed form and a pathwise gradient. The penalty
weighs each unit by the weights it switches off, with a Gaussian prior on those
weights (paper Sec. 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bbdrop import validate
from bbdrop.gates.base import Gate, register_gate
from bbdrop.gates.settings import GateSettings

__all__ = [
    "HardConcreteGate",
    "hard_concrete_cdf",
    "hard_concrete_prob_nonzero",
    "hard_concrete_prob_one",
    "hard_concrete_rsample",
    "hard_concrete_test_value",
    "l0_penalty",
]

# Constants of both reference implementations (docs/baselines/l0.md).
UNIFORM_EPS = 1e-6  # u ~ U(eps, 1 - eps)
PROB_TOL = 1e-6  # P(z != 0) clamped to [tol, 1 - tol] in the penalty
INIT_STD = 1e-2  # log_alpha ~ N(log((1 - p) / p), INIT_STD^2)


def hard_concrete_rsample(
    log_alpha: Tensor,
    temperature: float,
    gamma: float,
    zeta: float,
    sample_shape: tuple[int, ...] = (),
    eps: float = UNIFORM_EPS,
) -> Tensor:
    """Reparameterised hard-concrete sample, shape ``sample_shape + log_alpha.shape``.

    Paper Sec. 2: ``s = sigmoid((logit u + log_alpha) / beta)`` with
    ``u ~ U(eps, 1 - eps)``, stretched to (gamma, zeta) and clamped to [0, 1].
    Finite with a finite gradient for any log_alpha (the sigmoid saturates).
    """
    shape = torch.Size(sample_shape) + log_alpha.shape
    u = torch.rand(shape, dtype=log_alpha.dtype, device=log_alpha.device)
    u = u.mul_(1.0 - 2.0 * eps).add_(eps)
    s = torch.sigmoid((torch.logit(u) + log_alpha) * (1.0 / temperature))
    return (s * (zeta - gamma) + gamma).clamp(0.0, 1.0)


def hard_concrete_cdf(
    t: float, log_alpha: Tensor, temperature: float, gamma: float, zeta: float
) -> Tensor:
    """``P(z <= t)`` for 0 <= t < 1, the stretched concrete's CDF (paper Sec. 2)::

        sigmoid(beta * logit((t - gamma) / (zeta - gamma)) - log_alpha)

    At t = 0 it is the mass of the point z = 0.
    """
    if not 0 <= t < 1:
        raise ValueError(f"t must be in [0, 1), got {t!r}")
    xn = (t - gamma) / (zeta - gamma)
    return torch.sigmoid(temperature * math.log(xn / (1.0 - xn)) - log_alpha)


def hard_concrete_prob_nonzero(
    log_alpha: Tensor, temperature: float, gamma: float, zeta: float
) -> Tensor:
    """``P(z != 0) = sigmoid(log_alpha - beta log(-gamma / zeta))``: the expected L0
    norm of one gate (paper Sec. 2); elementwise, exact (no clamp)."""
    return torch.sigmoid(log_alpha - temperature * math.log(-gamma / zeta))


def hard_concrete_prob_one(
    log_alpha: Tensor, temperature: float, gamma: float, zeta: float
) -> Tensor:
    """``P(z = 1) = sigmoid(log_alpha - beta log((1 - gamma) / (zeta - 1)))``, the mass
    that the clamp at 1 collects; elementwise."""
    return torch.sigmoid(log_alpha - temperature * math.log((1.0 - gamma) / (zeta - 1.0)))


def hard_concrete_test_value(log_alpha: Tensor, gamma: float, zeta: float) -> Tensor:
    """The deterministic test-time gate ``min(1, max(0, sigmoid(log_alpha)(zeta - gamma) + gamma))``
    (paper Sec. 2); exactly 0 for ``log_alpha <= log(-gamma / zeta)``."""
    return (torch.sigmoid(log_alpha) * (zeta - gamma) + gamma).clamp(0.0, 1.0)


def l0_penalty(
    prob_nonzero: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    unit_dim: int,
    lamb: float,
    weight_decay: float,
) -> Tensor:
    """Expected L0 norm of a layer's weights plus the expected Gaussian-prior term
    (paper Sec. 2, L0 combined with L2)::

        sum_k P(z_k != 0) * sum_{w in G_k} (lamb + weight_decay / 2 * w^2)  +  bias term

    ``G_k`` is the slice ``weight.select(unit_dim, k)``: the outgoing weights of
    input k for a dense layer (``unit_dim=1``), filter k for a convolution
    (``unit_dim=0``), the scale of channel k for a batch norm (a 1-d weight). A bias
    indexed by the units (``unit_dim=0``) is gated like a weight,
    ``sum_k P_k (lamb + weight_decay / 2 * b_k^2)``; otherwise it is not switched off
    by the gates and costs ``weight_decay / 2 * sum b^2``.
    """
    reduce = [d for d in range(weight.dim()) if d != unit_dim]
    group_size = weight.numel() // weight.shape[unit_dim]
    squares = weight.square().sum(dim=reduce) if reduce else weight.square()  # (K,)
    per_unit = lamb * group_size + 0.5 * weight_decay * squares
    penalty = (prob_nonzero * per_unit).sum()
    if bias is not None:
        if unit_dim == 0:
            penalty = penalty + (prob_nonzero * (lamb + 0.5 * weight_decay * bias.square())).sum()
        else:
            penalty = penalty + 0.5 * weight_decay * bias.square().sum()
    return penalty


@dataclass(frozen=True, kw_only=True)
class HardConcreteSettings(GateSettings):
    """L0's settings (docs/baselines/l0.md): the initial drop rate ``droprate_init``,
    the hard concrete's ``temperature`` and stretch ``gamma`` < 0 < 1 < ``zeta``, the
    expected-L0 weight ``lamb`` and the expected-L2 ``weight_decay``."""

    droprate_init: float = 0.5
    temperature: float = 2.0 / 3.0
    gamma: float = -0.1
    zeta: float = 1.1
    lamb: float = 0.1
    weight_decay: float = 6.0

    def check(self) -> None:
        super().check()
        validate.probability("droprate_init", self.droprate_init)
        validate.positive("temperature", self.temperature)
        validate.in_range("gamma", self.gamma, hi=0, closed=False)
        validate.in_range("zeta", self.zeta, lo=1, closed=False)
        validate.non_negative("lamb", self.lamb)
        validate.non_negative("weight_decay", self.weight_decay)


@register_gate("l0")
class HardConcreteGate(Gate):
    """Hard-concrete L0 gates over ``num_units`` units.

    Training draws one ``z`` per unit per forward pass, shared by the whole
    minibatch (as both references do without local reparameterisation);
    evaluation multiplies unit k by :func:`hard_concrete_test_value`, and a unit
    whose value is 0 is pruned. :meth:`regularizer` is :func:`l0_penalty` over
    the gated layer's weights, in the whole-dataset units of bbdrop's objective
    (``kl_scale * regularizer / N``).

    Args:
        num_units: K, the features or channels gated.
        droprate_init: p; ``log_alpha`` starts at ``log((1 - p) / p)`` plus
            N(0, 0.01^2) noise (L0code ``l0_layers.py:45-51``; BBcode
            ``l0reg.py:11-14`` and ``lenet_mlp_mnist_l0reg.py:19``: p = 0.5).
        temperature: beta of the concrete distribution, 2/3 (L0code
            ``l0_layers.py:15``; BBcode ``l0reg.py:11``).
        gamma, zeta: the stretch interval, (-0.1, 1.1) (L0code ``l0_layers.py:10``;
            BBcode ``l0reg.py:7``).
        lamb: L0 cost per expected non-zero weight, whole-dataset units: 0.1 is
            the paper's lambda = 0.1/N (BBcode ``lenet_mlp_mnist_l0reg.py:12,17``:
            ``lambN`` = 0.1, ``lamb = lambN / 60000`` in mean-loss units).
        weight_decay: precision of the Gaussian prior on the gated weights,
            whole-dataset units: 6.0 = 1e-4 (BBcode ``lenet_mlp_mnist_l0reg.py:19``,
            mean-loss units) * N = 60000, as L0code's MLP multiplies it by N
            (``models.py:18``). Set it to ``1e-4 * N`` for another training set size.
        kl_scale: weight of this gate's penalty in :func:`bbdrop.total_kl`.

    Sources (docs/baselines/l0.md): L0code = AMLab-Amsterdam/L0_regularization @ 39a5fe6,
    BBcode = ICLR2020anonymous/bbdrop @ 99fa411 (the authors' comparison).
    """

    Settings = HardConcreteSettings

    def __init__(
        self,
        num_units: int,
        droprate_init: float = 0.5,
        temperature: float = 2.0 / 3.0,
        gamma: float = -0.1,
        zeta: float = 1.1,
        lamb: float = 0.1,
        weight_decay: float = 6.0,
        kl_scale: float = 1.0,
    ) -> None:
        super().__init__(num_units, kl_scale)
        HardConcreteSettings(droprate_init=droprate_init, temperature=temperature, gamma=gamma,
                             zeta=zeta, lamb=lamb, weight_decay=weight_decay,
                             kl_scale=kl_scale)  # fmt: skip
        self.droprate_init = float(droprate_init)
        self.temperature = float(temperature)
        self.gamma = float(gamma)
        self.zeta = float(zeta)
        self.lamb = float(lamb)
        self.weight_decay = float(weight_decay)
        mean = math.log(1.0 - droprate_init) - math.log(droprate_init)
        self.log_alpha = nn.Parameter(mean + INIT_STD * torch.randn(num_units))

    # -- the distribution -----------------------------------------------------------
    def sample(self) -> Tensor:
        """One reparameterised draw of z per unit, shape (K,)."""
        return hard_concrete_rsample(self.log_alpha, self.temperature, self.gamma, self.zeta)

    def prob_nonzero(self) -> Tensor:
        """P(z_k != 0) per unit, clamped to [1e-6, 1 - 1e-6] as both references do
        (L0code ``l0_layers.py:56-60``; BBcode ``l0reg.py:22-26``), shape (K,)."""
        p = hard_concrete_prob_nonzero(self.log_alpha, self.temperature, self.gamma, self.zeta)
        return p.clamp(PROB_TOL, 1.0 - PROB_TOL)

    # -- the protocol -------------------------------------------------------------
    def regularizer(self, layer: nn.Module) -> Tensor:
        """:func:`l0_penalty` over ``layer``'s weight and bias, whose units are on the side
        the gate is bound to (:meth:`bound_side`); a layer without a weight (e.g.
        ``nn.Identity``) leaves ``lamb * sum_k P(z_k != 0)``, on a layer or not."""
        p = self.prob_nonzero()
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, Tensor):
            return self.lamb * p.sum()
        if self.unit_size > 1 and self.bound_side() == "input":  # a unit's features together
            weight = weight.unflatten(1, (-1, self.unit_size))
        unit_dim = self._unit_dim(weight)
        bias = getattr(layer, "bias", None)
        return l0_penalty(
            p,
            weight,
            bias if isinstance(bias, Tensor) else None,
            unit_dim,
            self.lamb,
            self.weight_decay,
        )

    def _unit_dim(self, weight: Tensor) -> int:
        """The weight dimension indexed by the units: 0 for a gate bound to its layer's
        output (a batch norm's 1-d scale included), 1 for one bound to its input;
        ValueError for a gate on no layer."""
        side = self.bound_side()
        unit_dim = 0 if side == "output" else 1
        if weight.dim() < 1 + unit_dim or weight.shape[unit_dim] != self.num_units:
            raise ValueError(
                f"{type(self).__name__} has {self.num_units} units on the {side} of a layer "
                f"whose weight has shape {tuple(weight.shape)}"
            )
        return unit_dim

    def gate_values(self) -> Tensor:
        z = hard_concrete_test_value(self.log_alpha, self.gamma, self.zeta)
        return z * self.static_keep

    def keep_scores(self) -> Tensor:
        """log alpha: the test value, which is zero below a point, rises with it."""
        return self.log_alpha.detach().clone()

    def mask(self, x: Tensor) -> Tensor:
        if self.training:  # one draw per unit, shared by the minibatch: (K,)
            return self.sample()
        if self.mc_sampling:  # units pruned at test time or by prune_ stay removed
            return self.sample().detach() * self.keep_mask()
        return self.gate_values()

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, droprate_init={self.droprate_init}, "
            f"temperature={self.temperature}, gamma={self.gamma}, zeta={self.zeta}, "
            f"lamb={self.lamb}, weight_decay={self.weight_decay}"
        )
