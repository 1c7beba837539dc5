"""Run configuration: TOML onto dataclasses, overrides, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from bbdrop.config import (
    ConfigError,
    GateConfig,
    OptimConfig,
    RunConfig,
    apply_overrides,
    from_dict,
    load_config,
    to_toml,
)


def test_defaults_are_the_papers_recipe() -> None:
    cfg = RunConfig()
    assert (cfg.optim.lr, cfg.optim.gate_lr, cfg.optim.weight_decay) == (1e-3, 1e-2, 1e-4)
    assert cfg.optim.batch_size == 100 and cfg.optim.milestones == (0.5, 0.8)
    # unset gate settings leave the method's own defaults: for BB, the authors'
    assert (cfg.gate.alpha, cfg.gate.temperature, cfg.gate.threshold) == (None, None, None)
    from bbdrop.attach import gated_layers
    from bbdrop.pipeline import stage_model

    for _, g in gated_layers(stage_model(cfg, "bb", 10)):
        assert (g.gate.alpha, g.gate.temperature, g.gate.threshold) == (1e-4, 0.1, 1e-3)


def test_a_config_with_the_old_epochs_bb_key_says_what_to_rename(tmp_path: Path) -> None:
    path = tmp_path / "old.toml"
    path.write_text("[epochs]\nbb = 3\n")
    with pytest.raises(ConfigError, match=r"epochs\.bb was renamed epochs\.sparsify"):
        load_config(path)


def test_toml_round_trip(tmp_path: Path) -> None:
    cfg = apply_overrides(
        RunConfig(),
        [
            "name=lenet",
            "seed=3",
            "gate.conv_kl_scale=0.1",
            "optim.milestones=[0.3, 0.9]",
            "data.data_dir=/tmp/x",
            "data.download=false",
        ],
    )
    path = tmp_path / "run.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg
    assert load_config(path).gate.conv_kl_scale == 0.1


def test_file_values_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('seed = 7\n[optim]\nlr = 1\n[epochs]\nsparsify = 3\n[data]\nname = "mnist"\n')
    cfg = load_config(path, ["epochs.dbb=0", "--data.name=cifar10"])
    assert cfg.seed == 7 and cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.epochs.sparsify == 3 and cfg.epochs.dbb == 0 and cfg.data.name == "cifar10"
    assert cfg.epochs.pretrain == 20  # untouched default


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lr=fast"], r"optim\.lr must be a number, got 'fast'"),
        (["optim.learning_rate=1"], r"unknown key 'optim\.learning_rate'"),
        (["nosuch.key=1"], r"unknown key 'nosuch\.key'"),
        (["seed=1.5"], r"seed must be an integer"),
        (["data.download=1"], r"data\.download must be true or false"),
        (["optim.milestones=0.5"], r"optim\.milestones must be a list"),
        (["optim.batch_size=0"], r"batch_size must be > 0"),
        (
            ["gate.threshold=1"],
            r"gate\.threshold must be a finite number in \(0, 1\), got 1\.0 "
            r"\(method 'bb'\)",
        ),
        (["device=tpu"], r"device must be auto, cpu or cuda"),
        (["seed"], r"not of the form key=value"),
        (["epochs.sparsify=-1"], r"EpochsConfig\.sparsify must be >= 0"),
        (["data.validation=-5"], r"DataConfig\.validation must be >= 0"),
        (["gate.init_a=0"], r"gate\.init_a must be a finite number > 0"),
        (["gate.init_b=-1"], r"gate\.init_b must be a finite number > 0"),
        (["gate.method=nope"], r"gate\.method: unknown gate 'nope'; available: bb, dbb"),
        (
            ["gate.method=svd", "gate.threshold=9"],
            r"gate\.threshold \(a log alpha\) must be "
            r"a finite number in \(-8, 8\], got 9\.0",
        ),
        (
            ["gate.method=svd", "gate.alpha=0.1"],
            r"gate\.alpha = 0\.1 does not apply to method "
            r"'svd'; remove it \(its settings: kl_scale, "
            r"threshold, init_log_sigma2, train_clip\)",
        ),
        (
            ["gate.method=l0", "gate.droprate_init=1"],
            r"gate\.droprate_init must be a finite "
            r"number in \(0, 1\), got 1\.0 \(method 'l0",
        ),
        (["gate.method=ssl", "gate.proximal=1"], r"gate\.proximal must be True or False, got 1"),
    ],
)
def test_bad_overrides_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        apply_overrides(RunConfig(), overrides)


def test_unknown_key_in_a_file_lists_the_methods_settings(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[gate]\ntemp = 0.2\n")
    with pytest.raises(
        ConfigError, match=r"gate\.temp is not a setting of method 'bb'; its settings: .*temper"
    ):
        load_config(path)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("seed = = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_section_must_be_a_table() -> None:
    with pytest.raises(ConfigError, match="optim must be a table"):
        from_dict(RunConfig, {"optim": 3})


def test_optional_values_accept_none() -> None:
    cfg = apply_overrides(RunConfig(), ["gate.conv_kl_scale=0.5"])
    assert apply_overrides(cfg, ["gate.conv_kl_scale=none"]).gate.conv_kl_scale is None
    assert GateConfig(conv_kl_scale=None).conv_kl_scale is None
    with pytest.raises(ConfigError, match="conv_kl_scale must be float or none"):
        apply_overrides(cfg, ["gate.conv_kl_scale=big"])


def test_milestones_must_increase() -> None:
    with pytest.raises(ConfigError, match="milestones"):
        OptimConfig(milestones=(0.8, 0.5))


def test_shipped_configs_say_which_recipe_they_follow() -> None:
    from bbdrop.experiments import experiment_config, list_experiments

    names = list_experiments()
    assert RunConfig().optim.decay_gates is False  # bbdrop's default (docs/results.md)
    for name in names:
        cfg = experiment_config(name)
        # the authors' recipe: the paper-scale configs and the CPU protocol's -paper ones
        # (with their methods, -paper-<method>); bbdrop's CPU protocol keeps the gates' rate
        paper_faithful = "-paper" in name or "fashion-cpu" not in name
        assert cfg.optim.decay_gates is paper_faithful, name
    assert {"lenet-500-300-fashion-cpu-paper", "lenet5-caffe-fashion-cpu-paper"} <= set(names)


def test_method_settings_round_trip_through_toml_and_overrides(tmp_path) -> None:
    """A method's own settings stand in [gate] (or in [gate.settings], as files written
    before had them); they survive to_toml/load_config, recorded in [gate.settings]."""
    from bbdrop.config import RunConfig, apply_overrides, load_config, to_toml

    cfg = apply_overrides(RunConfig(), ["gate.method=l0", "gate.droprate_init=0.3",
                                        "gate.settings.weight_decay=0"])  # fmt: skip
    assert cfg.gate.settings == {"weight_decay": 0.0, "droprate_init": 0.3}
    assert cfg.gate.method_kwargs() == {"kl_scale": 1.0, "droprate_init": 0.3, "weight_decay": 0}
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg
    assert "settings = {weight_decay = 0.0, droprate_init = 0.3}" in path.read_text()
    old = tmp_path / "old.toml"  # a file of the earlier layout
    old.write_text('[gate]\nmethod = "l0"\n[gate.settings]\ndroprate_init = 0.3\n')
    assert load_config(old).gate.method_kwargs()["droprate_init"] == 0.3
    new = tmp_path / "new.toml"
    new.write_text('[gate]\nmethod = "l0"\ndroprate_init = 0.3\n')
    assert load_config(new) == load_config(old)


def test_a_key_in_gate_and_in_gate_settings_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[gate]\nmethod = "l0"\nlamb = 1\n[gate.settings]\nlamb = 2\n')
    with pytest.raises(ConfigError, match=r"gate\.lamb and gate\.settings\.lamb are both set"):
        load_config(path)


def test_svd_threshold_is_a_log_alpha() -> None:
    """gate.threshold is each method's own: SVD's log alpha 3 (refused by BB's range)."""
    cfg = apply_overrides(RunConfig(), ["gate.method=svd", "gate.threshold=3"])
    assert cfg.gate.method_kwargs() == {"threshold": 3.0, "kl_scale": 1.0}


def test_every_methods_settings_are_its_constructors_arguments() -> None:
    """The registered settings of each method have the fields, defaults and order-free
    names of its gate's keyword arguments, so that a config checked against them
    builds the gate."""
    import dataclasses
    import inspect

    from bbdrop.gates import get_gate_class, list_gates, settings_type

    for name in list_gates():
        params = inspect.signature(get_gate_class(name)).parameters
        wanted = {k: p.default for k, p in params.items() if k != "num_units"}
        fields = {f.name: f.default for f in dataclasses.fields(settings_type(name))}
        assert fields == wanted, name


def test_an_output_folder_named_like_an_experiment_does_not_hide_it(tmp_path, monkeypatch) -> None:
    """Run from the output root, ``lenet-500-300`` is also the experiment's own output folder:
    the shipped experiment is meant, not the folder. A folder under any other name is still
    read as a path, and refused as one."""
    from bbdrop.config import ConfigError
    from bbdrop.experiments import experiment_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "lenet-500-300-fashion-cpu").mkdir()
    assert experiment_config("lenet-500-300-fashion-cpu").name == "lenet-500-300-fashion-cpu"
    (tmp_path / "mine").mkdir()
    with pytest.raises(ConfigError, match=r"'mine' is a folder, not a \.toml file"):
        experiment_config("mine")


def test_gate_placement_is_auto_groups_or_layers() -> None:
    from bbdrop.config import ConfigError, apply_overrides
    from bbdrop.stages import placement

    cfg = RunConfig()
    assert cfg.gate.placement == "auto" and placement(cfg) == "layers"  # a registered network
    mine = apply_overrides(cfg, ["model.name=mypkg.nets:resnet18"])
    assert placement(mine) == "groups"  # a factory's network: one gate per coupled group
    assert placement(apply_overrides(mine, ["gate.placement=layers"])) == "layers"
    with pytest.raises(ConfigError, match=r"gate\.placement must be one of auto, groups, layers"):
        apply_overrides(cfg, ["gate.placement=channels"])
