"""Reading images into :class:`~islet_imaging.io.Field` objects and label images into arrays.

Supported inputs
----------------
OME-TIFF (``.ome.tif``, ``.ome.tiff``)
    Channel names from ``Channel/@Name``; pixel size from ``PhysicalSizeX/Y/Z`` converted to µm from
    their ``PhysicalSize*Unit`` (µm when absent, as the OME schema says); the axes of each series in
    any ``DimensionOrder``; the origin written by :func:`islet_imaging.io.write_ome_tiff`.
ImageJ hyperstacks (``.tif`` written by Fiji / ImageJ)
    Axes from the ImageJ metadata; x / y pixel size from the TIFF ``XResolution`` / ``YResolution``
    tags and z from ``spacing``, all in the ImageJ ``unit`` (µm, micron, um, nm, mm, ...); channel
    names from the slice ``Labels`` when they name the channels consistently.
Plain TIFF and PNG
    Channel names and pixel size come from the caller. 2D gray images have one channel; RGB(A) PNGs
    have one channel per colour (a fully opaque alpha channel is dropped). A plain TIFF's pixel size is
    taken from its resolution tags only when their unit is a metric length (centimetre, millimetre,
    micrometre); inch-based resolutions (72 dpi, ...) are ignored. A stack with one axis of unknown
    meaning (a plain multi-page TIFF, tifffile axes ``Q`` / ``I``) is read as **channels** when the
    caller gives exactly that many ``channel_names`` and as **Z** otherwise; pass ``axes=`` (e.g.
    ``"CYX"``) to say what the axes are.
OME-Zarr images (``.ome.zarr`` / ``.zarr`` folders, NGFF 0.4 and 0.5)
    The full-resolution level; axes and the ``scale`` transform (converted to µm from the axis units;
    a spatial axis without a unit gives no pixel size), channel names from ``omero.channels[].label``.
    HCS plate / well groups are refused with a pointer to one image inside them.

Time-lapse data is not analysed: a time axis of length 1 is dropped, and an image with more than one
timepoint is refused with an :class:`~islet_imaging.errors.InputError` saying to save each timepoint
as its own file (a silent choice of one timepoint would give numbers for the wrong frame).

Every problem with a file raises :class:`~islet_imaging.errors.ImageReadError` (a subclass of
:class:`~islet_imaging.errors.InputError`) naming the file and saying what to do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from islet_imaging.errors import ImageReadError, InputError
from islet_imaging.io._field import Field, Origin, PixelSize

__all__ = [
    "as_czyx",
    "read_field",
    "read_fields",
    "read_labels",
    "zarr_attributes",
]

log = logging.getLogger(__name__)

#: Axis letters understood by :func:`as_czyx`: channel, z, y, x, time, sample (RGB), and unknown
#: (``Q``, ``I``: tifffile's names for an axis of unknown meaning / an image sequence).
AXES_LETTERS = "CZYXTSQI"

#: Length units → factor to µm (OME ``UnitsLength`` symbols and ImageJ spellings).
_UNIT_TO_UM: dict[str, float] = {
    "m": 1e6,
    "dm": 1e5,
    "cm": 1e4,
    "mm": 1e3,
    "µm": 1.0,
    "μm": 1.0,  # Greek small letter mu
    "um": 1.0,
    "micron": 1.0,
    "microns": 1.0,
    "micrometer": 1.0,
    "micrometre": 1.0,
    "\\u00b5m": 1.0,  # as escaped in ImageJ descriptions
    "meter": 1e6,
    "metre": 1e6,
    "centimeter": 1e4,
    "centimetre": 1e4,
    "millimeter": 1e3,
    "millimetre": 1e3,
    "nm": 1e-3,
    "nanometer": 1e-3,
    "nanometre": 1e-3,
    "pm": 1e-6,
    "picometer": 1e-6,
    "å": 1e-4,
    "angstrom": 1e-4,
}

#: TIFF ResolutionUnit tag value → µm per unit; 1 (none) and 2 (inch, mostly a 72 / 300 dpi
#: default of non-microscopy software) give no pixel size.
_UM_PER_RESOLUTION_UNIT: dict[int, float] = {3: 1e4, 4: 1e3, 5: 1.0}


@dataclass
class _Raw:
    """An image as found in a file, before reordering: array, axes and what the file says."""

    data: np.ndarray
    axes: str
    fmt: str
    series: int
    n_series: int
    channel_names: list[str | None] | None = None
    spacing_um: dict[str, float | None] = field(default_factory=dict)  # keys "x", "y", "z"
    origin: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


# -- public API ------------------------------------------------------------------------------
def read_field(
    path: str | os.PathLike[str],
    *,
    channel_names: Sequence[str] | str | None = None,
    pixel_size: PixelSize | float | Sequence[float] | None = None,
    z_step: float | None = None,
    series: int = 0,
    stage: str | None = None,
    plate: str | None = None,
    well: str | None = None,
    field: int | None = None,
    axes: str | None = None,
) -> Field:
    """Read one image (one series of a file) as a :class:`Field` with axes (C, Z, Y, X).

    Parameters
    ----------
    path : path-like
        An OME-TIFF, ImageJ TIFF, plain TIFF, PNG or OME-Zarr image.
    channel_names : sequence of str or str, optional
        One name per channel, overriding the names in the file (a string is split on ``|`` or
        ``,``). Without names from the caller or the file, channels are called ``C0``, ``C1``, ...
    pixel_size : PixelSize, float or tuple of float, optional
        Pixel size in µm, overriding the file's: a float sets x = y (z is kept from the file); a
        tuple follows the array axes like scikit-image's ``spacing``: ``(y, x)`` or ``(z, y, x)``.
        Without it, the file's pixel size is used, or ``None`` when the file has none.
    z_step : float, optional
        µm between the planes of a z-stack, overriding the file's (most TIFFs from a microscope's
        export lack it); needs a lateral pixel size from the file or ``pixel_size``. Ignored for
        a single plane.
    series : int, optional
        Which image of a multi-image file to read (0-based).
    stage, plate, well, field : optional
        Origin of the image. Unset parts come from the metadata written by
        :func:`~islet_imaging.io.write_ome_tiff`, then from plate-style file names
        ``<WELL>_f<FIELD>...`` (``B3_f2.ome.tif`` → well ``"B03"``, field 2).
    axes : str, optional
        The file's axes (e.g. ``"CYX"``, ``"ZYX"``) for plain TIFFs whose metadata does not say.

    Returns
    -------
    Field
        ``data`` is ``(C, Z, Y, X)`` in the file's dtype.

    Raises
    ------
    ImageReadError
        If the file is missing, a folder, corrupt, truncated, of an unsupported type, has no pixels,
        has non-finite pixel values, or its axes cannot be understood.
    InputError
        If the given channel names or pixel size do not fit the image.

    Examples
    --------
    >>> field = read_field("plate/B03_f1.ome.tif")  # doctest: +SKIP
    >>> field.channel_names, field.pixel_size.x, field.origin.well  # doctest: +SKIP
    (('DAPI', 'INS'), 0.65, 'B03')
    """
    src, fmt = _check_source(path)
    raws = _read_raw(src, fmt, series=int(series) if _is_int(series) else series)
    return _to_field(
        raws[0],
        src,
        channel_names=channel_names,
        pixel_size=pixel_size,
        z_step=z_step,
        stage=stage,
        plate=plate,
        well=well,
        field=field,
        axes=axes,
    )


def read_fields(
    path: str | os.PathLike[str],
    *,
    channel_names: Sequence[str] | str | None = None,
    pixel_size: PixelSize | float | Sequence[float] | None = None,
    z_step: float | None = None,
    stage: str | None = None,
    plate: str | None = None,
    well: str | None = None,
    field: int | None = None,
    axes: str | None = None,
) -> list[Field]:
    """Read every image (series) of a file; see :func:`read_field` for the parameters.

    Returns
    -------
    list of Field
        One field per series, in file order; ``origin.series`` is the series index when the file
        holds more than one.
    """
    src, fmt = _check_source(path)
    raws = _read_raw(src, fmt, series=None)
    return [
        _to_field(
            raw,
            src,
            channel_names=channel_names,
            pixel_size=pixel_size,
            z_step=z_step,
            stage=stage,
            plate=plate,
            well=well,
            field=field,
            axes=axes,
        )
        for raw in raws
    ]


def read_labels(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an instance label image as a ``(Z, Y, X)`` int32 array.

    Accepts label images written by :func:`~islet_imaging.io.write_labels` and plain integer TIFF /
    PNG label images (0 = background). Float images are accepted only when every value is a whole
    number.

    Parameters
    ----------
    path : path-like
        The label image.

    Returns
    -------
    (Z, Y, X) ndarray of int32
        Z is 1 for a 2D label image.

    Raises
    ------
    ImageReadError
        If the file cannot be read, has more than one channel, or holds negative, fractional or
        non-finite values, or labels too large for int32.
    """
    src, fmt = _check_source(path)
    raw = _read_raw(src, fmt, series=0)[0]
    data = raw.data
    if data.size == 0:
        raise ImageReadError(f"label image has no pixels (shape {data.shape})", src)
    if raw.fmt == "png" and "S" in raw.axes:
        raise ImageReadError(
            f"label image has {data.shape[-1]} colour channels; save instance labels as a "
            "single-channel integer image (0 = background, 1, 2, ... = objects)",
            src,
        )
    data, axes = _resolve_axes(data, raw.axes, src, n_names=None, hint=None, labels=True)
    try:
        czyx = as_czyx(data, axes)
    except InputError as exc:
        raise ImageReadError(exc.reason, src) from exc
    if czyx.shape[0] != 1:
        raise ImageReadError(
            f"label image has {czyx.shape[0]} channels; expected a single-channel label image",
            src,
        )
    labels = czyx[0]
    if labels.dtype == bool:
        return labels.astype(np.int32)
    if labels.dtype.kind == "f":
        finite = np.isfinite(labels)
        if not finite.all():
            raise ImageReadError(
                f"label image has {int((~finite).sum())} NaN or infinite values; "
                "labels must be whole numbers (0 = background)",
                src,
            )
        if not np.array_equal(labels, np.round(labels)):
            raise ImageReadError(
                f"label image holds non-integer values (dtype {labels.dtype}); this looks like an "
                "intensity or probability image, not instance labels",
                src,
            )
    elif labels.dtype.kind not in "ui":
        raise ImageReadError(f"label image has unsupported type {labels.dtype}", src)
    low, high = (labels.min().item(), labels.max().item())
    if low < 0:
        raise ImageReadError(
            f"label image has negative values (min {low}); background must be 0", src
        )
    if high > np.iinfo(np.int32).max:
        raise ImageReadError(
            f"largest label {high} does not fit in int32; relabel the objects sequentially", src
        )
    return np.ascontiguousarray(labels, dtype=np.int32)


