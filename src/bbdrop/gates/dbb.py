"""Dependent beta-Bernoulli dropout (DBB): Lee et al., Sec. 4.2 (docs/method.md section 2)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bbdrop import validate
from bbdrop.distributed import batch_moments, sharded
from bbdrop.gates import functional as BF
from bbdrop.gates.base import Gate, register_gate
from bbdrop.gates.bb import BetaBernoulliGate, BetaBernoulliSettings
from bbdrop.gates.costs import dbb_conv2d_flops, dbb_linear_flops, dbb_memory
from bbdrop.gates.dbb_mask import DependentMask

__all__ = ["DependentBetaBernoulliGate"]

SHIFT_STD_RAW_MIN = -10.0


@dataclass(frozen=True, kw_only=True)
class DependentBetaBernoulliSettings(BetaBernoulliSettings):
    """DBB's settings beyond BB's (docs/method.md section 2): the prior's ``prior_std``
    on beta, the clamp ``phi_eps`` on phi, the initial ``init_shift``, ``init_scale``,
    ``init_shift_std``, the running statistics' ``momentum`` and ``norm_eps``, and
    ``freeze_bb``."""

    prior_std: float = math.sqrt(5.0)
    phi_eps: float = 1e-10
    init_shift: float = 1.0
    init_scale: float = 1.0
    init_shift_std: float = 1.0
    momentum: float = 0.1
    norm_eps: float = 1e-5
    freeze_bb: bool = False

    def check(self) -> None:
        super().check()
        validate.positive("prior_std", self.prior_std)
        validate.probability("phi_eps", self.phi_eps)
        validate.positive("init_shift_std", self.init_shift_std)
        validate.probability("momentum", self.momentum)
        validate.positive("norm_eps", self.norm_eps)


@register_gate("dbb")
class DependentBetaBernoulliGate(BetaBernoulliGate):
    """Input-dependent beta-Bernoulli dropout.

    ``z_nk ~ Bernoulli(pi_k * phi_nk)`` with
    ``phi_nk = clamp(gamma_k (h_nk - mu_k) / sigma_k + beta_k, eps, 1 - eps)``,
    where ``h`` is the gate's input (globally average-pooled for (N, K, H, W)),
    detached from the graph as in the authors' code, and ``mu``, ``sigma`` are
    batch statistics in training and running statistics in evaluation.
    ``q(beta_k) = N(beta_hat_k, s_k^2)`` against the prior ``N(0, rho^2)``;
    ``gamma`` is a point estimate. Like ``pi``, ``beta`` is a per-unit latent:
    one draw per training step serves the whole batch. The BB part (``a``, ``b``) is inherited and
    can be frozen for the paper's two-stage scheme (:meth:`from_gate`).

    In evaluation the mask is ``E_q[pi] 1[E_q[pi] >= t] phi``, set to zero where
    it is ``<= t`` (run-time pruning); :meth:`active_units` reports the running
    average of units kept per example since :meth:`reset_active_units`.

    Args beyond :class:`BetaBernoulliGate`'s:
        prior_std: rho (sqrt(5) in the authors' code).
        phi_eps: the clamp on phi (1e-10).
        init_shift, init_scale, init_shift_std: initial beta_hat, gamma and s.
        momentum, norm_eps: running-statistics momentum and variance epsilon,
            as in ``nn.BatchNorm1d``.
        freeze_bb: start with ``a``, ``b`` frozen (no gradient).
    """

    input_dependent = True

    Settings = DependentBetaBernoulliSettings

    def __init__(
        self,
        num_units: int,
        alpha: float = 1e-4,
        temperature: float = 0.1,
        threshold: float = 1e-3,
        kl_scale: float = 1.0,
        init_a: float = math.log1p(math.exp(-1.0)),
        init_b: float = 1.0,
        prior_std: float = math.sqrt(5.0),
        phi_eps: float = 1e-10,
        init_shift: float = 1.0,
        init_scale: float = 1.0,
        init_shift_std: float = 1.0,
        momentum: float = 0.1,
        norm_eps: float = 1e-5,
        freeze_bb: bool = False,
    ) -> None:
        super().__init__(num_units, alpha, temperature, threshold, kl_scale, init_a, init_b)
        DependentBetaBernoulliSettings(
            prior_std=prior_std, phi_eps=phi_eps, init_shift=init_shift, init_scale=init_scale,
            init_shift_std=init_shift_std, momentum=momentum, norm_eps=norm_eps,
            freeze_bb=freeze_bb,
        )  # fmt: skip
        self.prior_std = float(prior_std)
        self.phi_eps = float(phi_eps)
        self.momentum = float(momentum)
        self.norm_eps = float(norm_eps)
        self.scale = nn.Parameter(torch.full((num_units,), float(init_scale)))
        self.shift = nn.Parameter(torch.full((num_units,), float(init_shift)))
        self.shift_std_raw = nn.Parameter(
            torch.full((num_units,), BF.softplus_inverse(init_shift_std))
        )
        self.register_buffer("running_mean", torch.zeros(num_units))
        self.register_buffer("running_var", torch.ones(num_units))
        # Run-time pruning statistics, not part of the learned state; integer
        # counters, so that ``.to(dtype)`` leaves them exact.
        self.register_buffer("active_total", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("examples_seen", torch.zeros((), dtype=torch.long), persistent=False)
        self.freeze_bb(freeze_bb)

    @classmethod
    def from_gate(
        cls, gate: Gate, freeze_bb: bool = True, **kwargs: Any
    ) -> DependentBetaBernoulliGate:
        """A DBB gate that starts from a trained BB gate's posterior (two-stage scheme).

        Copies ``a``, ``b``, the units removed for good and the BB settings
        (alpha, temperature, threshold). The KL scale is not copied: the DBB
        stage's is its own setting (default 1, as in the authors' DBB stage).
        ``kwargs`` set the DBB-only settings and ``kl_scale``.
        """
        if isinstance(gate, DependentBetaBernoulliGate):
            raise ValueError(
                "the gate is a DBB gate already; converting it again would re-initialise "
                "its learned scale and shift (convert a BB gate once)"
            )
        if not isinstance(gate, BetaBernoulliGate):
            raise TypeError(
                f"DBB starts from a BetaBernoulliGate, got {type(gate).__name__}; "
                "train the BB stage first"
            )
        settings = {
            "alpha": gate.alpha,
            "temperature": gate.temperature,
            "threshold": gate.threshold,
        }
        settings.update(kwargs)
        new = cls(gate.num_units, **settings)
        new = new.to(device=gate.a_raw.device, dtype=gate.a_raw.dtype)
        with torch.no_grad():
            new.a_raw.copy_(gate.a_raw)
            new.b_raw.copy_(gate.b_raw)
            new.static_keep.copy_(gate.static_keep)
        new.freeze_bb(freeze_bb)
        return new.train(gate.training)

    def freeze_bb(self, frozen: bool = True) -> None:
        """Stop (or restart) training of the BB posterior ``a``, ``b``.

        Clears their gradients too, so an optimiser holding them leaves them
        exactly as they are.
        """
        self.bb_frozen = bool(frozen)
        for p in (self.a_raw, self.b_raw):
            p.requires_grad_(not frozen)
            if frozen:
                p.grad = None

    @property
    def shift_std(self) -> Tensor:
        # Clamped like a_raw, so that s never underflows to 0 (log(rho / s) in the KL).
        return F.softplus(self.shift_std_raw.clamp(min=SHIFT_STD_RAW_MIN))

    # -- the protocol -------------------------------------------------------------
    def kl(self) -> Tensor:
        """BB's KL plus sum over units of KL(q(beta_k) || p(beta_k)) (docs/method.md section 2)."""
        shift_kl = BF.gaussian_kl(self.shift, self.shift_std, self.prior_std)
        return super().kl() + shift_kl.sum()

    def runtime_cost(
        self, num_units: float, spatial: tuple[int, int] | None
    ) -> tuple[float, float]:
        if spatial is None:
            return dbb_linear_flops(num_units), dbb_memory(num_units)
        return dbb_conv2d_flops(num_units, spatial), dbb_memory(num_units)

    def phi(self, x: Tensor, sample_shift: bool = False) -> Tensor:
        """The input-dependent keep probability phi, shape (N, K).

        Uses batch statistics (and updates the running ones) in training mode,
        running statistics otherwise; ``sample_shift`` draws beta from q(beta).
        """
        return self.phi_pre(x, sample_shift).clamp(self.phi_eps, 1.0 - self.phi_eps)

    def logit_phi(self, x: Tensor, sample_shift: bool = False) -> Tensor:
        """``logit(phi)`` in one step: the clamp to [eps, 1 - eps] and the logit's
        own clamp at the dtype's resolution (:func:`safe_logit`) are one clamp
        at the larger of the two, with zero gradient outside it."""
        eps = max(self.phi_eps, torch.finfo(x.dtype).eps)
        return torch.logit(self.phi_pre(x, sample_shift), eps=eps)

    def phi_pre(self, x: Tensor, sample_shift: bool = False) -> Tensor:
        """``gamma (h - mu) / sigma + beta`` before the clamp, shape (N, K)."""
        h = x.detach()
        if h.dim() > 2:  # (N, K, ...) -> (N, K): the average over positions (or tokens)
            h = h.mean(dim=tuple(range(2, h.dim())))
        if self.training and sharded():  # a rank's shard: the global batch's moments
            mean, var, n = batch_moments(h)
            centred = h - mean
            self._update_running_stats(mean, var, n)
        elif self.training:
            # Two-pass variance by hand: torch.var_mean over dim 0 is 8x slower here.
            mean = h.mean(dim=0)
            centred = h - mean
            var = centred.square().mean(dim=0)
            self._update_running_stats(mean, var, h.shape[0])
        else:
            centred, var = h - self.running_mean, self.running_var
        shift = self._shift(sample_shift)
        return torch.addcmul(shift, centred, torch.rsqrt(var + self.norm_eps) * self.scale)

    def _shift(self, sample: bool) -> Tensor:
        """beta_hat, or with ``sample`` one draw of beta from q(beta): one per step,
        shared by the batch like pi."""
        if not sample:
            return self.shift
        return self.shift + self.shift_std * torch.randn_like(self.shift)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, n: int) -> None:
        """Move the running statistics towards the batch's, unit by unit where the
        batch's are finite: a batch holding NaN or inf leaves them as they were
        (without a host sync; the loss of that batch is not finite, and the
        trainer stops the stage on it)."""
        ok = torch.isfinite(mean) & torch.isfinite(var)
        updated = self.running_mean.lerp(mean, self.momentum)
        self.running_mean.copy_(torch.where(ok, updated, self.running_mean))
        if n > 1:  # one example carries no information on the variance
            updated = self.running_var.lerp(var * (n / (n - 1)), self.momentum)
            self.running_var.copy_(torch.where(ok, updated, self.running_var))

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            self.check_input(x)
            m = self.mask(x)  # (N, K)
            self.note_mask(m, x.shape[0])
            return self.apply_mask(x, m)
        # x * mask(x), with the same draws in the same order as mask(x)
        self.check_input(x)
        logit_pi = self.sample_logit_pi()
        logit_phi = self.logit_phi(x, sample_shift=True)
        return BF.relaxed_bernoulli_mul2(x, logit_pi, logit_phi, self.temperature)

    def note_mask(self, m: Tensor, n: int) -> None:
        if not self.training and not self.mc_sampling:  # run-time pruning statistics
            self.active_total += (m != 0).sum()
            self.examples_seen += n

    def mask(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        if self.training:  # product of relaxed Bernoulli(pi) and Bernoulli(phi) masks
            logit_pi = self.sample_logit_pi()
            logit_phi = self.logit_phi(x, sample_shift=True)
            z_pi = BF.relaxed_bernoulli_rsample(logit_pi, self.temperature, (n,))
            return z_pi * BF.relaxed_bernoulli_rsample(logit_phi, self.temperature)
        if self.mc_sampling:  # units removed by the threshold or prune_ stay removed
            phi = self.phi(x, sample_shift=True)
            z_pi = torch.bernoulli(self.sample_pi().expand(n, -1)) * self.keep_mask()
            return z_pi * torch.bernoulli(phi)
        z = self.gate_values() * self.phi(x)  # (N, K)
        return F.threshold(z, self.threshold, 0.0)  # z where z > threshold, else 0

    def to_module(self, units: list[int]) -> DependentMask:
        """The evaluation mask on units ``units`` (:class:`DependentMask`), for the
        compacted network."""
        return DependentMask.from_gate(self, units)

    def untrained_reason(self) -> str | None:
        """A sentence's end while the running mean and variance are still their initial
        0 and 1 (the DBB stage has not run), None after."""
        if bool(self.running_mean.ne(0).any() or self.running_var.ne(1).any()):
            return None
        return (
            "has no running statistics (its mean and variance are still 0 and 1): train "
            "the DBB stage before compacting"
        )

    def active_units(self) -> float:
        """Average number of units kept per example in evaluation since the last reset."""
        seen = float(self.examples_seen)
        if seen == 0:
            raise ValueError(
                "no evaluation batch has gone through this gate since reset_active_units(); "
                "run the model in eval mode on some data first"
            )
        return float(self.active_total) / seen

    def reset_active_units(self) -> None:
        self.active_total.zero_()
        self.examples_seen.zero_()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, prior_std={self.prior_std:.4g}, bb_frozen={self.bb_frozen}"
