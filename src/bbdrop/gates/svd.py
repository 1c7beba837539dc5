"""Sparse variational dropout (SVD): Molchanov, Ashukha & Vetrov, "Variational Dropout
Sparsifies Deep Neural Networks", ICML 2017 (docs/baselines/svd.md).

Every weight w has a Gaussian posterior ``q(w) = N(theta, sigma^2)`` (theta is the
layer's own weight, ``log sigma^2`` a parameter of the gate) under the log-uniform
prior ``p(|w|) ~ 1/|w|``. The dropout rate of a weight is ``alpha = sigma^2 / theta^2``;
a weight is pruned when ``log alpha`` reaches a threshold. Unlike the multiplicative
gates, SVD owns its layer's forward pass: training samples the pre-activations
with the local reparameterisation trick, evaluation uses the pruned weights.

A unit (input feature k of a dense layer, filter k of a convolution: the unit that
bbdrop gates there) is gone when all of its weights are pruned.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bbdrop import validate
from bbdrop.distributed import example_noise
from bbdrop.gates.base import Gate, register_gate
from bbdrop.gates.settings import GateSettings

__all__ = [
    "KL_K1",
    "KL_K2",
    "KL_K3",
    "SparseVDGate",
    "alive_units",
    "local_reparameterization",
    "log_alpha",
    "sparse_vd_kl",
]

# The constants of the fitted KL approximation, SVDcode nets/layers.py:94 (paper Eq. 14).
KL_K1, KL_K2, KL_K3 = 0.63576, 1.87320, 1.48695
# log alpha is clipped to [-8, 8] wherever it is used (SVDcode nets/layers.py:72-79, 95).
LOG_ALPHA_BOUND = 8.0
# Added to theta^2 inside the log (SVDcode's convolution, nets/layers.py:129; bbdrop
# adds it to dense layers too, so that a zero weight has a finite gradient).
WEIGHT_EPS = 1e-8
# Added to the pre-activation variance under the square root (nets/layers.py:89, 147).
VARIANCE_EPS = 1e-8

Op = Callable[..., Tensor]  # (x, weight, bias) -> pre-activations of the layer
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def log_alpha(
    weight: Tensor, log_sigma2: Tensor, eps: float = WEIGHT_EPS, bound: float = LOG_ALPHA_BOUND
) -> Tensor:
    """``clip(log sigma^2 - log(theta^2 + eps), -bound, bound)``, elementwise.

    The additive parameterisation (paper Sec. 4.1): the optimiser moves ``log sigma^2``
    rather than ``log alpha``, which lowers the gradient's variance. The clip keeps
    ``alpha theta^2`` and the KL finite, and its gradient is zero outside the bounds.
    """
    return (log_sigma2 - torch.log(weight.square() + eps)).clamp(-bound, bound)


def sparse_vd_kl(log_alpha: Tensor) -> Tensor:
    """Approximate ``KL(N(theta, alpha theta^2) || log-uniform)`` per weight, up to a
    constant (paper Eq. 14; docs/baselines/svd.md)::

        -KL ~= k1 sigmoid(k2 + k3 log alpha) - 0.5 log1p(exp(-log alpha)) - k1

    computed, as the positive KL to minimise, in the equal form without
    cancellation ``k1 sigmoid(-(k2 + k3 log alpha)) + 0.5 softplus(-log alpha)``;
    it tends to 0 as alpha grows (the prior favours pruned weights). Not clipped:
    pass :func:`log_alpha`'s clipped value.
    """
    return KL_K1 * torch.sigmoid(-(KL_K2 + KL_K3 * log_alpha)) + 0.5 * F.softplus(-log_alpha)


def local_reparameterization(
    op: Op, x: Tensor, weight: Tensor, weight_var: Tensor, bias: Tensor | None
) -> Tensor:
    """One draw of ``op(x, w, bias)`` for independent ``w ~ N(weight, weight_var)``,
    sampled per example and pre-activation (paper Sec. 3.2)::

        mean = op(x, weight, bias),  var = op(x^2, weight_var, None)
        out  = mean + sqrt(var + 1e-8) * eps,  eps ~ N(0, 1)

    ``op`` is linear in the weight (``F.linear``, ``F.conv2d`` with the layer's
    settings), so each pre-activation is exactly Gaussian with this mean and
    variance; the 1e-8 keeps the gradient of the square root finite at zero input.
    """
    mean = op(x, weight, bias)
    std = torch.sqrt(op(x.square(), weight_var, None) + VARIANCE_EPS)
    noise = example_noise(lambda s: torch.randn(s, dtype=mean.dtype, device=mean.device),
                          tuple(mean.shape))  # fmt: skip
    return mean + std * noise


def alive_units(keep: Tensor, unit_dim: int) -> Tensor:
    """Boolean (K,): the units along ``unit_dim`` of the weight mask ``keep`` that keep
    at least one weight (column k of a dense weight (out, in) for ``unit_dim=1``,
    filter k of a convolution (out, in, kh, kw) for ``unit_dim=0``)."""
    return keep.transpose(0, unit_dim).flatten(1).any(dim=1)


@dataclass(frozen=True, kw_only=True)
class SparseVDSettings(GateSettings):
    """SVD's settings (docs/baselines/svd.md): the pruning ``threshold`` on log alpha,
    the initial ``init_log_sigma2`` of every weight, and ``train_clip`` (in training,
    the units above the threshold are zero too, as in the authors' code)."""

    threshold: float = 3.0
    init_log_sigma2: float = -10.0
    train_clip: bool = True

    def check(self) -> None:
        super().check()
        validate.in_range(
            "threshold (a log alpha)", self.threshold, -LOG_ALPHA_BOUND, LOG_ALPHA_BOUND,
            (False, True),
        )  # fmt: skip
        validate.in_range("init_log_sigma2", self.init_log_sigma2)


@register_gate("svd")
class SparseVDGate(Gate):
    """Sparse variational dropout on the layer it is bound to (:meth:`bind`).

    Learns ``log sigma^2`` for every weight of the layer (a parameter of the weight's
    shape, created by :meth:`bind`). Training draws the pre-activations with the
    local reparameterisation trick (:func:`local_reparameterization`), per example
    and pre-activation; evaluation is deterministic, with the weights whose
    ``log alpha >= threshold`` set to zero; :meth:`mc_sampling` keeps the noise.
    The regulariser is the approximate KL (:func:`sparse_vd_kl`) summed over the
    layer's weights. ``gate_values`` is 1 for a unit that keeps a weight and 0 for
    a gone unit; a gone unit's output (a convolution's bias included) is zero.

    Defaults are SVDcode's (ars-ashuha/variational-dropout-sparsifies-dnn @ 3d9b78a):

    Args:
        num_units: K, the units of the layer the gate is put on.
        threshold: prune a weight when its ``log alpha >= threshold``: 3
            (``nets/layers.py:78-80``, ``T.ge``); accepted in (-8, 8], the clip of
            ``log alpha``.
        init_log_sigma2: initial ``log sigma^2`` of every weight: -10
            (``nets/layers.py:65,68``; ``experiments/lenet/lenet5-ard.py:43``).
        train_clip: use the pruned weights in training too (``train_clip=True`` in
            ``experiments/lenet/lenet300-100-ard.py:34`` and ``lenet5-ard.py:47``;
            ``nets/layers.py:86-87``).
        kl_scale: weight of the KL in :func:`bbdrop.total_kl` (1: the reference
            minimises ``N * mean CE + KL``, ``nets/objectives.py:22-25``).
    """

    needs_bound_layer = True  # log sigma^2 per weight of the bound layer

    Settings = SparseVDSettings

    def __init__(
        self,
        num_units: int,
        threshold: float = 3.0,
        init_log_sigma2: float = -10.0,
        train_clip: bool = True,
        kl_scale: float = 1.0,
    ) -> None:
        super().__init__(num_units, kl_scale)
        SparseVDSettings(threshold=threshold, init_log_sigma2=init_log_sigma2,
                         train_clip=train_clip, kl_scale=kl_scale)  # fmt: skip
        self.threshold = float(threshold)
        self.init_log_sigma2 = float(init_log_sigma2)
        self.train_clip = train_clip
        self.log_sigma2: nn.Parameter | None
        self.register_parameter("log_sigma2", None)  # created by bind

    # -- set-up -------------------------------------------------------------------
    def bind(self, layer: nn.Module, side: str) -> None:
        """Create ``log_sigma2`` with ``layer.weight``'s shape, device and dtype.

        Accepts ``nn.Linear`` and ``nn.Conv1d/2d/3d`` (zero padding; on the input side
        without groups). Binding again to a layer of the same shape keeps what was
        learned.
        """
        if type(layer) not in _LAYERS:
            raise TypeError(
                f"SparseVDGate goes on nn.Linear or nn.Conv1d/2d/3d, got {type(layer).__name__}"
            )
        if side not in ("input", "output"):
            raise ValueError(f"side must be 'input' or 'output', got {side!r}")
        if not isinstance(layer, nn.Linear) and layer.padding_mode != "zeros":
            raise ValueError(
                f"SparseVDGate supports padding_mode='zeros' only, got {layer.padding_mode!r}"
            )
        if not isinstance(layer, nn.Linear) and side == "input" and layer.groups != 1:
            raise ValueError(
                f"SparseVDGate on a convolution's input needs groups=1, got {layer.groups}"
            )
        weight = layer.weight
        units = weight.shape[1 if side == "input" else 0]
        if units != self.num_units:
            raise ValueError(
                f"SparseVDGate has {self.num_units} units but the layer has {units} on its "
                f"{side} side (weight {tuple(weight.shape)})"
            )
        if self.log_sigma2 is not None and self.log_sigma2.shape != weight.shape:
            raise ValueError(
                f"this SparseVDGate is bound to a weight of shape {tuple(self.log_sigma2.shape)}"
                f"; it cannot take one of shape {tuple(weight.shape)}"
            )
        if self.log_sigma2 is None:
            self.log_sigma2 = nn.Parameter(torch.full_like(weight.detach(), self.init_log_sigma2))
        super().bind(layer, side)

    def _log_alpha(self, layer: nn.Module) -> Tensor:
        """Clipped log alpha of ``layer``'s weights (the bound layer's shape)."""
        self.bound_layer()
        if layer.weight.shape != self.log_sigma2.shape:
            raise ValueError(
                f"this SparseVDGate holds log sigma^2 of shape {tuple(self.log_sigma2.shape)}, "
                f"not of the weight {tuple(layer.weight.shape)} it was given"
            )
        return log_alpha(layer.weight, self.log_sigma2)

    def alive(self) -> Tensor:
        """Boolean (K,): the units that keep at least one weight (``prune_`` ignored)."""
        with torch.no_grad():
            keep = self._log_alpha(self.bound_layer()) < self.threshold
        return alive_units(keep, 1 if self.bound_side() == "input" else 0)

    # -- the protocol -------------------------------------------------------------
    def kl(self) -> Tensor:
        """Sum over the bound layer's weights of the approximate KL."""
        return self.regularizer(self.bound_layer())

    def regularizer(self, layer: nn.Module) -> Tensor:
        return sparse_vd_kl(self._log_alpha(layer)).sum()

    def gate_values(self) -> Tensor:
        layer = self.bound_layer()
        return (self.alive() & self.static_keep).to(layer.weight.dtype)

    def keep_scores(self) -> Tensor:
        """Minus the smallest log alpha of each unit's weights: the rule keeps a unit
        while one of its weights has ``log alpha < threshold``."""
        with torch.no_grad():
            log_alpha = self._log_alpha(self.bound_layer())
            unit_dim = 1 if self.bound_side() == "input" else 0
            return -log_alpha.transpose(0, unit_dim).flatten(1).amin(dim=1)

    @torch.no_grad()
    def fold(self, layer: nn.Module, side: str) -> tuple[Tensor, Tensor | None]:
        """The pruned weights (``log alpha >= threshold`` set to zero) with the unit
        values folded in (:meth:`Gate.fold`): what evaluation computes."""
        keep = self._log_alpha(layer) < self.threshold
        weight, bias = super().fold(layer, side)
        return weight * keep, bias

    def mask(self, x: Tensor) -> Tensor:
        """:meth:`gate_values`, (K,), in every mode: the per-weight training noise lives
        in :meth:`layer_forward`."""
        return self.gate_values()

    def layer_forward(self, layer: nn.Module, x: Tensor, side: str) -> Tensor:
        op = _layer_op(layer)
        w = layer.weight
        la = self._log_alpha(layer)
        keep = la < self.threshold
        clipped = torch.where(keep, w, torch.zeros((), dtype=w.dtype, device=w.device))
        if self.training:
            self._check(x, side)
            if not self.train_clip:
                return local_reparameterization(op, x, w, la.exp() * w.square(), layer.bias)
            y = local_reparameterization(op, x, clipped, la.exp() * clipped.square(), layer.bias)
            if side == "output":  # a gone unit is gone, its bias too (as at test time)
                y = self.scale_on_layer(y, alive_units(keep, 0).to(y.dtype))
            return y
        if side == "input":
            x = self.on_layer(x)  # removes gone and pruned-for-good units
        else:
            self._check(x, side)
        if self.mc_sampling:
            y = local_reparameterization(op, x, clipped, la.exp() * clipped.square(), layer.bias)
        else:
            y = op(x, clipped, layer.bias)
        return y if side == "input" else self.on_layer(y)

    def _check(self, x: Tensor, side: str) -> None:
        """The input checks of :meth:`check_input` (``x`` in the layer's layout); on the
        output side, where the units are the layer's outputs, only its dtype and rank."""
        if side == "input":
            self.check_input(self.canonical(x))
        else:
            self.check_tensor(x)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, threshold={self.threshold}, "
            f"init_log_sigma2={self.init_log_sigma2}, train_clip={self.train_clip}"
        )


def _layer_op(layer: nn.Module) -> Op:
    """``(x, weight, bias) -> pre-activations`` with ``layer``'s own settings."""
    if isinstance(layer, nn.Linear):
        return F.linear
    return layer._conv_forward  # its stride, padding, dilation and groups
