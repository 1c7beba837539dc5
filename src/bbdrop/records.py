"""The records bbdrop wrote, read back and checked: ``results.json`` and ``sweep.json``.

``bbdrop table`` and ``bbdrop front`` read folders of such records, which may have
been copied, edited by hand, mixed with another experiment's or replaced by
something else entirely. Each record is read only if it is a regular file of a
sane size (a FIFO or ``/dev/zero`` named ``results.json`` would hang or exhaust
memory), parsed as strict JSON (no ``NaN``), and checked field by field before
any figure is computed from it: a problem is one ``ValueError`` whose first line
names the file and the field. A folder that mixes experiments, or holds two
records of the same run, is refused with the two files named, instead of a
table of medians across different networks.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bbdrop import validate

__all__ = ["check_result", "check_sweep", "read_json", "read_results", "read_sweeps"]

MAX_BYTES = 64 * 2**20  # the largest record written (a VGG's history) is well below 1 MiB
# The figures of a stage that the tables and fronts read; each a finite number.
STAGE_NUMBERS = ("error", "speedup", "speedup_authors", "memory_authors",
                 "memory_params_authors", "seconds_per_epoch")  # fmt: skip
# Of those, the figures of the paper's count rule: null for a network it does not cover
# (bbdrop.stage_figures.traced_figures).
AUTHORS_NUMBERS = ("speedup_authors", "memory_authors", "memory_params_authors")
POINT_NUMBERS = ("scale", "error", "speedup", "dense_error")


def read_json(path: Path) -> Any:
    """The JSON value in ``path``, a regular file of at most :data:`MAX_BYTES`."""
    try:
        st = os.stat(path)
    except OSError as err:
        raise ValueError(f"{path}: cannot be read ({err.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path} is not a regular file; remove it or give another folder")
    if st.st_size > MAX_BYTES:
        raise ValueError(f"{path} holds {st.st_size} bytes, more than any record bbdrop "
                         f"writes ({MAX_BYTES}); it is not one of its records")  # fmt: skip
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_BYTES + 1).decode("utf-8")
        return json.loads(text, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{path}: not a JSON record written by bbdrop ({detail}); "
                         "restore or delete it") from None  # fmt: skip


def _no_constant(name: str) -> Any:
    raise ValueError(f"holds {name}, which is not a number bbdrop writes")


def _fail(path: Path, field: str, expected: str, value: Any) -> ValueError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return ValueError(f"{path}: field {field!r} must be {expected}, got {shown}; "
                      "restore the file or delete it")  # fmt: skip


def _table(value: Any, path: Path, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(path, field, "a table (JSON object)", value)
    return value


def _numbers(value: Any, path: Path, field: str, *, empty: bool = True) -> dict[str, float]:
    """A table of finite numbers >= 0 by name (units per layer)."""
    table = _table(value, path, field)
    if not table and not empty:
        raise _fail(path, field, "a non-empty table of numbers", value)
    for name, v in table.items():
        if not validate.is_number(v) or v < 0:
            raise _fail(path, f"{field}.{name}", "a finite number >= 0", v)
    return table


def check_result(record: Any, path: Path) -> dict[str, Any]:
    """``record`` (a ``results.json``), unchanged, if every figure a table reads is
    there and is a finite number; else a ValueError naming ``path`` and the field."""
    record = _table(record, path, "(the whole file)")
    stages = _table(record.get("stages"), path, "stages")
    if not stages:
        raise _fail(path, "stages", "a table with at least one stage", stages)
    for name, stage in stages.items():
        stage = _table(stage, path, f"stages.{name}")
        for key in STAGE_NUMBERS:
            value = stage.get(key)
            if key in AUTHORS_NUMBERS and key in stage and value is None:
                continue
            if not validate.is_number(value):
                raise _fail(path, f"stages.{name}.{key}", "a finite number", value)
        _numbers(stage.get("units"), path, f"stages.{name}.units")
        _numbers(stage.get("active"), path, f"stages.{name}.active")
        if not isinstance(stage.get("at_chance", False), bool):
            raise _fail(path, f"stages.{name}.at_chance", "true or false", stage["at_chance"])
        compact = stage.get("compact")
        if compact is not None:
            measured = _table(compact, path, f"stages.{name}.compact").get("speedup_measured")
            if measured is not None and not validate.is_number(measured):
                raise _fail(path, f"stages.{name}.compact.speedup_measured",
                            "a finite number or null", measured)  # fmt: skip
    config = record.get("config")
    if config is not None:
        config = _table(config, path, "config")
        for key in ("name", "model", "data"):
            if key not in config:
                raise _fail(path, f"config.{key}", "present", None)
    return record


def experiment_of(record: dict[str, Any]) -> tuple[str, ...] | None:
    """What identifies a record's experiment: its name, model and data set (None for a
    record without its configuration, from an early version)."""
    config = record.get("config")
    if config is None:
        return None
    model, data = config.get("model"), config.get("data")
    return (str(config.get("name")),
            str(model.get("name") if isinstance(model, dict) else model),
            str(data.get("name") if isinstance(data, dict) else data))  # fmt: skip


def read_results(folder: Path) -> dict[int, list[tuple[Path, dict[str, Any]]]]:
    """The checked ``results.json`` of every seed of a ``reproduce`` folder
    (``seed-*/`` and ``*/seed-*/``), by seed. Refuses a folder that mixes
    experiments or holds the same stage of a seed twice, naming both files."""
    paths = sorted([*folder.glob("seed-*/results.json"), *folder.glob("*/seed-*/results.json")])
    by_seed: dict[int, list[tuple[Path, dict[str, Any]]]] = {}
    seen: dict[str, tuple[Path, Any]] = {}  # the first record with each identity
    for path in paths:
        seed = _seed_of(path)
        record = check_result(read_json(path), path)
        for key, value in (("experiment", experiment_of(record)), ("layers", _layers(record))):
            if not value:
                continue  # no configuration recorded, or a dense network only
            first = seen.setdefault(key, (path, value))
            if first[1] != value:
                raise ValueError(f"{folder} mixes experiments: {first[0]} and {path} are runs "
                                 "of different networks or settings; give a folder of one "
                                 "experiment (the one bbdrop reproduce wrote)")  # fmt: skip
        _check_seed(record, seed, path)
        for other, earlier in by_seed.get(seed, []):
            _check_no_duplicate(earlier, record, other, path)
        by_seed.setdefault(seed, []).append((path, record))
    return by_seed


def _seed_of(path: Path) -> int:
    text = path.parent.name.removeprefix("seed-")
    if not text.isdigit():
        raise ValueError(f"{path.parent}: a seed folder is named seed-<integer>, not "
                         f"{path.parent.name!r}; rename or remove it")  # fmt: skip
    return int(text)


def _layers(record: dict[str, Any]) -> frozenset[str]:
    """The gated layers a record's stages name (empty for a dense-only record)."""
    return frozenset(n for s in record["stages"].values() for n in s["units"])


