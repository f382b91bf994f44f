"""islet-imaging: trustworthy numbers from microscopy of iPSC → SC-islet differentiation.

Importing the package is cheap: submodules (and torch) load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Field": "islet_imaging.io",
    "PixelSize": "islet_imaging.io",
    "Origin": "islet_imaging.io",
    "read_field": "islet_imaging.io",
    "read_fields": "islet_imaging.io",
    "write_ome_tiff": "islet_imaging.io",
    "write_labels": "islet_imaging.io",
    "read_labels": "islet_imaging.io",
    "get_stage": "islet_imaging.stages",
    "list_stages": "islet_imaging.stages",
    "load_stages": "islet_imaging.stages",
    "StageProfile": "islet_imaging.stages",
    "Labels": "islet_imaging.segment",
    "segment_field": "islet_imaging.segment",
    "InputError": "islet_imaging.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'islet_imaging' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
