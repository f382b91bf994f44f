"""Reading and writing fields, label images and plates.

Every reader returns a :class:`Field` with axes (C, Z, Y, X); nothing downstream reads files.
Submodules load on first use.
"""

from __future__ import annotations

from islet_imaging._lazy import attach
from islet_imaging.io._field import Field, Origin, PixelSize

_LAZY = {
    # readers (islet_imaging/io/_readers.py)
    "read_field": "islet_imaging.io._readers",
    "read_fields": "islet_imaging.io._readers",
    "read_labels": "islet_imaging.io._readers",
    "as_czyx": "islet_imaging.io._readers",
    # writers (islet_imaging/io/_writers.py)
    "write_ome_tiff": "islet_imaging.io._writers",
    "write_labels": "islet_imaging.io._writers",
    # plates (islet_imaging/io/_plate.py)
    "PlateMap": "islet_imaging.io._plate",
    "read_plate_map": "islet_imaging.io._plate",
    "discover_images": "islet_imaging.io._plate",
    "parse_plate_name": "islet_imaging.io._plate",
}

__getattr__, __dir__, __all__ = attach(
    __name__, _LAZY, eager={"Field": Field, "Origin": Origin, "PixelSize": PixelSize}
)
