"""bbdrop.safety: the error a network's own and right after attaching gates, the warning
when attaching raised it, and start settings that keep a trained network intact."""

from __future__ import annotations

import copy

import pytest
import torch
from networks import ResNet
from torch import nn

import bbdrop
from bbdrop.gates import settings_type
from bbdrop.safety import (
    PRETRAINED_SETTINGS,
    TOLERANCE,
    check_attach,
    eval_error,
    pretrained_settings,
)

METHODS = ("bb", "dbb", "svd", "ssl", "sbp", "l0", "vib")


# -- check_attach ----------------------------------------------------------------------
def test_no_warning_within_the_tolerance() -> None:
    assert TOLERANCE == 0.5
    assert check_attach(3.9, 3.9, "bb") is None
    assert check_attach(3.9, 2.0, "bb") is None  # better is fine
    assert check_attach(3.9, 4.4, "bb") is None  # exactly 0.5 points (4.4 - 3.9 > 0.5 in floats)
    assert check_attach(10.0, 10.5, "l0") is None
    assert check_attach(0.0, 0.5, "vib") is None


def test_warning_above_the_tolerance_names_both_errors_and_the_setting() -> None:
    text = check_attach(3.9, 83.6, "bb")
    assert text == (
        "attaching 'bb' gates raised the eval error on the check batch from 3.90% to 83.60%; "
        f"start them near 1 with init_b={PRETRAINED_SETTINGS['bb']['init_b']!r} "
        "(bbdrop.safety.PRETRAINED_SETTINGS['bb'])"
    )
    just_over = check_attach(10.0, 10.55, "l0")
    assert just_over is not None and "10.00% to 10.55%" in just_over
    assert "droprate_init=" in just_over
    assert check_attach(10.0, 10.75, "l0", tolerance=1.0) is None
    assert check_attach(10.0, 10.75, "l0", tolerance=0.0) is not None


@pytest.mark.parametrize("method", [m for m in METHODS if PRETRAINED_SETTINGS[m]])
def test_every_method_is_told_its_settings(method: str) -> None:
    text = check_attach(5.0, 20.0, method)
    assert text is not None and "5.00% to 20.00%" in text
    for name, value in PRETRAINED_SETTINGS[method].items():
        assert f"{name}={value!r}" in text
    assert f"PRETRAINED_SETTINGS[{method!r}]" in text


def test_gates_already_started_near_one_are_told_which_way_to_turn() -> None:
    settings = PRETRAINED_SETTINGS["bb"]
    text = check_attach(3.9, 20.0, "bb", attached_with={"alpha": 1e-4, **settings})
    assert text is not None and "3.90% to 20.00%, even with init_b=" in text
    assert "a smaller init_b" in text
    # other settings than the pretrained ones (or the defaults): told those
    for given in ({"init_b": 0.5}, {}):
        other = check_attach(3.9, 20.0, "bb", attached_with=given)
        assert other is not None and "start them near 1 with init_b=" in other
    # SVD's pretrained start is its default start: attached with the defaults, it is told
    # which way to turn
    svd = check_attach(3.9, 20.0, "svd", attached_with={})
    assert svd is not None and "even with init_log_sigma2=-10.0" in svd
    assert "a lower init_log_sigma2" in svd


def test_ssl_and_unknown_methods() -> None:
    assert PRETRAINED_SETTINGS["ssl"] == {}
    ssl = check_attach(1.0, 9.0, "ssl")
    assert ssl is not None and "1.00% to 9.00%" in ssl and "no start setting" in ssl
    mine = check_attach(1.0, 9.0, "my-method")
    assert mine is not None and "1.00% to 9.00%" in mine and "init settings" in mine


@pytest.mark.parametrize(
    "args", [(float("nan"), 1.0), (1.0, float("inf")), (-1.0, 1.0), (1.0, 101.0), ("1", 2.0)]
)
def test_check_attach_refuses_what_is_not_an_error_in_percent(args: tuple) -> None:
    with pytest.raises(ValueError, match="error in percent"):
        check_attach(*args, "bb")
    with pytest.raises(ValueError, match="tolerance"):
        check_attach(1.0, 2.0, "bb", tolerance=-1)


# -- PRETRAINED_SETTINGS -----------------------------------------------------------------
def test_pretrained_settings_are_valid_constructor_settings() -> None:
    assert set(PRETRAINED_SETTINGS) == set(METHODS)
    for method, settings in PRETRAINED_SETTINGS.items():
        settings_type(method)(**settings)  # each is a setting of the method, in range
    # the BB gates that DBB is converted from start like BB's own
    assert PRETRAINED_SETTINGS["dbb"]["init_b"] == PRETRAINED_SETTINGS["bb"]["init_b"]
    assert pretrained_settings("bb", init_b=0.5, alpha=1e-3) == {"init_b": 0.5, "alpha": 1e-3}
    assert pretrained_settings("my-method", x=1.0) == {"x": 1.0}


def test_pretrained_settings_start_the_gates_near_one() -> None:
    """The test-time value each start gives every unit (the paper's defaults: 0.24 for BB,
    0.5 for L0)."""
    torch.manual_seed(0)
    values = {}
    for method in ("bb", "sbp", "l0", "vib"):
        gate = bbdrop.create_gate(method, 64, **PRETRAINED_SETTINGS[method])
        values[method] = gate.gate_values()
    assert values["bb"].min() > 0.99
    assert values["sbp"].min() > 0.99
    assert torch.equal(values["l0"], torch.ones(64))
    assert torch.equal(values["vib"], torch.ones(64))
    assert bbdrop.create_gate("bb", 4).gate_values().max() < 0.25
    assert bbdrop.create_gate("l0", 4).gate_values().max() < 0.51