def as_czyx(array: np.ndarray, axes: str) -> np.ndarray:
    """Reorder an array with named axes to ``(C, Z, Y, X)``.

    Missing ``C`` and ``Z`` axes are inserted with length 1; singleton ``T``, ``S``, ``Q`` and
    ``I`` axes are dropped; a sample axis ``S`` (RGB) becomes the channel axis (when there is also a
    ``C`` axis, channels and samples are combined, channel-major).

    Parameters
    ----------
    array : ndarray
        Data with ``array.ndim == len(axes)``.
    axes : str
        One letter per axis of ``array`` from ``CZYXTSQI`` (case-insensitive), e.g. ``"YXC"``,
        ``"ZCYX"``, ``"TZCYXS"``. ``Y`` and ``X`` are required.

    Returns
    -------
    (C, Z, Y, X) ndarray
        A view of ``array`` when possible.

    Raises
    ------
    InputError
        For unknown or repeated letters, a length mismatch, missing ``Y`` / ``X``, or a ``T``,
        ``Q`` or ``I`` axis longer than 1.

    Examples
    --------
    >>> as_czyx(np.zeros((4, 5, 3)), "YXC").shape
    (3, 1, 4, 5)
    >>> as_czyx(np.zeros((1, 6, 2, 4, 5)), "TZCYX").shape
    (2, 6, 4, 5)
    """
    arr = np.asarray(array)
    if not isinstance(axes, str):
        raise InputError(f"axes must be a string such as 'CZYX', got {axes!r}")
    axes = axes.upper()
    unknown = sorted({a for a in axes if a not in AXES_LETTERS})
    if unknown:
        raise InputError(
            f"unknown axis letter(s) {unknown} in axes {axes!r}; use letters from "
            f"{AXES_LETTERS!r} (C channel, Z, Y, X, T time, S RGB sample, Q/I unknown)"
        )
    repeated = sorted({a for a in axes if axes.count(a) > 1})
    if repeated:
        raise InputError(
            f"axis letter(s) {repeated} repeated in axes {axes!r}; name each axis once"
        )
    if len(axes) != arr.ndim:
        raise InputError(
            f"axes {axes!r} name {len(axes)} axes but the array has {arr.ndim} "
            f"(shape {arr.shape}); give one letter per axis"
        )
    if "Y" not in axes or "X" not in axes:
        raise InputError(
            f"image with axes {axes!r} and shape {arr.shape} has too few dimensions: "
            "an image needs Y and X axes"
        )
    sizes = dict(zip(axes, arr.shape, strict=True))
    if sizes.get("T", 1) > 1:
        raise InputError(
            f"image has {sizes['T']} timepoints (axes {axes!r}, shape {arr.shape}); time-lapse is "
            "not analysed: save each timepoint as its own image"
        )
    for letter in "QI":
        if sizes.get(letter, 1) > 1:
            raise InputError(
                f"axis {letter!r} of length {sizes[letter]} has unknown meaning (axes {axes!r}, "
                f"shape {arr.shape}); say what it is, e.g. axes='CYX' or 'ZYX'"
            )
    # drop singleton T / Q / I / S
    keep = [i for i, a in enumerate(axes) if not (a in "TQIS" and arr.shape[i] == 1)]
    arr = arr.reshape([arr.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    if "S" in axes:
        if "C" not in axes:
            axes = axes.replace("S", "C")
        else:
            # combine channels and samples (channel-major) into one channel axis
            order = [axes.index(a) for a in axes if a not in "CS"]
            order = [axes.index("C"), axes.index("S"), *order]
            arr = arr.transpose(order)
            rest = "".join(axes[i] for i in order[2:])
            arr = arr.reshape((arr.shape[0] * arr.shape[1], *arr.shape[2:]))
            axes = "C" + rest
    for letter in "CZ":
        if letter not in axes:
            arr = arr[np.newaxis]
            axes = letter + axes
    return arr.transpose([axes.index(a) for a in "CZYX"])


# -- sources ---------------------------------------------------------------------------------
def _check_source(path: str | os.PathLike[str]) -> tuple[Path, str]:
    """The path and its format (``"tiff"``, ``"png"``, ``"zarr"``), or a clear error."""
    try:
        src = Path(os.fspath(path)).expanduser()
    except TypeError as exc:
        raise ImageReadError(f"expected a file path, got {type(path).__name__} {path!r}") from exc
    name = src.name.lower()
    is_zarr = name.endswith(".zarr") or (
        src.is_dir() and ((src / "zarr.json").exists() or (src / ".zattrs").exists())
    )
    if not src.exists():
        hint = ""
        if not src.parent.exists():
            hint = f" (the folder {src.parent} does not exist either)"
        raise ImageReadError(f"file not found{hint}; check the path and its spelling", src)
    if is_zarr:
        if not src.is_dir():
            raise ImageReadError("an OME-Zarr image must be a folder, this is a file", src)
        return src, "zarr"
    if src.is_dir():
        raise ImageReadError(
            "is a folder, not an image file; give an image file, or use "
            "`islet-imaging info FOLDER` / islet_imaging.io.discover_images to list its images",
            src,
        )
    if name.endswith((".tif", ".tiff")):
        return src, "tiff"
    if name.endswith(".png"):
        return src, "png"
    suffix = "".join(src.suffixes[-2:]) or "(none)"
    raise ImageReadError(
        f"unsupported file type {suffix!r}; supported: OME-TIFF / TIFF (.tif, .tiff), PNG (.png) "
        "and OME-Zarr (.zarr folders). Convert the image (e.g. in Fiji: File > Save As > OME-TIFF)",
        src,
    )


def _read_raw(src: Path, fmt: str, *, series: int | None) -> list[_Raw]:
    if series is not None and (not _is_int(series) or series < 0):
        raise InputError(f"series must be a non-negative integer, got {series!r}", src)
    if fmt == "tiff":
        return _read_tiff(src, series)
    if fmt == "png":
        if series not in (None, 0):
            raise InputError(f"a PNG holds a single image; series={series} does not exist", src)
        return [_read_png(src)]
    return _read_zarr(src, series)


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


# -- TIFF ------------------------------------------------------------------------------------
class _ThreadErrors(logging.Handler):
    """Collects error records that tifffile logs (instead of raising) in the current thread."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())


@contextlib.contextmanager
def _tifffile_errors(src: Path) -> Iterator[_ThreadErrors]:
    """Turn tifffile / decoder exceptions into :class:`ImageReadError` and collect logged errors."""
    import tifffile

    handler = _ThreadErrors()
    tlog = logging.getLogger("tifffile")
    tlog.addHandler(handler)
    try:
        yield handler
    except InputError:
        raise
    except tifffile.TiffFileError as exc:
        raise ImageReadError(
            f"not a readable TIFF file (corrupt, truncated or another format): {exc}. "
            "Re-export the image from its source",
            src,
        ) from exc
    except (ValueError, OSError, EOFError, IndexError, KeyError, RuntimeError) as exc:
        raise ImageReadError(
            f"cannot read the image data ({type(exc).__name__}: {exc}); the file is probably "
            "damaged or truncated. Re-export or copy it again",
            src,
        ) from exc
    except Exception as exc:  # decoder errors from imagecodecs have their own classes
        if type(exc).__module__.startswith(("imagecodecs", "tifffile")):
            raise ImageReadError(
                f"cannot decode the image data ({type(exc).__name__}: {exc}); the file is "
                "probably damaged or truncated. Re-export or copy it again",
                src,
            ) from exc
        raise
    finally:
        tlog.removeHandler(handler)


def _read_tiff(src: Path, series: int | None) -> list[_Raw]:
    import tifffile

    size = src.stat().st_size
    if size == 0:
        raise ImageReadError("file is empty (0 bytes); copy or export it again", src)
    out: list[_Raw] = []
    with _tifffile_errors(src) as errors, tifffile.TiffFile(src) as tif:
        all_series = list(tif.series)
        n = len(all_series)
        if n == 0:
            raise ImageReadError("TIFF file holds no image", src)
        if series is not None and series >= n:
            raise InputError(
                f"series={series} does not exist; the file has {n} image series (0 to {n - 1})",
                src,
            )
        fmt = "ome-tiff" if tif.is_ome else "imagej" if tif.is_imagej else "tiff"
        ome_images = _ome_images(tif.ome_metadata) if fmt == "ome-tiff" else []
        indices = range(n) if series is None else [series]
        for i in indices:
            s = all_series[i]
            _check_extents(s, size, src)
            data = s.asarray()
            raw = _Raw(data=data, axes=str(s.axes), fmt=fmt, series=i, n_series=n)
            if fmt == "ome-tiff":
                image = _match_ome_image(ome_images, i, n, getattr(s, "name", None))
                if image is not None:
                    _apply_ome_image(raw, image, src)
            elif fmt == "imagej":
                _apply_imagej(raw, tif.imagej_metadata or {}, s.keyframe, src)
            else:
                _apply_resolution_tags(raw, s.keyframe)
            out.append(raw)
        if errors.messages:
            raise ImageReadError(
                "the TIFF file is damaged or truncated (" + "; ".join(errors.messages[:3]) + "); "
                "copy or export it again",
                src,
            )
    return out


def _check_extents(series: Any, size: int, src: Path) -> None:
    """Refuse a series whose pixel data would lie past the end of the file (truncated file)."""
    for page in series.pages:
        if page is None:
            continue
        offsets = getattr(page, "dataoffsets", ()) or ()
        counts = getattr(page, "databytecounts", ()) or ()
        for offset, count in zip(offsets, counts, strict=False):
            if count and offset + count > size:
                raise ImageReadError(
                    f"the file is truncated: image data ends at byte {offset + count} but the file "
                    f"has {size} bytes; copy or export it again",
                    src,
                )


def _ome_images(xml: str | None) -> list[tuple[ET.Element, dict[str, str]]]:
    """The OME ``Image`` elements with the origin from their islet-imaging map annotation."""
    if not xml:
        return []
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        log.warning("cannot parse the OME-XML metadata; ignoring it")
        return []
    namespace = _origin_namespace()
    origins: dict[str, dict[str, str]] = {}
    for el in root.iter():
        if _local(el.tag) == "MapAnnotation" and el.get("Namespace") == namespace:
            origins[el.get("ID", "")] = {
                m.get("K", ""): (m.text or "").strip()
                for m in el.iter()
                if _local(m.tag) == "M" and m.get("K")
            }
    images = []
    for image in (el for el in root if _local(el.tag) == "Image"):
        origin: dict[str, str] = {}
        for ref in image:
            if _local(ref.tag) == "AnnotationRef":
                origin.update(origins.get(ref.get("ID", ""), {}))
        images.append((image, origin))
    return images


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _match_ome_image(
    images: list[tuple[ET.Element, dict[str, str]]], index: int, n_series: int, name: str | None
) -> tuple[ET.Element, dict[str, str]] | None:
    if len(images) == n_series:
        return images[index]
    named = [im for im in images if name and im[0].get("Name") == name]
    if len(named) == 1:
        return named[0]
    return images[index] if index < len(images) else None


def _apply_ome_image(raw: _Raw, image_origin: tuple[ET.Element, dict[str, str]], src: Path) -> None:
    image, origin = image_origin
    raw.origin.update(origin)
    pixels = next((el for el in image if _local(el.tag) == "Pixels"), None)
    if pixels is None:
        return
    raw.metadata["dimension_order"] = pixels.get("DimensionOrder")
    if image.get("Name"):
        raw.metadata["image_name"] = image.get("Name")
    for axis in "XYZ":
        value = pixels.get(f"PhysicalSize{axis}")
        unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
        raw.spacing_um[axis.lower()] = _to_um(value, unit, src, f"PhysicalSize{axis}")
    channels = [el for el in pixels if _local(el.tag) == "Channel"]
    names: list[str | None] = []
    for ch in channels:
        spp = int(ch.get("SamplesPerPixel", "1") or 1)
        name = ch.get("Name") or None
        names.extend([name] if spp <= 1 else [None] * spp)
    raw.channel_names = names or None


def _origin_namespace() -> str:
    from islet_imaging.io._writers import ORIGIN_NAMESPACE

    return ORIGIN_NAMESPACE


def _to_um(value: Any, unit: str | None, src: Path, what: str) -> float | None:
    """A length in µm, or None when absent, zero, not a number or in a non-length unit."""
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        log.warning("%s: ignoring %s=%r (not a number)", src, what, value)
        return None
    key = (unit or "µm").strip().lower()
    factor = _UNIT_TO_UM.get(key)
    if factor is None:
        if key not in ("pixel", "pixels", "px", "", "inch", "referenceframe"):
            log.warning("%s: ignoring %s in unknown unit %r", src, what, unit)
        return None
    if not math.isfinite(number) or number <= 0:
        log.warning("%s: ignoring %s=%r (not a positive number)", src, what, value)
        return None
    return number * factor


def _apply_imagej(raw: _Raw, meta: dict[str, Any], page: Any, src: Path) -> None:
    unit = meta.get("unit")
    if isinstance(unit, bytes):
        unit = unit.decode("latin-1")
    unit = str(unit) if unit is not None else None
    raw.metadata["imagej_unit"] = unit
    if page is not None and unit is not None:
        for axis, tag in (("x", "XResolution"), ("y", "YResolution")):
            resolution = _resolution(page, tag)
            if resolution:
                raw.spacing_um[axis] = _to_um(1.0 / resolution, unit, src, tag)
    if unit is not None and "spacing" in meta:
        raw.spacing_um["z"] = _to_um(meta.get("spacing"), unit, src, "spacing")
    labels = meta.get("Labels")
    n_channels = int(meta.get("channels", 1) or 1)
    if isinstance(labels, list | tuple) and len(labels) >= n_channels:
        # slice labels are in ImageJ plane order (C fastest): the first C name the channels
        names = [str(x).strip() or None for x in labels[:n_channels]]
        consistent = all(
            str(labels[i]).strip() == str(labels[i % n_channels]).strip()
            for i in range(len(labels))
        )
        if consistent and all(names) and len(set(names)) == len(names):
            raw.channel_names = list(names)


def _resolution(page: Any, tag_name: str) -> float | None:
    tag = page.tags.get(tag_name)
    if tag is None:
        return None
    value = tag.value
    try:
        num, den = (value if isinstance(value, tuple) else (value, 1))[:2]
        res = float(num) / float(den)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return res if math.isfinite(res) and res > 0 else None


def _apply_resolution_tags(raw: _Raw, page: Any) -> None:
    """Pixel size from resolution tags with a metric unit (cm, mm, µm)."""
    if page is None:
        return
    unit_tag = page.tags.get("ResolutionUnit")
    um_per_unit = _UM_PER_RESOLUTION_UNIT.get(int(unit_tag.value)) if unit_tag is not None else None
    if um_per_unit is None:
        return
    for axis, tag in (("x", "XResolution"), ("y", "YResolution")):
        resolution = _resolution(page, tag)
        if resolution:
            raw.spacing_um[axis] = um_per_unit / resolution


# -- PNG -------------------------------------------------------------------------------------
def _read_png(src: Path) -> _Raw:
    import imageio.v3 as iio

    if src.stat().st_size == 0:
        raise ImageReadError("file is empty (0 bytes); copy or export it again", src)
    try:
        # decode from bytes: imageio leaks file handles when a corrupt file fails every plugin
        data = np.asarray(iio.imread(src.read_bytes(), extension=".png"))
    except Exception as exc:  # imageio / Pillow raise many types for corrupt files
        raise ImageReadError(
            f"not a readable PNG (corrupt, truncated or another format): {exc}. "
            "Re-export the image from its source",
            src,
        ) from exc
    if data.ndim == 2:
        axes = "YX"
    elif data.ndim == 3 and data.shape[-1] in (2, 3, 4):
        axes = "YXS"
        if data.shape[-1] in (2, 4) and data.dtype.kind == "u":
            alpha = data[..., -1]
            if np.all(alpha == np.iinfo(data.dtype).max):
                data = data[..., :-1]  # fully opaque alpha carries no information
    else:
        raise ImageReadError(f"unexpected PNG array shape {data.shape}", src)
    return _Raw(data=data, axes=axes, fmt="png", series=0, n_series=1)


# -- OME-Zarr --------------------------------------------------------------------------------
def _read_zarr(src: Path, series: int | None) -> list[_Raw]:
    attrs = zarr_attributes(src)
    if "plate" in attrs or "well" in attrs:
        raise ImageReadError(
            "this OME-Zarr is an HCS plate / well; give the path of one image inside it "
            "(e.g. PLATE.zarr/B/3/0), or give the plate to `score`, `segment` or `info` (or "
            "islet_imaging.io.discover_images), which take every field image inside it",
            src,
        )
    multiscales = attrs.get("multiscales")
    if not multiscales:
        raise ImageReadError(
            "not an OME-Zarr image (no 'multiscales' metadata); give an .ome.zarr image folder",
            src,
        )
    n = len(multiscales)
    if series is not None and series >= n:
        raise InputError(
            f"series={series} does not exist; the OME-Zarr has {n} multiscale image(s)", src
        )
    out = []
    for i in range(n) if series is None else [series]:
        out.append(_read_zarr_multiscale(src, attrs, i, n))
    return out


def zarr_attributes(src: Path) -> dict[str, Any]:
    """The OME metadata of a Zarr group (NGFF 0.4 ``.zattrs`` or 0.5 ``zarr.json``).

    Raises
    ------
    ImageReadError
        If the folder has neither file or it cannot be parsed.
    """
    for name in ("zarr.json", ".zattrs"):
        meta_path = src / name
        if meta_path.exists():
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ImageReadError(f"cannot parse {name}: {exc}", src) from exc
            attrs = meta.get("attributes", meta) if name == "zarr.json" else meta
            return attrs.get("ome", attrs)  # NGFF 0.5 nests under "ome"
    raise ImageReadError("no zarr.json or .zattrs: not an OME-Zarr folder", src)


def _read_zarr_multiscale(src: Path, attrs: dict[str, Any], index: int, n: int) -> _Raw:
    import zarr

    ms = attrs["multiscales"][index]
    try:
        datasets = ms["datasets"]
        level = datasets[0]
        group = zarr.open_group(str(src), mode="r")
        data = np.asarray(group[level["path"]][...])
        # NGFF < 0.4 has no axes: its arrays are always (t, c, z, y, x)
        axes_meta = ms.get("axes") or list("tczyx"[-data.ndim :])
        names = [str(a["name"] if isinstance(a, dict) else a).lower() for a in axes_meta]
        units = [(a.get("unit") if isinstance(a, dict) else None) for a in axes_meta]
    except Exception as exc:
        raise ImageReadError(
            f"cannot read the OME-Zarr image ({type(exc).__name__}: {exc}); the folder is "
            "incomplete or damaged",
            src,
        ) from exc
    letters = {"c": "C", "z": "Z", "y": "Y", "x": "X", "t": "T"}
    axes = "".join(letters.get(a, "Q") for a in names)
    raw = _Raw(data=data, axes=axes, fmt="ome-zarr", series=index, n_series=n)
    scale = None
    for transform in level.get("coordinateTransformations", []):
        if transform.get("type") == "scale":
            scale = transform.get("scale")
    if scale is not None and len(scale) == len(names):
        for name, unit, value in zip(names, units, scale, strict=True):
            if name not in ("x", "y", "z"):
                continue
            if unit:
                raw.spacing_um[name] = _to_um(value, unit, src, f"scale[{name}]")
            else:  # a scale without a unit is often a placeholder 1.0: do not guess µm
                log.info("%s: axis %r has no unit; its scale %r is ignored", src, name, value)
    channels = (attrs.get("omero") or {}).get("channels") or []
    if channels:
        raw.channel_names = [(c.get("label") or None) for c in channels]
    raw.metadata["ngff_version"] = ms.get("version") or attrs.get("version")
    return raw


# -- to Field --------------------------------------------------------------------------------
def _to_field(
    raw: _Raw,
    src: Path,
    *,
    channel_names: Sequence[str] | str | None,
    pixel_size: PixelSize | float | Sequence[float] | None,
    z_step: float | None,
    stage: str | None,
    plate: str | None,
    well: str | None,
    field: int | None,
    axes: str | None,
) -> Field:
    data = raw.data
    if data.size == 0:
        raise ImageReadError(
            f"image has no pixels (shape {data.shape}); the file holds an empty image", src
        )
    if data.dtype.kind == "b":
        data = data.astype(np.uint8)
    if data.dtype.kind == "c" or data.dtype.kind not in "uif":
        raise ImageReadError(
            f"pixel type {data.dtype} is not supported; save the image as integer or float32", src
        )
    if data.dtype == np.float16:
        data = data.astype(np.float32)
    given_names = _split_names(channel_names)
    file_axes = raw.axes
    data, resolved = _resolve_axes(
        data,
        file_axes,
        src,
        n_names=None if given_names is None else len(given_names),
        hint=axes,
    )
    try:
        czyx = np.ascontiguousarray(as_czyx(data, resolved))
    except InputError as exc:
        raise ImageReadError(exc.reason, src) from exc
    if czyx.dtype.kind == "f":
        bad = int(czyx.size - np.count_nonzero(np.isfinite(czyx)))
        if bad:
            raise ImageReadError(
                f"{bad} of {czyx.size} pixels are NaN or infinite; fix or mask them before "
                "analysis (e.g. numpy.nan_to_num) and save the image again",
                src,
            )
    n_channels = czyx.shape[0]
    names = _channel_names(given_names, raw.channel_names, n_channels, src)
    size = _pixel_size(pixel_size, raw.spacing_um, src)
    if z_step is not None and czyx.shape[1] > 1:
        size = _with_z_step(size, z_step, src)
    origin = _origin(raw, src, stage=stage, plate=plate, well=well, field=field)
    metadata = {"format": raw.fmt, "axes": file_axes, **raw.metadata}
    if raw.n_series > 1:
        metadata["n_series"] = raw.n_series
    log.debug(
        "read %s series %d: %s axes %s -> CZYX %s", src, raw.series, raw.fmt, file_axes, czyx.shape
    )
    return Field(czyx, names, size, origin, metadata)


def _split_names(names: Sequence[str] | str | None) -> list[str] | None:
    if names is None:
        return None
    if isinstance(names, str):
        parts = re.split(r"[|,]", names)
    else:
        parts = [str(n) for n in names]
    return [p.strip() for p in parts]


def _resolve_axes(
    data: np.ndarray,
    axes: str,
    src: Path,
    *,
    n_names: int | None,
    hint: str | None,
    labels: bool = False,
) -> tuple[np.ndarray, str]:
    """``data`` and axes using only :data:`AXES_LETTERS`: the caller's hint or the documented rule.

    Singleton axes of other kinds are dropped. One axis of unknown meaning (``Q``, ``I`` or a
    tifffile letter such as ``E``) is read as channels when the caller gave that many channel names,
    else as Z (always Z for labels).
    """
    shape = data.shape
    if hint is not None:
        hint = str(hint).upper()
        if len(hint) != data.ndim:
            raise ImageReadError(
                f"axes={hint!r} names {len(hint)} axes but the image has {data.ndim} "
                f"(shape {shape}, file axes {axes!r}); give one letter per axis",
                src,
            )
        return data, hint
    axes = str(axes).upper()
    if len(axes) != data.ndim:
        raise ImageReadError(f"file axes {axes!r} do not match its shape {shape}", src)
    keep = [i for i, a in enumerate(axes) if a in "CZYXTS" or shape[i] > 1]
    data = data.reshape([shape[i] for i in keep])
    letters = [axes[i] if axes[i] in "CZYXTS" else "Q" for i in keep]
    unknown = [i for i, a in enumerate(letters) if a == "Q"]
    if len(unknown) > 1 or len(set(letters)) != len(letters):
        raise ImageReadError(
            f"cannot tell what the axes of shape {shape} are (file axes {axes!r}); "
            "pass axes=, e.g. axes='CZYX'",
            src,
        )
    if unknown:
        i = unknown[0]
        length = data.shape[i]
        if labels:
            choice = "Z"
        elif n_names == length and "C" not in letters:
            choice = "C"
        elif "Z" not in letters:
            choice = "Z"
        elif "C" not in letters:
            choice = "C"
        else:
            choice = ""
        if not choice or choice in letters:
            raise ImageReadError(
                f"cannot tell what the axis of length {length} in shape {shape} (file axes "
                f"{axes!r}) is; pass axes=, e.g. axes='CZYX'",
                src,
            )
        log.info(
            "%s: reading the axis of length %d (file axes %r) as %s; pass axes= to change that",
            src,
            length,
            axes,
            "channels" if choice == "C" else "Z planes",
        )
        letters[i] = choice
    return data, "".join(letters)


def _channel_names(
    given: list[str] | None, from_file: list[str | None] | None, n: int, src: Path
) -> tuple[str, ...]:
    if given is not None:
        if len(given) != n:
            raise InputError(
                f"{len(given)} channel names {given} given but the image has {n} channel(s); "
                "give exactly one name per channel",
                src,
            )
        if any(not g for g in given):
            raise InputError(f"empty channel name in {given}", src)
        return tuple(given)
    if from_file is None or len(from_file) != n:
        if from_file:
            log.warning(
                "%s: the file names %d channel(s) but has %d; using C0, C1, ...",
                src,
                len(from_file),
                n,
            )
        return tuple(f"C{i}" for i in range(n))
    names = [name if name else f"C{i}" for i, name in enumerate(from_file)]
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        key = name.casefold()
        seen[key] = seen.get(key, 0) + 1
        unique.append(name if seen[key] == 1 else f"{name}_{seen[key]}")
    if unique != names:
        log.warning("%s: repeated channel names %s renamed to %s", src, names, unique)
    return tuple(unique)


def _pixel_size(
    given: PixelSize | float | Sequence[float] | None,
    from_file: dict[str, float | None],
    src: Path,
) -> PixelSize | None:
    file_z = from_file.get("z")
    try:
        if isinstance(given, PixelSize):
            return given
        if given is not None and not isinstance(given, str | bytes) and not _is_sequence(given):
            value = float(given)  # type: ignore[arg-type]
            return PixelSize(value, value, file_z)
        if given is not None:
            values = [float(v) for v in given]  # type: ignore[union-attr]
            if len(values) == 2:
                return PixelSize(x=values[1], y=values[0], z=file_z)
            if len(values) == 3:
                return PixelSize(x=values[2], y=values[1], z=values[0])
            raise InputError(
                f"pixel_size {given!r} must be one number (x = y), (y, x) or (z, y, x) in µm"
            )
    except (TypeError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise InputError(exc.reason, src) from exc
        raise InputError(
            f"pixel_size {given!r} is not a number or (y, x) / (z, y, x) tuple in µm", src
        ) from exc
    x, y = from_file.get("x"), from_file.get("y")
    if x is None and y is None:
        return None
    x = x if x is not None else y
    y = y if y is not None else x
    try:
        return PixelSize(float(x), float(y), file_z)  # type: ignore[arg-type]
    except InputError:
        return None


def _with_z_step(size: PixelSize | None, z_step: float, src: Path) -> PixelSize:
    """``size`` with the z step ``z_step`` (µm) of a z-stack."""
    try:
        z = float(z_step)
    except (TypeError, ValueError):
        z = math.nan
    if not (math.isfinite(z) and z > 0):
        raise InputError(f"z step {z_step!r} must be a positive number of µm", src)
    if size is None:
        raise InputError(
            "a z step needs the lateral pixel size too, and the file has none; give both "
            "(e.g. --pixel-size 0.65 --z-step 2)",
            src,
        )
    return dataclasses.replace(size, z=z)


def _is_sequence(value: Any) -> bool:
    return isinstance(value, Sequence | np.ndarray)


def _origin(
    raw: _Raw,
    src: Path,
    *,
    stage: str | None,
    plate: str | None,
    well: str | None,
    field: int | None,
) -> Origin:
    """Origin from, in priority order: the caller, the file's metadata, the file name."""
    from islet_imaging.io._plate import hcs_position, normalize_well, parse_plate_name

    name_well, name_field = parse_plate_name(src)
    hcs = hcs_position(src)
    meta = raw.origin
    if well is not None:
        try:
            chosen_well: str | None = normalize_well(well)
        except InputError as exc:
            raise InputError(exc.reason, src) from exc
    elif meta.get("well"):
        try:
            chosen_well = normalize_well(meta["well"])
        except InputError:
            chosen_well = meta["well"]
    else:
        chosen_well = name_well
    if field is not None:
        if not _is_int(field) and not str(field).strip().isdigit():
            raise InputError(f"field must be a whole number, got {field!r}", src)
        chosen_field: int | None = int(field)
    elif meta.get("field", "").strip().isdigit():
        chosen_field = int(meta["field"])
    else:
        chosen_field = name_field
    return Origin(
        path=src,
        plate=plate if plate is not None else meta.get("plate") or (hcs[0] if hcs else None),
        well=chosen_well,
        field=chosen_field,
        stage=stage if stage is not None else meta.get("stage") or None,
        series=raw.series if raw.n_series > 1 else None,
    )
