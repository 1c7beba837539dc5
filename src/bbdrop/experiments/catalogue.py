"""The catalogue of shipped experiments: their names, and a configuration by name (or by
the path of a TOML file)."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from bbdrop.config import RunConfig, load_config


def list_experiments() -> list[str]:
    """Names of the shipped configurations (``bbdrop/configs/*.toml``)."""
    files = resources.files("bbdrop") / "configs"
    return sorted(p.name.removesuffix(".toml") for p in files.iterdir() if p.name.endswith(".toml"))


def experiment_config(name_or_path: str, overrides: Sequence[str] = ()) -> RunConfig:
    """A shipped experiment by name, or a TOML file by path, with overrides applied. A
    folder named like a shipped experiment (its own output folder, when the command runs
    from the output root) does not hide the experiment."""
    path = Path(name_or_path)
    shipped = name_or_path in list_experiments()
    if path.suffix == ".toml" or (path.exists() and not (shipped and path.is_dir())):
        return load_config(path, overrides)
    if not shipped:
        raise ValueError(
            f"unknown experiment {name_or_path!r}; shipped: {', '.join(list_experiments())} "
            "(or give the path of a .toml file)"
        )
    with resources.as_file(resources.files("bbdrop") / "configs" / f"{name_or_path}.toml") as p:
        return load_config(p, overrides)
