"""Lazy public APIs: a package lists its names once and loads each submodule on first use.

The same idea as scientific-python's ``lazy_loader.attach``, kept here so ``import islet_imaging``
stays cheap (no torch, no pandas) without another dependency.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["attach"]


def attach(
    package: str, names: Mapping[str, str], *, eager: Mapping[str, Any] | None = None
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for a package whose public names live in submodules.

    Parameters
    ----------
    package : str
        The package's ``__name__``, for error messages.
    names : mapping of str to str
        Public name → the module that defines it.
    eager : mapping, optional
        Names the package already defines itself (listed in ``__all__`` too).

    Examples
    --------
    >>> getattr_, dir_, all_ = attach("pkg", {"sqrt": "math"})
    >>> getattr_("sqrt")(4.0)
    2.0
    """
    public = sorted({*names, *(eager or {})})

    def __getattr__(name: str) -> Any:
        if name in names:
            return getattr(importlib.import_module(names[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return list(public)

    return __getattr__, __dir__, public
