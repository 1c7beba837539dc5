"""bbdrop: Bayesian structured sparsification with (dependent) beta-Bernoulli dropout.

Lee et al., "Adaptive Network Sparsification via Dependent Variational
Beta-Bernoulli Dropout" (arXiv 1805.10896).

    >>> import torch, bbdrop
    >>> net = torch.nn.Sequential(torch.nn.Linear(784, 500), torch.nn.ReLU(),
    ...                           torch.nn.Linear(500, 10))
    >>> net = bbdrop.attach_gates_(net, "bb")
    >>> loss_reg = bbdrop.total_kl(net) / 60000   # add to the data term
    >>> sorted(bbdrop.units_kept(net).items())
    [('0', 784), ('2', 500)]
"""

from bbdrop import distributions as distributions  # registers KL(Kumaraswamy || Beta)
from bbdrop.attach import (
    active_units,
    attach_gates_,
    collect_masks,
    convert_gates_,
    gate_layer_,
    gated_layers,
    is_gated,
    mc_predict,
    mc_sampling,
    prune_units_,
    reset_active_units,
    total_kl,
    units_ever_active,
    units_kept,
)
from bbdrop.budget import Budget
from bbdrop.compaction import compact
from bbdrop.data import list_datasets, load_dataset
from bbdrop.export import export_onnx, load_compact, save_compact
from bbdrop.gates import (
    BetaBernoulliGate,
    DependentBetaBernoulliGate,
    Gate,
    create_gate,
    get_gate_class,
    list_gates,
    register_gate,
)
from bbdrop.heads import AttentionHeads
from bbdrop.metrics import measure, network_costs, paper_costs
from bbdrop.models import create_model, list_models, register_model
from bbdrop.recipe import Report, Sparsified, param_groups, sparsify
from bbdrop.runtime import runtime_pruned

__version__ = "0.1.0"

__all__ = [
    "AttentionHeads",
    "BetaBernoulliGate",
    "Budget",
    "DependentBetaBernoulliGate",
    "Gate",
    "Report",
    "Sparsified",
    "__version__",
    "active_units",
    "attach_gates_",
    "collect_masks",
    "compact",
    "convert_gates_",
    "create_gate",
    "create_model",
    "export_onnx",
    "gate_layer_",
    "gated_layers",
    "get_gate_class",
    "is_gated",
    "list_datasets",
    "list_gates",
    "list_models",
    "load_compact",
    "load_dataset",
    "mc_predict",
    "mc_sampling",
    "measure",
    "network_costs",
    "paper_costs",
    "param_groups",
    "prune_units_",
    "register_gate",
    "register_model",
    "reset_active_units",
    "runtime_pruned",
    "save_compact",
    "sparsify",
    "total_kl",
    "units_ever_active",
    "units_kept",
]