# -- eval_error ----------------------------------------------------------------------------
def test_eval_error_against_a_hand_count() -> None:
    net = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.eye(2))  # predicts the larger coordinate
    x = torch.tensor([[1.0, 0], [0, 1], [2, 1], [1, 2], [3, 0], [0, 3], [5, 4], [4, 5]])
    y = torch.tensor([0, 1, 0, 0, 1, 1, 1, 1])  # wrong: 4th, 5th, 7th
    assert eval_error(net, x, y) == pytest.approx(100 * 3 / 8)
    assert eval_error(net, x, y, batch_size=3) == pytest.approx(100 * 3 / 8)
    assert eval_error(net, x[:2], y[:2]) == 0.0
    with pytest.raises(ValueError, match="same number"):
        eval_error(net, x, y[:3])
    with pytest.raises(ValueError, match="batch_size"):
        eval_error(net, x, y, batch_size=0)


def test_eval_error_leaves_modes_and_buffers_as_they_were() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    bbdrop.attach_gates_(net, "bb")
    bbdrop.convert_gates_(net, "dbb")
    net.train()
    x, y = torch.randn(20, 3), torch.randint(0, 2, (20,))
    net(x)  # training statistics that are not the initial ones
    buffers = {k: v.clone() for k, v in net.state_dict().items()}
    err = eval_error(net, x, y, batch_size=7)
    assert 0 <= err <= 100
    assert net.training and all(m.training for m in net.modules())
    for k, v in net.state_dict().items():
        assert torch.equal(v, buffers[k]), k
    for _, g in bbdrop.gated_layers(net):
        assert int(g.gate.examples_seen) == 0  # DBB's count of evaluated examples
    with torch.no_grad():
        net.eval()
        assert eval_error(net, x, y) == pytest.approx(
            100 * float((net(x).argmax(1) != y).float().mean())
        )


# -- end to end: a trained ResNet, every method ---------------------------------------------
CLASSES = 4


def _task(n: int, g: torch.Generator, templates: torch.Tensor) -> tuple:
    """Noisy copies of one 1x8x8 template per class."""
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return templates[y] + 1.5 * torch.randn(n, 1, 8, 8, generator=g), y


@pytest.fixture(scope="module")
def trained() -> tuple:
    """A ResNet-18-style network (width 4) trained for 50 steps on a separable task."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small operations: one thread is fastest, and shares the cores
    g = torch.Generator().manual_seed(0)
    templates = torch.randn(CLASSES, 1, 8, 8, generator=g)
    x, y = _task(2000, g, templates)
    x_test, y_test = _task(1000, g, templates)
    torch.manual_seed(0)
    net = ResNet(width=4, classes=CLASSES, in_channels=1)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(50):
        i = torch.randint(0, len(y), (64,), generator=g)
        loss = nn.functional.cross_entropy(net(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    return net, x[:8], x_test, y_test


def _attached(net: nn.Module, method: str, example: torch.Tensor, pretrained: bool) -> nn.Module:
    net = copy.deepcopy(net)
    torch.manual_seed(0)
    # pretrained=True, the default for gates on coupled groups, is PRETRAINED_SETTINGS
    if method == "dbb":  # converted from BB, as in the two-stage scheme
        bbdrop.attach_gates_(net, "bb", example=example, pretrained=pretrained)
        return bbdrop.convert_gates_(net, "dbb", freeze_bb=True, pretrained=pretrained)
    return bbdrop.attach_gates_(net, method, example=example, pretrained=pretrained)


def test_pretrained_settings_keep_a_trained_network_intact(trained: tuple) -> None:
    net, example, x_test, y_test = trained
    dense = eval_error(net, x_test, y_test)
    assert dense < 15  # the network did learn the task
    after = {m: eval_error(_attached(net, m, example, True), x_test, y_test) for m in METHODS}
    assert all(after[m] - dense <= TOLERANCE for m in METHODS), (dense, after)
    assert all(check_attach(dense, after[m], m) is None for m in METHODS)


def test_the_authors_start_wrecks_a_trained_resnet(trained: tuple) -> None:
    """BB's E_q[pi] = 0.24 (and L0's 0.5) multiply every unit, and the batch norms behind
    them use running statistics: the scale compounds to near chance."""
    net, example, x_test, y_test = trained
    dense = eval_error(net, x_test, y_test)
    for method in ("bb", "l0"):
        after = eval_error(_attached(net, method, example, False), x_test, y_test)
        assert after > dense + 30, (method, dense, after)
        text = check_attach(dense, after, method)
        assert text is not None and f"{dense:.2f}% to {after:.2f}%" in text


def test_attach_warns_with_the_numbers_it_measured_and_is_quiet_when_safe(trained: tuple) -> None:
    """attach_gates_(..., check=(x, y)): the error before and right after attaching, on
    the held-out batch; a warning naming both and the setting to change when the gates
    added more than 0.5 points (the authors' start), none with the default for a
    network's coupled groups (pretrained settings)."""
    import warnings

    net, example, x_test, y_test = trained
    dense = eval_error(net, x_test, y_test)
    with pytest.warns(bbdrop.safety.AttachWarning, match=rf"from {dense:.2f}% to .*init_b=0\.005"):
        bbdrop.attach_gates_(copy.deepcopy(net), "bb", example=example, pretrained=False,
                             check=(x_test, y_test))  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        safe = bbdrop.attach_gates_(copy.deepcopy(net), "bb", example=example,
                                    check=(x_test, y_test))  # fmt: skip
    assert float(safe.bn1.gate.gate_values().min().detach()) > 0.95  # started near 1
    with pytest.raises(ValueError, match=r"check must be \(x, y\)"):
        bbdrop.attach_gates_(copy.deepcopy(net), "bb", example=example, check=x_test)
