"""Typed run configuration: dataclasses, TOML files mapped onto them, ``key=value`` overrides.

A run is described by a :class:`RunConfig`. TOML tables map onto the nested
dataclasses (``[optim]`` onto :class:`OptimConfig`, ...) through
:mod:`bbdrop.typed_tables`: unknown keys and values of the wrong type are
errors that name the key and say what was expected. This module holds the
dataclasses with their ranges, the reading of files and overrides, and the
writing of the resolved configuration beside the results it produced
(:func:`to_toml`).
"""

from __future__ import annotations

import dataclasses
import re
import stat
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bbdrop import validate
from bbdrop.factories import check_factory_name, is_factory
from bbdrop.gates import settings_type
from bbdrop.precision import PRECISIONS
from bbdrop.typed_tables import ConfigError, from_dict, to_dict, toml_value

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "BudgetConfig",
    "ConfigError",
    "DataConfig",
    "EpochsConfig",
    "GateConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "apply_overrides",
    "from_dict",
    "load_config",
    "to_dict",
    "to_toml",
]

T = TypeVar("T")
MAX_SEED = 2**63 - 1  # torch's generators take seeds up to 2**64 - 1; int64 everywhere
OPEN_TABLES = {
    "gate",
    "gate.settings",
    "gate.layer_kl_scale",
}  # tables whose keys are the method's (checked against it), not the config's


def _positive(owner: object, *names: str) -> None:
    for name in names:
        value = getattr(owner, name)
        if not value > 0:
            raise ConfigError(f"{type(owner).__name__}.{name} must be > 0, got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    """Which data set, and where its files are (see bbdrop.data for the search order).

    ``name`` is a registered data set, or ``module.path:attribute``: a function of the
    user's own that returns the data (bbdrop.factories; docs/cli.md, "Your own network
    and data"), called with ``data_dir`` when that is set; ``download`` and ``verify``
    are for the registered data sets' files.
    """

    name: str = "fashion-mnist"
    data_dir: str | None = None
    download: bool = True
    # Check each data file's size and SHA-256 against the published ones, once per
    # file (docs/data.md); false skips the check, for copies of one's own.
    verify: bool = True
    # Hold out the last ``validation`` training examples and evaluate on them instead
    # of the test set: for choosing settings without looking at the test error.
    validation: int = 0
    # Train on the first ``limit_train`` training examples only (0: all of them), after
    # the validation examples are held out: cheap smoke runs and crash tests.
    limit_train: int = 0

    def __post_init__(self) -> None:
        _check_name(self.name, "data.name")
        if self.data_dir is not None and not self.data_dir.strip():
            raise ConfigError(
                "DataConfig.data_dir is empty; give a folder, or leave it out to search the "
                "usual places (docs/data.md)"
            )
        for name in ("validation", "limit_train"):
            if getattr(self, name) < 0:
                raise ConfigError(f"DataConfig.{name} must be >= 0, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class ModelConfig:
    """A registered network (bbdrop.models), or ``module.path:attribute``: a function or
    class of the user's own called as ``factory(num_classes=N)`` that returns the
    network (bbdrop.factories; docs/cli.md, "Your own network and data")."""

    name: str = "lenet_500_300"

    def __post_init__(self) -> None:
        _check_name(self.name, "model.name")


def _check_name(name: str, key: str) -> None:
    """ConfigError for a name with a ``:`` that is not ``module.path:attribute`` (the
    module is imported, and a registered name looked up, when the run starts)."""
    if is_factory(name):
        try:
            check_factory_name(name, key)
        except ValueError as err:
            raise ConfigError(str(err)) from None


PLACEMENTS = ("auto", "groups", "layers")


@dataclass(frozen=True)
class GateConfig:
    """Gate settings (docs/method.md sections 1-2; each method's: docs/baselines.md).

    ``method`` is the registered gate of the sparsification stage (``bb``; the
    DBB stage builds on it). Every other key of ``[gate]`` that is not one of
    the fields below is a setting of that method: each method declares its
    settings, with their ranges, as a dataclass registered with its gate
    (``bbdrop.gates.settings_type``), and ``[gate]`` is checked against it when
    the configuration is read. ``alpha``, ``temperature``, ``threshold``,
    ``init_a`` and ``init_b`` are named fields for the methods that take them
    (``threshold`` is SVD's log alpha, SBP's signal-to-noise ratio, BB's
    ``E_q[pi]``); None keeps the method's own default. The other settings are
    kept in ``settings`` (``[gate.settings]`` in files written before, and in
    the recorded ``config.toml``). ``kl_scale`` and ``conv_kl_scale`` weight the
    stage's regulariser on dense and convolutional layers (``conv_kl_scale``
    defaults to ``kl_scale``). ``dbb_kl_scale`` weights every gate's KL in the
    DBB stage: its own setting, 1 in the authors' DBB stage.
    """

    method: str = "bb"
    alpha: float | None = None
    temperature: float | None = None
    threshold: float | None = None
    kl_scale: float = 1.0
    conv_kl_scale: float | None = None
    init_a: float | None = None
    init_b: float | None = None
    dbb_kl_scale: float = 1.0
    # Where the gates go (bbdrop.attach_gates_): "layers", the paper's (one gate per
    # Linear/Conv2d output, the authors' start values), "groups" (one gate per coupled
    # group, traced on a batch of the data, starting near 1), or "auto": "layers" for
    # the registered networks, "groups" for a network of the user's own (a factory).
    placement: str = "auto"
    # The method's other settings, by name: ``droprate_init = 0.3`` in [gate] (or in
    # [gate.settings]), ``gate.droprate_init=0.3`` as an override.
    settings: dict[str, float | int | bool | str] = field(default_factory=dict)
    # kl_scale of single gated layers by name (``[gate.layer_kl_scale]``, e.g.
    # ``conv2 = 3.84``), over kl_scale and conv_kl_scale: the authors scale each
    # convolution's KL by its own factor in some configurations.
    layer_kl_scale: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ConfigError(
                f"gate.placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}"
            )
        for name in ("kl_scale", "conv_kl_scale", "dbb_kl_scale"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ConfigError(f"GateConfig.{name} must be >= 0, got {value!r}")
        for layer, value in self.layer_kl_scale.items():
            if not value >= 0:
                raise ConfigError(f"gate.layer_kl_scale.{layer} must be >= 0, got {value!r}")
        self.method_kwargs()  # checked against the method's settings now, not at training

    @classmethod
    def from_table(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        """``[gate]`` with the keys that are not GateConfig's own moved into ``settings``:
        a method's setting may stand in [gate] itself."""
        own = {f.name for f in dataclasses.fields(cls)}
        table = {k: v for k, v in data.items() if k in own}
        extra = {k: v for k, v in data.items() if k not in own}
        if not extra:
            return table
        settings = table.get("settings", {})
        if not isinstance(settings, Mapping):
            return table | extra  # the type check names gate.settings
        for key in extra:
            if key in settings:
                raise ConfigError(f"gate.{key} and gate.settings.{key} are both set; keep one")
        return table | {"settings": {**settings, **extra}}

    def method_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the method's gates: the named fields that are set,
        ``kl_scale`` and ``settings``, checked against the method's settings type.
        ConfigError naming the key: an unknown method, a key the method does not take,
        a value outside the method's range."""
        try:
            takes = [f.name for f in dataclasses.fields(settings_type(self.method))]
        except ValueError as err:
            raise ConfigError(f"gate.method: {err}") from None
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name not in _NAMED or value is None:
                continue
            if f.name in takes:
                kwargs[f.name] = value
            elif value != f.default:
                raise ConfigError(
                    f"gate.{f.name} = {value!r} does not apply to method {self.method!r}; "
                    f"remove it (its settings: {', '.join(takes)})"
                )
        for key, value in self.settings.items():
            if key not in takes:
                raise ConfigError(
                    f"gate.{key} is not a setting of method {self.method!r}; its settings: "
                    f"{', '.join(takes)}"
                )
            if key in kwargs:
                raise ConfigError(f"gate.{key} and gate.settings.{key} are both set; keep one")
            kwargs[key] = value
        try:
            settings_type(self.method)(**kwargs)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"gate.{err} (method {self.method!r})") from None
        return kwargs


