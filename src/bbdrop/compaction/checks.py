"""What :func:`~bbdrop.compaction.compact` checks of its input before it starts, and
the gated network's output it checks its result against."""

from __future__ import annotations

from torch import Tensor, nn

from bbdrop.attach import gated_layers, is_gated, mc_sampling, side_effect_free


def check_input(model: nn.Module, example: Tensor, round_to: int) -> None:
    """ValueError for what :func:`~bbdrop.compaction.compact` cannot compact: one gated
    layer, a network without gates, a bad ``round_to``, fewer than 2 examples, an
    untrained gate (:meth:`~bbdrop.Gate.untrained_reason`: DBB without running
    statistics), a gated layer that keeps no unit."""
    if is_gated(model):
        raise ValueError(
            "compact() takes a network with gated layers inside it, not one gated layer: "
            "wrap it, e.g. compact(nn.Sequential(layer), example)[0]"
        )
    gates = list(gated_layers(model))
    if not gates:
        raise ValueError(
            "the model has no bbdrop gates: attach them with bbdrop.attach_gates_(model, "
            "method) and train it before compacting"
        )
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be a whole number of units, 1 or more, got {round_to!r}")
    if example.dim() < 1 or len(example) < 2:
        raise ValueError(
            f"example must hold at least 2 inputs (got shape {tuple(example.shape)}): "
            "compact() tells constant channels from the others by comparing them"
        )
    _check_trained(gates)


def _check_trained(gates: list[tuple[str, nn.Module]]) -> None:
    """ValueError for a gate that says it is untrained (:meth:`Gate.untrained_reason`,
    after its method's name in capitals: "DBB gate 'fc1' has no running statistics ...")
    or a gated layer that keeps no unit."""
    for name, g in gates:
        reason = g.gate.untrained_reason()
        if reason is not None:
            method = type(g.gate).registry_name.upper() or type(g.gate).__name__
            raise ValueError(f"{method} gate {name!r} {reason}")
        whole = g.gate.group_root is not None or g.gate.heads is not None  # may go whole
        if g.gate.num_kept() == 0 and not whole:
            raise ValueError(
                f"gated layer {name!r} keeps no unit: the model is untrained or its training "
                "diverged (check the run's error), so there is no network to compact"
            )


def reference_output(model: nn.Module, example: Tensor) -> Tensor:
    """``model``'s output on ``example`` in evaluation (no Monte Carlo sampling), leaving
    ``model`` as it was; ValueError if it is not one tensor."""
    with side_effect_free(model) as m, mc_sampling(m, False):
        reference = m(example)
    if not isinstance(reference, Tensor):
        raise ValueError(
            f"compact() takes a network with one tensor as output, got {type(reference).__name__}"
        )
    return reference
