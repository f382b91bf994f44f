"""The Field: one field of view with axes (C, Z, Y, X), channel names, pixel size and origin."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from islet_imaging.errors import InputError

__all__ = ["Field", "Origin", "PixelSize"]


@dataclass(frozen=True)
class PixelSize:
    """Physical size of one voxel in µm, per axis. ``z`` is ``None`` for a single plane."""

    x: float
    y: float
    z: float | None = None

    def __post_init__(self) -> None:
        for name in ("x", "y", "z"):
            value = getattr(self, name)
            if value is None and name == "z":
                continue
            if value is None or not math.isfinite(float(value)) or float(value) <= 0:
                raise InputError(
                    f"pixel size {name}={value!r} µm is not a positive finite number; "
                    "give the pixel size in µm (e.g. --pixel-size 0.65)"
                )

    @property
    def yx(self) -> tuple[float, float]:
        """``(y, x)`` spacing in µm."""
        return (float(self.y), float(self.x))

    @property
    def zyx(self) -> tuple[float, float, float]:
        """``(z, y, x)`` spacing in µm; ``z`` falls back to ``x`` when unknown."""
        return (float(self.z if self.z is not None else self.x), float(self.y), float(self.x))

    @property
    def isotropic_xy(self) -> float:
        """The mean of x and y, the scale used for in-plane rescaling."""
        return 0.5 * (float(self.x) + float(self.y))


@dataclass(frozen=True)
class Origin:
    """Where a field came from. Every part is optional."""

    path: Path | None = None
    plate: str | None = None
    well: str | None = None
    field: int | None = None
    stage: str | None = None
    series: int | None = None

    @property
    def name(self) -> str:
        """A short name for tables and file names: the file stem without ``.ome``; for an image
        inside an OME-Zarr HCS plate, its well and field (``B03_f1``)."""
        from islet_imaging.io._plate import hcs_position

        hcs = None if self.path is None else hcs_position(self.path)
        if self.path is None or hcs is not None:
            parts = [p for p in (self.well, None if self.field is None else f"f{self.field}") if p]
            return "_".join(parts) or "field"
        name = Path(self.path).name
        for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr", ".tiff", ".tif", ".png", ".zarr"):
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)]
                break
        if self.series:
            name = f"{name}_s{self.series}"
        return name


@dataclass(frozen=True, eq=False)
class Field:
    """One field of view.

    Parameters
    ----------
    data : (C, Z, Y, X) ndarray
        Pixel data. Z is 1 for a 2D field. Any real dtype; readers keep the file's dtype.
    channel_names : tuple of str
        One unique name per channel, e.g. ``("DAPI", "NKX6.1", "INS")``.
    pixel_size : PixelSize or None
        Physical voxel size in µm; ``None`` when unknown (then operations that need µm ask for it).
    origin : Origin
        Path, plate, well, field index and stage.
    metadata : dict
        Anything else a reader found (microscope, objective, acquisition date).

    Examples
    --------
    >>> import numpy as np
    >>> f = Field(np.zeros((2, 1, 8, 8), np.uint16), ("DAPI", "INS"), PixelSize(0.5, 0.5))
    >>> f.channel("INS").shape
    (1, 8, 8)
    """

    data: np.ndarray
    channel_names: tuple[str, ...]
    pixel_size: PixelSize | None = None
    origin: Origin = field(default_factory=Origin)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = self.origin.path
        data = self.data
        if not isinstance(data, np.ndarray):
            data = np.asarray(data)
            object.__setattr__(self, "data", data)
        if data.ndim != 4:
            raise InputError(
                f"field data must have 4 axes (C, Z, Y, X), got shape {data.shape}; "
                "use islet_imaging.io.as_czyx(array, axes) to reorder",
                where,
            )
        if data.size == 0:
            raise InputError(f"image has no pixels (shape {data.shape})", where)
        if data.dtype.kind not in "uif" or data.dtype == np.float16:
            raise InputError(
                f"pixel type {data.dtype} is not supported; convert to an integer or float32 image",
                where,
            )
        names = tuple(str(n) for n in self.channel_names)
        object.__setattr__(self, "channel_names", names)
        if len(names) != data.shape[0]:
            raise InputError(
                f"{len(names)} channel names {names} for {data.shape[0]} channels; "
                "give exactly one name per channel",
                where,
            )
        if len(set(n.casefold() for n in names)) != len(names):
            raise InputError(f"channel names {names} are not unique", where)

    # -- shape -------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.data.shape)  # type: ignore[return-value]

    @property
    def n_channels(self) -> int:
        return int(self.data.shape[0])

    @property
    def is_3d(self) -> bool:
        """True for a z-stack (more than one plane)."""
        return int(self.data.shape[1]) > 1

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        """``(Z, Y, X)``."""
        return tuple(self.data.shape[1:])  # type: ignore[return-value]

    @property
    def name(self) -> str:
        return self.origin.name

    # -- channels ----------------------------------------------------------------------------
    def channel_index(self, name: str) -> int:
        """Index of the channel called ``name`` (case-insensitive).

        Raises
        ------
        InputError
            If there is no such channel; the message lists the channels present.
        """
        for i, n in enumerate(self.channel_names):
            if n.casefold() == str(name).casefold():
                return i
        raise InputError(
            f"channel {name!r} is not in this image; its channels are {list(self.channel_names)}. "
            "Pass --channel-names to name them, or choose a stage whose markers match",
            self.origin.path,
        )

    def has_channel(self, name: str) -> bool:
        return any(n.casefold() == str(name).casefold() for n in self.channel_names)

    def channel(self, name: str) -> np.ndarray:
        """The ``(Z, Y, X)`` plane stack of one channel."""
        return self.data[self.channel_index(name)]

    # -- units -------------------------------------------------------------------------------
    def require_pixel_size(self) -> PixelSize:
        """The pixel size, or a clear error when it is unknown."""
        if self.pixel_size is None:
            raise InputError(
                "this image has no pixel size; give it in µm (e.g. --pixel-size 0.65) "
                "or write it into the file's metadata",
                self.origin.path,
            )
        return self.pixel_size

    def with_data(self, data: np.ndarray, **changes: Any) -> Field:
        """A copy with new pixel data (and optionally other fields replaced)."""
        return replace(self, data=data, **changes)