# GateConfig's fields that are settings of some methods (the others are every method's).
_NAMED = ("alpha", "temperature", "threshold", "kl_scale", "init_a", "init_b")


@dataclass(frozen=True)
class OptimConfig:
    """The authors' recipe (docs/method.md section 4): Adam, two parameter groups, step decay;
    except ``decay_gates``, whose default differs from their code (see below)."""

    batch_size: int = 100
    lr: float = 1e-3
    gate_lr: float = 1e-2
    weight_decay: float = 1e-4
    milestones: tuple[float, ...] = (0.5, 0.8)  # fractions of the stage's epochs
    gamma: float = 0.1
    # Apply the schedule to the gate parameters' group too (the authors' code does).
    # bbdrop's default keeps the gates' rate: on the CPU protocol's short budget the
    # decayed gates stop pruning half-way (docs/results.md).
    decay_gates: bool = False

    def __post_init__(self) -> None:
        _positive(self, "batch_size", "lr", "gate_lr", "gamma")
        if self.weight_decay < 0:
            raise ConfigError(f"OptimConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        if not all(0 < m < 1 for m in self.milestones) or list(self.milestones) != sorted(
            self.milestones
        ):
            raise ConfigError(
                "OptimConfig.milestones must be increasing fractions in (0, 1), "
                f"got {self.milestones!r}"
            )


