"""The check of a compacted network against the gated one on the example batch: an
error where a removal that should be exact is not, a :class:`CompactWarning` where
removal is inexact by nature (a constant channel into a padded convolution)."""

from __future__ import annotations

import warnings

from torch import Tensor, nn

from bbdrop.attach import side_effect_free
from bbdrop.compaction.modules import CompactWarning

# The output difference to the gated network (relative to the output's magnitude, if
# above 1) beyond which compact() warns where removal is inexact by nature; where every
# removal is exact, 100 times it is a bbdrop bug (float32 rounding is ~1e-7).
TOLERANCE = 1e-5


def verify(
    net: nn.Module,
    example: Tensor,
    reference: Tensor,
    corrections: dict[nn.Module, Tensor],
    names: dict[nn.Module, str],
) -> None:
    """RuntimeError if ``net``, its padded convolutions' borders put right
    (``corrections``), differs from ``reference`` on ``example`` by more than rounding;
    :class:`CompactWarning` if ``net`` as it is differs by more than :data:`TOLERANCE`.
    Called by :func:`~bbdrop.compaction.compact` only (the warning's stack level)."""
    tol = TOLERANCE * max(1.0, float(reference.abs().max()))
    exact, diff = _differences(net, example, reference, corrections)
    if exact > 100 * tol:
        raise RuntimeError(
            f"the compacted network differs from the gated one by {exact:.3g}: a removal was "
            "not exact (is there an operation that mixes channels, such as a softmax or a "
            "normalisation over them, on the path of a gated unit?). Please report it to "
            "bbdrop with the model"
        )
    if diff > tol:
        layers = ", ".join(sorted(names[m] for m in corrections))
        warnings.warn(
            f"the compacted network differs from the gated one by up to {diff:.3g} on the "
            f"example batch: constant channels (a gate before batch norm) feed the padded "
            f"convolution(s) {layers}, whose borders see zeros instead",
            CompactWarning,
            stacklevel=4,  # the caller of compact(), past compact and torch.no_grad's wrapper
        )


def _differences(
    net: nn.Module, example: Tensor, reference: Tensor, corrections: dict[nn.Module, Tensor]
) -> tuple[float, float]:
    """The largest difference of ``net``'s output on ``example`` to ``reference``, with
    the padded convolutions' borders put right, and as it is."""
    # Every removal, the padded convolutions' borders put right: must be exact. The
    # correction goes on the convolution's own output, before a mask on it (beside.py).
    hooks = [m.register_forward_hook(lambda _m, _a, out, c=c: out + c.to(out.dtype),
                                     prepend=True) for m, c in corrections.items()]  # fmt: skip
    try:
        with side_effect_free(net):
            exact = float((net(example) - reference).abs().max())
    finally:
        for h in hooks:
            h.remove()
    diff = exact
    if corrections:  # the network as it is, without the borders put right
        with side_effect_free(net):
            diff = float((net(example) - reference).abs().max())
    return exact, diff
