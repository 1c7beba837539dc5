"""Structured sparsity learning (SSL): Wen et al., NIPS 2016 (docs/baselines/ssl.md).

A group lasso over the gated layer's weights, one group per unit, and a
deterministic 0/1 gate that removes the units whose group norm has fallen to
(almost) zero. The gate learns nothing of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bbdrop import validate
from bbdrop.gates.base import Gate, register_gate
from bbdrop.gates.settings import GateSettings

__all__ = [
    "REFERENCE_LAMBDA",
    "SSLGate",
    "group_lasso",
    "group_norms",
    "group_shrink_factor",
    "unit_groups",
]

# Group-lasso strength in mean-cross-entropy units: ``breadth_decay`` and
# ``kernel_shape_decay`` of SSLcode's examples/mnist/lenet_grouplasso_solver.prototxt
# (docs/baselines/ssl.md). bbdrop's objective weighs the regulariser by
# kl_scale / N, so the reference is kl_scale = REFERENCE_LAMBDA * N.
REFERENCE_LAMBDA = 0.005
MNIST_TRAIN = 60000  # N of MNIST and Fashion-MNIST, for the default kl_scale


def unit_groups(weight: Tensor, dim: int, bias: Tensor | None = None) -> Tensor:
    """The weight groups of the units along ``dim`` of ``weight``, one row per unit: (K, G).

    Row k is ``weight.select(dim, k)`` flattened, followed by ``bias[k]`` when a
    bias is given (only meaningful for units along the output dimension, 0).
    A dense layer's input unit k (``dim=1``) owns column ``W[:, k]``; a
    convolution's output channel k (``dim=0``) owns filter ``W[k]``.
    """
    groups = weight.movedim(dim, 0).reshape(weight.shape[dim], -1)  # (K, G)
    if bias is not None:
        groups = torch.cat([groups, bias.reshape(-1, 1)], dim=1)
    return groups


def group_norms(groups: Tensor) -> Tensor:
    """The Euclidean norm of each row of ``groups``: (K,).

    The gradient is ``g_k / ||g_k||`` (Wen et al.'s group-lasso gradient) and
    exactly 0 for an all-zero group, the subgradient SSLcode takes
    (``caffe_div_checkzero`` in ``GroupLassoRegularize``). Both branches of the
    ``where`` are finite, so no NaN leaks into the gradient.
    """
    sq = groups.square().sum(dim=1)  # (K,)
    nonzero = sq > 0
    safe = torch.where(nonzero, sq, torch.ones_like(sq))
    return torch.where(nonzero, safe.sqrt(), torch.zeros_like(sq))


def group_lasso(groups: Tensor) -> Tensor:
    """``sum_k ||g_k||_2``, unweighted by group size as in Wen et al.'s filter- and
    channel-wise penalty (docs/baselines/ssl.md)."""
    return group_norms(groups).sum()


def group_shrink_factor(norms: Tensor, threshold: float | Tensor) -> Tensor:
    """``max(0, 1 - t / ||g_k||)``: the proximal operator of ``t * ||g||_2`` (group
    soft-thresholding) maps ``g_k`` to ``g_k`` times this factor; 0 iff ``||g_k|| <= t``."""
    shrink = norms > threshold
    safe = torch.where(shrink, norms, torch.ones_like(norms))
    return torch.where(shrink, 1.0 - threshold / safe, torch.zeros_like(norms))


@dataclass(frozen=True, kw_only=True)
class SSLSettings(GateSettings):
    """SSL's settings (docs/baselines/ssl.md): the group-norm pruning ``threshold``,
    the penalty's weight ``kl_scale`` (lambda times the training set's size, as the
    reference sets it on MNIST), ``proximal`` (a proximal step after each optimiser
    step instead of the penalty's gradient) and ``include_bias`` in the groups."""

    kl_scale: float = REFERENCE_LAMBDA * MNIST_TRAIN
    threshold: float = 1e-5
    proximal: bool = False
    include_bias: bool = False

    def check(self) -> None:
        super().check()
        validate.probability("threshold", self.threshold)


@register_gate("ssl")
class SSLGate(Gate):
    """Structured sparsity learning over the ``num_units`` weight groups of the gated layer.

    Unit k's group is the weight slice it touches: on a layer's input (dense
    layers) column ``W[:, k]``; on its output (convolutions) filter ``W[k]``,
    plus ``bias[k]`` with ``include_bias``. The regulariser is the group lasso
    ``sum_k ||W_k||_2``; bbdrop adds ``kl_scale * regularizer / N``, so
    ``kl_scale = lambda * N``. Training multiplies every unit by 1; evaluation
    multiplies unit k by ``1[||W_k|| > threshold]``, so that the network's
    output is exactly that of the network with the pruned groups removed.

    Args:
        num_units: K, the units of the layer the gate is bound to.
        threshold: a unit is pruned when its group norm is ``<= threshold``
            (1e-5: SBPcode ``scripts/vgglike/vgglike-ssl.py:140-141``).
        kl_scale: ``lambda * N``; the default 300 is lambda = 0.005 (SSLcode
            ``examples/mnist/lenet_grouplasso_solver.prototxt``,
            ``breadth_decay`` = ``kernel_shape_decay``) at N = 60000.
        proximal: apply the penalty by group soft-thresholding after each
            optimiser step (:meth:`proximal_step`) instead of by its
            subgradient; the regulariser is then reported but not differentiated.
            Our option, not the reference's: a subgradient step never reaches an
            exact zero.
        include_bias: count ``bias[k]`` in the group of an output unit (SSLcode
            does not penalise biases; the default follows it). No effect on a
            dense layer's input units, which own no bias.
    """

    steps_after_optimiser = True  # the proximal step
    needs_bound_layer = True  # the values are the bound layer's group norms
    deterministic_training = True  # a penalty on the weights: no noise to draw

    Settings = SSLSettings

    def __init__(
        self,
        num_units: int,
        threshold: float = 1e-5,
        kl_scale: float = REFERENCE_LAMBDA * MNIST_TRAIN,
        proximal: bool = False,
        include_bias: bool = False,
    ) -> None:
        super().__init__(num_units, kl_scale)
        SSLSettings(threshold=threshold, kl_scale=kl_scale, proximal=proximal,
                    include_bias=include_bias)  # fmt: skip
        self.threshold = float(threshold)
        self.proximal = proximal
        self.include_bias = include_bias

    # -- the layer's groups -------------------------------------------------------
    def groups(self, layer: nn.Module | None = None) -> Tensor:
        """The (K, G) weight groups of ``layer`` (default: the bound layer), one per unit."""
        layer = self.bound_layer() if layer is None else layer
        side = self.bound_side()
        weight = getattr(layer, "weight", None)
        dim = 1 if side == "input" else 0
        if not isinstance(weight, Tensor) or weight.dim() < 2:
            raise ValueError(
                f"{type(self).__name__} needs a layer with a weight of rank >= 2 "
                f"(nn.Linear, nn.Conv2d), got {type(layer).__name__}"
            )
        if weight.shape[dim] != self.num_units:
            raise ValueError(
                f"{type(self).__name__} has {self.num_units} units but the layer's weight "
                f"{tuple(weight.shape)} has {weight.shape[dim]} along dimension {dim} ({side})"
            )
        bias = getattr(layer, "bias", None) if self.include_bias and dim == 0 else None
        return unit_groups(weight, dim, bias)

    def group_norms(self) -> Tensor:
        """``||W_k||_2`` of each unit's group in the bound layer, (K,)."""
        return group_norms(self.groups())

    # -- the protocol -------------------------------------------------------------
    def regularizer(self, layer: nn.Module) -> Tensor:
        """The group lasso ``sum_k ||W_k||_2`` of ``layer``'s unit groups (no gradient
        with ``proximal``: :meth:`proximal_step` applies it)."""
        penalty = group_lasso(self.groups(layer))
        return penalty.detach() if self.proximal else penalty

    def gate_values(self) -> Tensor:
        with torch.no_grad():
            norms = self.group_norms()
            keep = (norms > self.threshold) & self.static_keep
            return keep.to(norms.dtype)

    def keep_scores(self) -> Tensor:
        """The group norms: the rule keeps ``norm > threshold``."""
        with torch.no_grad():
            return self.group_norms()

    def mask(self, x: Tensor) -> Tensor:
        if self.training:  # the identity: SSL has no noise
            return torch.ones(self.num_units, dtype=x.dtype, device=x.device)
        return self.gate_values().to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.check_input(x)
            return x
        return super().forward(x)

    def after_step(self, lr: float, num_train: int) -> None:
        """The trainer's hook after each optimiser step: :meth:`proximal_step`."""
        self.proximal_step(lr, num_train)

    @torch.no_grad()
    def proximal_step(self, lr: float, num_train: int) -> None:
        """Group soft-thresholding of the bound layer's unit groups, to call after each
        optimiser step when ``proximal`` is set (a no-op otherwise):
        ``W_k <- W_k * max(0, 1 - lr * lambda / ||W_k||)`` with
        ``lambda = kl_scale / num_train``, the weight bbdrop's objective gives the
        regulariser. ``lr`` is the weights' current learning rate; under Adam this
        is the nominal rate, not Adam's per-coordinate step.
        """
        validate.positive("lr", lr)
        validate.whole("num_train", num_train, lo=1)
        if not self.proximal:
            return
        layer = self.bound_layer()
        factor = group_shrink_factor(self.group_norms(), lr * self.kl_scale / num_train)  # (K,)
        weight = layer.weight
        dim = 1 if self.bound_side() == "input" else 0
        shape = [1] * weight.dim()
        shape[dim] = self.num_units
        weight.mul_(factor.view(shape).to(weight.dtype))
        bias = getattr(layer, "bias", None)
        if self.include_bias and dim == 0 and bias is not None:
            bias.mul_(factor.to(bias.dtype))

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, threshold={self.threshold}, proximal={self.proximal}, "
            f"include_bias={self.include_bias}"
        )
