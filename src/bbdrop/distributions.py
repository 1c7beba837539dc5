"""Integration with ``torch.distributions``.

Importing bbdrop registers the closed-form KL between a Kumaraswamy posterior
and a Beta(c, 1) prior, so that::

    torch.distributions.kl_divergence(Kumaraswamy(a, b), Beta(c, 1))

returns :func:`bbdrop.gates.functional.kumaraswamy_beta_kl`.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Beta, Kumaraswamy, register_kl

from bbdrop.gates.functional import kumaraswamy_beta_kl

__all__ = ["kl_kumaraswamy_beta"]


@register_kl(Kumaraswamy, Beta)
def kl_kumaraswamy_beta(q: Kumaraswamy, p: Beta) -> Tensor:
    """KL(q || p) for ``p = Beta(c, 1)``; other Beta priors have no closed form."""
    if not bool(torch.all(p.concentration0 == 1)):
        raise NotImplementedError(
            "the closed-form KL(Kumaraswamy || Beta(c, d)) needs d == 1 (an infinite series "
            f"otherwise); got Beta concentration0={p.concentration0!r}"
        )
    return kumaraswamy_beta_kl(q.concentration1, q.concentration0, p.concentration1)
