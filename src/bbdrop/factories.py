"""A network or data set of the user's own, named in a configuration by the factory
that makes it: ``model.name = "mypkg.nets:resnet18"``, ``data.name = "mypkg.data:load"``.

A name with a ``:`` is ``module.path:attribute`` (the attribute may be dotted,
``mod:Class.build``); any other name is looked up in bbdrop's registries as
before. The module is imported with :mod:`importlib`, with the working folder
searched after the installed packages (``bbdrop run`` in a project folder finds
``mypkg`` there, as ``python -m`` would); worker processes of ``--jobs`` inherit
the search path and work in the same folder.

The contracts (docs/cli.md, "Your own network and data"):

* a **model factory** is called as ``factory(num_classes=N)``, the keyword every
  registered network takes (N: the data set's class count), and returns an
  ``nn.Module`` that maps a batch of the data's inputs to N scores per example;
* a **data factory** is called with no arguments (``data_dir=<str>`` when
  ``data.data_dir`` is set) and returns a :class:`bbdrop.data.Dataset` or a tuple
  ``(train_x, train_y, test_x, test_y)`` of tensors: floating-point inputs, int64
  labels ``0..K-1`` (K, the class count, is the largest label + 1). It must return
  the same data every call (seed any randomness): worker processes and ``bbdrop
  compact`` call it again.

Each breach of a contract is a one-line ValueError naming the factory.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from bbdrop.data import Dataset

__all__ = ["build_model", "is_factory", "load_factory", "load_factory_data"]

_PATH = r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*"
_FACTORY = re.compile(rf"{_PATH}:{_PATH}")
EXAMPLE = {"model": "mypkg.nets:resnet18", "data": "mypkg.data:load"}


def is_factory(name: object) -> bool:
    """Whether ``name`` names a factory (``module.path:attribute``) rather than a
    registered network or data set: it has a ``:``."""
    return isinstance(name, str) and ":" in name


def check_factory_name(name: str, key: str) -> None:
    """ValueError unless ``name``, which has a ``:``, is ``module.path:attribute``."""
    if not _FACTORY.fullmatch(name):
        kind = key.split(".")[0]
        raise ValueError(
            f"{key} {name!r} has a ':' but is not module.path:attribute (e.g. "
            f"{EXAMPLE.get(kind, EXAMPLE['model'])!r}); registered names have no ':'"
        )


def load_factory(name: str, key: str = "model.name") -> Callable[..., Any]:
    """The callable ``name`` (``module.path:attribute``) names, imported; ValueError in
    one line when the name is malformed, the module cannot be imported, the attribute
    is missing or is not callable. ``key`` is the setting that named it, for messages."""
    check_factory_name(name, key)
    module_name, _, attribute = name.partition(":")
    _search_working_folder()
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        missing = err.name if isinstance(err, ModuleNotFoundError) else None
        if missing and f"{module_name}.".startswith(f"{missing}."):  # the module itself
            fix = (f"{key} {name!r} names a module Python does not find; run bbdrop from "
                   "the folder that holds it, or put that folder on PYTHONPATH")  # fmt: skip
        else:
            fix = "an import in its code failed; install what it needs"
        raise ValueError(
            f"cannot import {module_name!r} ({_one_line(err, with_type=False)}): {fix}"
        ) from err
    except Exception as err:  # the module's own code failed (a SyntaxError, a NameError...)
        raise ValueError(
            f"cannot import {module_name!r} ({_one_line(err)}): its code failed; fix it, then "
            f"try `python -c 'import {module_name}'`"
        ) from err
    target: Any = module
    for i, part in enumerate(attribute.split(".")):
        if not hasattr(target, part):
            where = ".".join([module_name, *attribute.split(".")[:i]])
            raise ValueError(
                f"{key} {name!r}: {where!r} has no attribute {part!r}; give a function or "
                "class defined there"
            )
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(
            f"{name!r} is not a callable (it is {_a(target)}); {key} must name "
            "a function or class that builds the " + ("network" if key.startswith("model")
                                                      else "data set")
        )  # fmt: skip
    return target


def build_model(name: str, num_classes: int) -> nn.Module:
    """The network ``name`` names: a registered one (``create_model(name,
    num_classes=num_classes)``), or the result of the factory ``module.path:attribute``
    called as ``factory(num_classes=num_classes)``, which must be an ``nn.Module``."""
    if not is_factory(name):
        from bbdrop.models import create_model, list_models

        if name not in list_models():
            raise ValueError(
                f"unknown model {name!r}; available: {', '.join(list_models())}, or a network "
                f"of your own as module.path:attribute (e.g. {EXAMPLE['model']!r})"
            )
        return create_model(name, num_classes=num_classes)
    factory = load_factory(name, "model.name")
    _check_takes(factory, name, {"num_classes": num_classes}, "model")
    try:
        model = factory(num_classes=num_classes)
    except Exception as err:
        raise ValueError(
            f"the model factory {name!r} raised {_one_line(err)} when called as "
            f"{name}(num_classes={num_classes})"
        ) from err
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"the factory {name!r} returned {_a(model)}, not an nn.Module; a model "
            "factory returns the network, e.g. return MyNet(num_classes)"
        )
    return model


def load_factory_data(name: str, data_dir: str | None = None) -> Dataset:
    """The :class:`~bbdrop.data.Dataset` the factory ``name`` returns, called with no
    arguments (``data_dir=data_dir`` when that is given); a tuple ``(train_x, train_y,
    test_x, test_y)`` it returns is made a Dataset, with the largest label + 1 classes
    (:meth:`Dataset.from_tensors` checks each tensor)."""
    from bbdrop.data import Dataset

    factory = load_factory(name, "data.name")
    kwargs = {} if data_dir is None else {"data_dir": data_dir}
    _check_takes(factory, name, kwargs, "data")
    try:
        data = factory(**kwargs)
    except Exception as err:
        call = f"{name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
        raise ValueError(f"the data factory {name!r} raised {_one_line(err)} when called as "
                         f"{call}") from err  # fmt: skip
    if isinstance(data, Dataset):
        return data
    if not isinstance(data, (tuple, list)) or len(data) != 4:
        got = _a(data) + (f" of {len(data)}" if isinstance(data, (tuple, list)) else "")
        raise ValueError(
            f"the factory {name!r} returned {got}, not a bbdrop Dataset or a tuple "
            "(train_x, train_y, test_x, test_y) of tensors"
        )
    train_x, train_y, test_x, test_y = data
    for field, value in zip(("train_x", "train_y", "test_x", "test_y"), data, strict=True):
        if not isinstance(value, Tensor):
            raise ValueError(
                f"the factory {name!r} returned {_a(value)} as {field}, not a tensor; "
                "convert it with torch.as_tensor"
            )
    labels = [y for y in (train_y, test_y) if y.dtype == torch.int64 and y.numel()]
    num_classes = max([1, *(int(y.max()) + 1 for y in labels)])
    return Dataset.from_tensors(train_x, train_y, test_x, test_y, num_classes, name=name)


# -- helpers ----------------------------------------------------------------------------
def _search_working_folder() -> None:
    """Put the working folder on the import path (after the installed packages) unless
    it is there already: ``bbdrop`` in a project folder imports the project's modules,
    as ``python -m`` would. Spawned workers inherit the path."""
    cwd = os.getcwd()
    if not any(os.path.abspath(p or os.curdir) == cwd for p in sys.path):
        sys.path.append(cwd)
        importlib.invalidate_caches()


def _check_takes(factory: Callable[..., Any], name: str, kwargs: dict[str, Any],
                 kind: str) -> None:  # fmt: skip
    """ValueError unless ``factory`` can be called with ``kwargs`` (where its signature
    can be read)."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin without a signature: the call decides
        return
    try:
        signature.bind(**kwargs)
    except TypeError as err:
        call = ", ".join(f"{k}=..." for k in kwargs)
        if kind == "model":
            need = "take the keyword argument num_classes (the data set's class count)"
        elif kwargs:
            need = ("take the keyword argument data_dir (data.data_dir is set) or leave "
                    "data.data_dir unset")  # fmt: skip
        else:
            need = "be callable with no arguments"
        raise ValueError(
            f"the {kind} factory {name!r} must {need}: bbdrop calls it as {name}({call}) ({err})"
        ) from None


def _one_line(err: BaseException, with_type: bool = True) -> str:
    """``Type: first line of the message`` (the message alone without ``with_type``)."""
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else ""
    if not with_type:
        return text or type(err).__name__
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _a(value: object) -> str:
    """What ``value`` is, for messages: ``None``, ``an int``, ``a numpy.ndarray``."""
    if value is None:
        return "None"
    t = type(value)
    kind = t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"
    return f"{'an' if kind[0] in 'aeiouAEIOU' else 'a'} {kind}"