def _check_seed(record: dict[str, Any], seed: int, path: Path) -> None:
    config = record.get("config")
    if config is not None and config.get("seed") != seed:
        raise ValueError(f"{path} is a run of seed {config.get('seed')!r} in a folder of seed "
                         f"{seed}; put it back in its own seed folder")  # fmt: skip


def _check_no_duplicate(a: dict[str, Any], b: dict[str, Any], path_a: Path, path_b: Path) -> None:
    """Two records of one seed of one experiment may share only the pretrained network
    (every method of a reproduce folder starts from one)."""
    shared = sorted(a["stages"].keys() & b["stages"].keys() - {"pretrain"})
    if shared:
        raise ValueError(f"{path_a} and {path_b} both hold stage {shared[0]!r} of the same "
                         "seed; keep one of them")  # fmt: skip


def check_sweep(record: Any, path: Path) -> dict[str, Any]:
    """``record`` (a ``sweep.json``), unchanged, if it holds what a front reads."""
    record = _table(record, path, "(the whole file)")
    for key in ("name", "method"):
        if not isinstance(record.get(key), str) or not record.get(key):
            raise _fail(path, key, "a non-empty string", record.get(key))
    points = record.get("points")
    if not isinstance(points, list) or not points:
        raise _fail(path, "points", "a non-empty list of points", points)
    for i, point in enumerate(points):
        point = _table(point, path, f"points[{i}]")
        for key in POINT_NUMBERS:
            if not validate.is_number(point.get(key)):
                raise _fail(path, f"points[{i}].{key}", "a finite number", point.get(key))
        if not validate.is_whole(point.get("seed")):
            raise _fail(path, f"points[{i}].seed", "an integer", point.get("seed"))
        if "units" in point:
            _numbers(point["units"], path, f"points[{i}].units")
    chosen = record.get("chosen_scale")
    scales = sorted({p["scale"] for p in points})
    if not validate.is_number(chosen) or chosen not in scales:
        raise _fail(path, "chosen_scale", f"one of the points' scales {scales}", chosen)
    return record


def read_sweeps(folder: Path, *, name: str | None = None) -> list[tuple[Path, dict[str, Any]]]:
    """The checked ``<method>/sweep.json`` records of a sweep folder, all of one
    experiment (``name``, when given, is the one expected)."""
    out: list[tuple[Path, dict[str, Any]]] = []
    for path in sorted(folder.glob("*/sweep.json")):
        record = check_sweep(read_json(path), path)
        if path.parent.name != record["method"]:
            raise ValueError(f"{path} is a sweep of method {record['method']!r} in the folder "
                             f"of {path.parent.name!r}; put it back in its own folder")  # fmt: skip
        if name is not None and record["name"] != name:
            raise ValueError(f"{path} is a sweep of {record['name']!r}, not of {name!r}; "
                             "keep one experiment's sweeps in a folder")  # fmt: skip
        if out and record["name"] != out[0][1]["name"]:
            raise ValueError(f"{folder} mixes experiments: {out[0][0]} is a sweep of "
                             f"{out[0][1]['name']!r}, {path} of {record['name']!r}; keep one "
                             "experiment's sweeps in a folder")  # fmt: skip
        out.append((path, record))
    return out


def names_of(records: Sequence[dict[str, Any]]) -> set[str]:
    """The experiment names of records with a configuration."""
    return {r["config"]["name"] for r in records if r.get("config") is not None}
