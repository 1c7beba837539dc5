"""Physical pruning: from a gated network to a smaller plain one (docs/compact.md).

:func:`compact` turns a trained gated network into the network it stands for at
test time. Each gate's test-time values are folded into its layer's weights
(:meth:`bbdrop.Gate.fold`), and each unit that nothing downstream can see is
removed from the layer that produces it, the layers that consume it and the
batch norms in between. The coupling of channels (a flatten between a
convolution and a dense layer, residual additions, concatenations) comes from
Torch-Pruning's dependency graph (DepGraph, Fang et al., CVPR 2023): a
channel is removed together with everything that carries it, or not at all.

A channel is removed exactly when

* every layer that consumes it gives it zero weight (its gates there are zero), or
* every layer that produces it emits zero for it (its gates there are zero). The
  layers in between (batch norm, ReLU, pooling) may turn that zero into a
  constant; the constant's contribution is folded into each consumer's bias.
  That is exact for a dense consumer and for a convolution without padding; a
  padded convolution sees the constant only inside the image, not at the
  borders, so there the fold is inexact. :func:`compact` measures the output
  difference on ``example`` and warns (:class:`CompactWarning`) with it.

What cannot be removed as a whole channel, an input feature of a dense layer
whose gate is zero while the convolution channel it comes from stays (or a
pixel of the network's input), is dropped by gathering the kept features in
front of the layer (:class:`SelectFeatures`), which costs a copy of the kept
features and saves their share of the product.

An input-dependent gate (DBB): the units it prunes for every input (DBB's BB part,
and the pre-pruned ones) are removed as above; the input-dependent part stays, as
the gate's :meth:`~bbdrop.Gate.to_module` on the kept units (a
:class:`~bbdrop.gates.TestTimeMask`, a plain module with the gate's test-time
computation, nothing to sample; DBB's is :class:`DependentMask`, re-exported here).

The compacted network keeps the module tree of the network it was made from: a
layer keeps its type and its place, and its gather and mask run beside it as its
children ``select`` and ``mask``, applied by hooks, as gates are (:mod:`.attached`).

Layout: :mod:`.checks` (the input), :mod:`.folding` (gates into layers), :mod:`.stats`
and :mod:`.groups` (the group walk that removes units), :mod:`.gathers` (gathers and
test-time masks beside the kept layers), :mod:`.attached` (how they are attached),
:mod:`.verify` (the check against the gated network), :mod:`.modules` (the modules a
compacted network adds), :mod:`.api` (:func:`compact`, in those steps).
"""

from bbdrop.compaction.api import compact, inference_parameters, without_gates
from bbdrop.compaction.attached import Beside, attach_beside_, beside, detach_beside_
from bbdrop.compaction.modules import CompactWarning, SelectFeatures
from bbdrop.compaction.submodule import set_submodule as set_submodule
from bbdrop.compaction.verify import TOLERANCE as TOLERANCE
from bbdrop.gates.dbb_mask import DependentMask

__all__ = [
    "Beside",
    "CompactWarning",
    "DependentMask",
    "SelectFeatures",
    "attach_beside_",
    "beside",
    "compact",
    "detach_beside_",
    "inference_parameters",
    "without_gates",
]
