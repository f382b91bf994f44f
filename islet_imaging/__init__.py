"""islet-imaging: trustworthy numbers from microscopy of iPSC → SC-islet differentiation.

Importing the package is cheap: submodules (and torch) load on first use.
"""

from __future__ import annotations

from islet_imaging._lazy import attach

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

__getattr__, __dir__, __all__ = attach(__name__, _LAZY, eager={"__version__": __version__})
