"""A timm-style registry of named model variants.

Each variant is a function decorated with :func:`register_model` that builds the architecture
(never loads weights: weights come from :mod:`encoder.checkpoint`). The function's name is the
variant's name, so ``create_model("lvm_tiny")`` and ``lvm_tiny()`` build the same thing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

_ENTRYPOINTS: dict[str, Callable[..., nn.Module]] = {}

F = TypeVar("F", bound=Callable[..., Any])


class UnknownModelError(KeyError):
    """Raised when a variant name is not in the registry."""


def register_model(fn: F) -> F:
    """Register ``fn`` as the builder of the variant named ``fn.__name__``.

    Parameters
    ----------
    fn
        A function ``fn(**overrides) -> nn.Module`` that builds the architecture only.

    Returns
    -------
    The unchanged function, so it can still be called directly.
    """
    name = fn.__name__
    if name in _ENTRYPOINTS and _ENTRYPOINTS[name] is not fn:
        raise ValueError(f"model variant {name!r} is registered twice")
    _ENTRYPOINTS[name] = fn
    return fn


def list_models() -> list[str]:
    """Names of all registered variants, sorted."""
    return sorted(_ENTRYPOINTS)


def create_model(name: str, **overrides: Any) -> Any:
    """Build the architecture of a registered variant, with random weights.

    Parameters
    ----------
    name
        A name from :func:`list_models`.
    **overrides
        Config fields to change (e.g. ``img_size=64``, ``drop_path_rate=0.0``).

    Raises
    ------
    UnknownModelError
        If ``name`` is not registered.
    """
    try:
        builder = _ENTRYPOINTS[name]
    except KeyError:
        raise UnknownModelError(f"unknown model {name!r}; known: {', '.join(list_models())}") from None
    return builder(**overrides)
