"""The registry of network factories: ``register_model``, ``create_model``, ``list_models``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

__all__ = ["create_model", "get_model_factory", "list_models", "register_model"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}

F = TypeVar("F", bound=Callable[..., nn.Module])


def register_model(name: str) -> Callable[[F], F]:
    """Function decorator that makes a factory available to :func:`create_model` by ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")

    def decorator(factory: F) -> F:
        if name in _MODELS:
            raise ValueError(
                f"model name {name!r} is already registered to {_MODELS[name].__qualname__}"
            )
        if not callable(factory):
            raise TypeError(f"register_model expects a callable factory, got {factory!r}")
        _MODELS[name] = factory
        return factory

    return decorator


def get_model_factory(name: str) -> Callable[..., nn.Module]:
    """The factory registered under ``name``; ValueError listing the names otherwise."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(_MODELS))}")
    return _MODELS[name]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the network registered as ``name``; ``kwargs`` go to its factory."""
    return get_model_factory(name)(**kwargs)


def list_models() -> list[str]:
    """Names of the registered networks, sorted."""
    return sorted(_MODELS)


def check_num_classes(num_classes: int) -> int:
    """ValueError unless ``num_classes`` is an int >= 2."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    return num_classes
