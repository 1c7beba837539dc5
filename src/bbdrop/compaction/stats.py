"""What a layer sees on the example batch: the statistics of each input feature or
channel, from which :mod:`.groups` tells constant channels from the others."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# Layers whose channels compact() removes; between them, any layer without
# parameters that Torch-Pruning traces (activations, pooling, flatten, add, cat).
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class Stats:
    """A layer's input on the example batch, per input feature or channel (current
    coordinates): the mean and the spread (max - min) over examples and positions."""

    mean: Tensor
    spread: Tensor
    scale: Tensor
    size: tuple[int, ...]  # (H, W) of a 2-d convolution's input; () for a dense layer

    def drop(self, idxs: Iterable[int]) -> None:
        keep = torch.ones(self.mean.numel(), dtype=torch.bool)
        keep[list(idxs)] = False
        self.mean, self.spread, self.scale = self.mean[keep], self.spread[keep], self.scale[keep]


def input_stats(net: nn.Module, example: Tensor) -> tuple[dict[nn.Module, Stats], nn.Module | None]:
    """:class:`Stats` of the input of every Linear and convolution of ``net`` on ``example``,
    and the layer whose output the network returns (None if no layer's is)."""
    stats: dict[nn.Module, Stats] = {}

    def record(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        x = args[0].detach()
        if isinstance(module, nn.Linear):  # features: the last dimension
            x = x.reshape(-1, x.shape[-1])
        dims = [0, *range(2, x.dim())]  # all but the features / channels
        stats[module] = Stats(
            x.mean(dims).cpu(),
            (x.amax(dims) - x.amin(dims)).cpu(),
            x.abs().amax(dims).clamp_min(1.0).cpu(),
            tuple(x.shape[2:]),
        )

    outputs: dict[int, nn.Module] = {}

    def output(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
        outputs[id(out)] = module

    layers = [m for m in net.modules() if type(m) in LAYERS]
    hooks = [m.register_forward_pre_hook(record) for m in layers]
    hooks += [m.register_forward_hook(output) for m in layers]
    try:
        out = net(example)
    finally:
        for h in hooks:
            h.remove()
    return stats, outputs.get(id(out))