@dataclass(frozen=True)
class EpochsConfig:
    """Epochs of each stage: dense pretraining, the sparsification stage (the gate
    named by ``gate.method``), DBB; 0 skips a stage."""

    pretrain: int = 20
    sparsify: int = 30
    dbb: int = 20

    def __post_init__(self) -> None:
        for name in ("pretrain", "sparsify", "dbb"):
            if getattr(self, name) < 0:
                raise ConfigError(f"EpochsConfig.{name} must be >= 0, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class BudgetConfig:
    """A budget (docs/sparsify.md, "A budget"): the fraction of the dense network's FLOPs
    (0.125: 8x fewer) and/or of its parameters that the run's gated stages steer to
    end at, as ``bbdrop.sparsify(budget=...)`` does; unset, the KL scale alone
    decides."""

    flops: float | None = None
    params: float | None = None

    def __post_init__(self) -> None:
        wrong = validate.budget_fractions(self, "budget.")
        if wrong:
            raise ConfigError(wrong)


def _folder_name(name: object) -> bool:
    """Whether ``name`` can be one folder's name on every system: 1 to 100 printable
    characters, not only spaces, no path separator, not ``.`` or ``..``."""
    return (
        isinstance(name, str)
        and 0 < len(name) <= 100
        and bool(name.strip())
        and name.isprintable()
        and not any(c in name for c in "/\\")
        and name not in (".", "..")
    )


@dataclass(frozen=True)
class RunConfig:
    """A whole run: data, model, gates, optimiser and epochs per stage.

    ``compile`` runs the training objective through ``torch.compile``: faster
    epochs after a compilation of a few tens of seconds, another random stream.
    ``precision``: ``float32``, or every stage's forward passes under autocast in
    ``bf16`` (CPU, GPU) or ``fp16`` (GPU), the gates in float32 (:mod:`bbdrop.precision`).
    ``threads`` is the number of CPU threads torch computes with; 0 chooses
    (:func:`bbdrop.threads.auto_threads`: one for small networks, whose
    operations are too short to share, the available cores otherwise).
    """

    name: str = "run"
    seed: int = 1
    device: str = "auto"
    compile: bool = False
    precision: str = "float32"
    threads: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    epochs: EpochsConfig = field(default_factory=EpochsConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)

    def __post_init__(self) -> None:
        if not _folder_name(self.name):
            raise ConfigError(
                "RunConfig.name names the run's folder: 1 to 100 printable characters, "
                f"not only spaces, without / or \\; got {self.name!r}"
            )
        for name in ("seed", "threads"):
            if not validate.is_whole(getattr(self, name)):
                raise ConfigError(
                    f"RunConfig.{name} must be an integer, got {getattr(self, name)!r}"
                )
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"RunConfig.seed must be in [0, 2**63 - 1], got {self.seed!r}")
        if self.threads < 0:
            raise ConfigError(f"RunConfig.threads must be >= 0 (0: choose), got {self.threads!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"RunConfig.precision must be one of {', '.join(PRECISIONS)}, got "
                f"{self.precision!r}"
            )
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device)):
            raise ConfigError(
                f"RunConfig.device must be auto, cpu or cuda[:N], got {self.device!r}"
            )


def to_toml(cfg: Any) -> str:
    """TOML text that :func:`load_config` reads back to an equal configuration.

    Keys whose value is None are left out (TOML has no null; the default is None).
    """
    data = to_dict(cfg)
    lines = [f"{k} = {toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for k, v in data.items():
        if isinstance(v, dict) and any(vv is not None for vv in v.values()):
            lines += ["", f"[{k}]"]
            lines += [f"{kk} = {toml_value(vv)}" for kk, vv in v.items() if vv is not None]
    return "\n".join(lines) + "\n"


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> RunConfig:
    """Read a TOML run configuration, then apply ``key=value`` overrides."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8-sig"))  # a BOM is dropped
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config {str(path)!r} is a folder, not a .toml file") from None
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8"
        ) from None
    except OSError as err:
        raise ConfigError(f"cannot read config {str(path)!r}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    epochs = data.get("epochs")
    if isinstance(epochs, dict) and "bb" in epochs:
        raise ConfigError(
            f"{path}: epochs.bb was renamed epochs.sparsify (the stage of gate.method); "
            "rename it in the file"
        )
    return apply_overrides(from_dict(RunConfig, data), overrides)


def load_recorded_config(path: str | Path) -> RunConfig:
    """The ``config.toml`` a run recorded in its folder. Unlike a configuration given on
    the command line (which may come through a pipe), it must be a regular file: a
    FIFO or device in its place would block the reader, or never end."""
    path = Path(path)
    if path.exists() and not path.is_dir() and not stat.S_ISREG(path.stat().st_mode):
        raise ConfigError(f"{path} is not a regular file (a FIFO or a device?); remove it, or "
                          "use another output folder")  # fmt: skip
    return load_config(path)


def apply_overrides(cfg: T, overrides: Iterable[str]) -> T:
    """Apply ``section.key=value`` strings; values are TOML (bare words count as strings)."""
    data = to_dict(cfg)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip().removeprefix("--")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        value = _parse_value(raw.strip())
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"unknown key {key!r} in override {item!r}")
            node = node[part]
        if parts[-1] not in node and ".".join(parts[:-1]) not in OPEN_TABLES:
            raise ConfigError(f"unknown key {key!r} in override {item!r}")
        node[parts[-1]] = value
    return from_dict(type(cfg), data)


def _parse_value(raw: str) -> Any:
    if raw.lower() in ("none", "null"):
        return None
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # a bare word such as fashion-mnist
