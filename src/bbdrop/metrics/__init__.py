"""Costs of a network: the paper's FLOP/memory accounting (the paper's sequential
networks), the costs of any network counted on its graph (:func:`network_costs`), and
measured figures.

>>> import torch
>>> from bbdrop.metrics import paper_costs
>>> from bbdrop.models import create_model
>>> net = create_model("lenet_500_300")
>>> costs = paper_costs(net, torch.zeros(1, 784), units={"fc1": 264, "fc2": 140, "fc3": 65})
>>> costs.full_flops, round(costs.speedup, 2)
(1090800.0, 11.65)
"""

from bbdrop.metrics.formulas import (
    LayerCost,
    batch_norm_memory,
    conv2d_flops,
    conv2d_memory,
    dbb_conv2d_flops,
    dbb_linear_flops,
    dbb_memory,
    linear_flops,
    linear_memory,
    max_pool_flops,
)
from bbdrop.metrics.measured import (
    Measured,
    count_parameters,
    latencies,
    measure,
    measured_flops,
)
from bbdrop.metrics.network import GroupCost, NetworkCosts, network_costs
from bbdrop.metrics.paper import (
    PaperCosts,
    keep_masks,
    layer_costs,
    memory_fraction,
    paper_costs,
    paper_figures,
    paper_flops,
    paper_memory,
    speedup,
)
from bbdrop.metrics.trace import LayerRecord, trace_layers

__all__ = [
    "GroupCost",
    "LayerCost",
    "LayerRecord",
    "Measured",
    "NetworkCosts",
    "PaperCosts",
    "batch_norm_memory",
    "conv2d_flops",
    "conv2d_memory",
    "count_parameters",
    "dbb_conv2d_flops",
    "dbb_linear_flops",
    "dbb_memory",
    "keep_masks",
    "latencies",
    "layer_costs",
    "linear_flops",
    "linear_memory",
    "max_pool_flops",
    "measure",
    "measured_flops",
    "memory_fraction",
    "network_costs",
    "paper_costs",
    "paper_figures",
    "paper_flops",
    "paper_memory",
    "speedup",
    "trace_layers",
]
