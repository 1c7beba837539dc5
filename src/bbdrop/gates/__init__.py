"""Gates: the sparsification methods, all behind one protocol (:class:`Gate`): BB and DBB
(the paper's), and the baselines SVD, SSL, SBP, L0 and VIB (docs/baselines.md)."""

from bbdrop.gates.base import (
    Gate,
    TestTimeMask,
    create_gate,
    get_gate_class,
    list_gates,
    register_gate,
    registered_gate,
    settings_type,
)
from bbdrop.gates.bb import BetaBernoulliGate
from bbdrop.gates.dbb import DependentBetaBernoulliGate
from bbdrop.gates.l0 import HardConcreteGate
from bbdrop.gates.sbp import StructuredBayesianPruningGate
from bbdrop.gates.settings import GateSettings
from bbdrop.gates.ssl import SSLGate
from bbdrop.gates.svd import SparseVDGate
from bbdrop.gates.vib import InformationBottleneckGate

__all__ = [
    "BetaBernoulliGate",
    "DependentBetaBernoulliGate",
    "Gate",
    "GateSettings",
    "HardConcreteGate",
    "InformationBottleneckGate",
    "SSLGate",
    "SparseVDGate",
    "StructuredBayesianPruningGate",
    "TestTimeMask",
    "create_gate",
    "get_gate_class",
    "list_gates",
    "register_gate",
    "registered_gate",
    "settings_type",
]
