"""Gates: the sparsification methods, all behind one protocol (:class:`Gate`)."""

from bbdrop.gates.base import Gate, create_gate, get_gate_class, list_gates, register_gate
from bbdrop.gates.bb import BetaBernoulliGate
from bbdrop.gates.dbb import DependentBetaBernoulliGate

__all__ = [
    "BetaBernoulliGate",
    "DependentBetaBernoulliGate",
    "Gate",
    "create_gate",
    "get_gate_class",
    "list_gates",
    "register_gate",
]
