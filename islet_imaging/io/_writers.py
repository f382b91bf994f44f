"""Writing fields and label images as OME-TIFF.

Both writers refuse to replace an existing file unless ``overwrite=True``, never write over the file a
field was read from, create missing parent folders and write atomically: the image goes to a
temporary file in the target folder which is then renamed onto the target with :func:`os.replace`,
so a killed job never leaves a half-written image under the final name.

The files carry OME-XML with channel names and ``PhysicalSizeX/Y/Z`` in µm (read back by Fiji /
Bio-Formats, napari, QuPath and :func:`islet_imaging.io.read_field`), plus the TIFF resolution tags.
The origin of the field (plate, well, field, stage) is stored in an OME ``MapAnnotation`` with the
namespace :data:`ORIGIN_NAMESPACE`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from islet_imaging._atomic import atomic_write
from islet_imaging.errors import InputError
from islet_imaging.io._field import Field, Origin, PixelSize

__all__ = ["ORIGIN_NAMESPACE", "write_labels", "write_ome_tiff"]

log = logging.getLogger(__name__)

#: Namespace of the OME MapAnnotation holding a field's plate / well / field / stage.
ORIGIN_NAMESPACE = "islet-imaging/origin"

#: Pixel types OME-TIFF can hold (OME ``Pixels/@Type``).
_OME_DTYPES = frozenset(
    np.dtype(t)
    for t in ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")
)

_INT32_MAX = int(np.iinfo(np.int32).max)


def write_ome_tiff(
    path: str | os.PathLike[str],
    field: Field,
    *,
    overwrite: bool = False,
    compression: str | None = "zlib",
) -> Path:
    """Write a field as an OME-TIFF with channel names, pixel size in µm and origin.

    Parameters
    ----------
    path : path-like
        Target file, conventionally ``<name>.ome.tif``. Missing parent folders are created.
    field : Field
        The ``(C, Z, Y, X)`` field to write. Its dtype is kept (64-bit integers are narrowed to 32
        bits when the values fit, since OME has no 64-bit integer type).
    overwrite : bool, optional
        Replace an existing file. The file the field was read from is never replaced.
    compression : str or None, optional
        TIFF compression (``"zlib"`` by default, lossless); ``None`` for uncompressed.

    Returns
    -------
    Path
        The written file.

    Raises
    ------
    InputError
        If the target exists and ``overwrite`` is false, is the field's own source file, is a
        folder, or the data cannot be stored in OME-TIFF.

    Examples
    --------
    >>> import numpy as np, tempfile, pathlib
    >>> from islet_imaging.io import Field, PixelSize, read_field
    >>> f = Field(np.zeros((2, 1, 8, 8), np.uint16), ("DAPI", "INS"), PixelSize(0.5, 0.5))
    >>> out = write_ome_tiff(pathlib.Path(tempfile.mkdtemp()) / "A01_f1.ome.tif", f)
    >>> read_field(out).channel_names
    ('DAPI', 'INS')
    """
    if not isinstance(field, Field):
        raise InputError(
            f"write_ome_tiff expects a Field, got {type(field).__name__}; "
            "wrap arrays with islet_imaging.io.Field(data, channel_names, pixel_size)",
            path,
        )
    target = _check_target(path, overwrite=overwrite, sources=(field.origin.path,))
    data = _ome_dtype(field.data, target)
    metadata = _ome_metadata(
        axes="CZYX",
        channel_names=field.channel_names,
        pixel_size=field.pixel_size,
        origin=field.origin,
        name=field.origin.name,
    )
    atomic_write(target, lambda tmp: _imwrite(tmp, data, metadata, field.pixel_size, compression))
    log.debug("wrote %s %s %s to %s", field.name, data.shape, data.dtype, target)
    return target


def write_labels(
    path: str | os.PathLike[str],
    labels: np.ndarray,
    *,
    like: Field | None = None,
    name: str = "labels",
    overwrite: bool = False,
) -> Path:
    """Write an instance label image as a single-channel OME-TIFF.

    Parameters
    ----------
    path : path-like
        Target file, conventionally ``labels/<name>_nuclei.tif``. Missing parent folders are created.
    labels : (Z, Y, X) or (Y, X) ndarray of int
        Instance labels, 0 for background. Stored as uint16 when the largest label is below 65536,
        else uint32 (labels must stay below 2**31 so that they read back as int32).
    like : Field, optional
        The field the labels belong to: its pixel size and origin are written with the labels, and
        the label grid must match its ``(Z, Y, X)`` shape.
    name : str, optional
        Name of the single channel (e.g. ``"nuclei"``, ``"clusters"``).
    overwrite : bool, optional
        Replace an existing file. The file ``like`` was read from is never replaced.

    Returns
    -------
    Path
        The written file.

    Raises
    ------
    InputError
        For non-integer, negative or too large labels, a shape that does not match ``like``, or a
        target that exists (without ``overwrite``) or is the source image.
    """
    target_hint = Path(os.fspath(path))
    arr = np.asarray(labels)
    if arr.dtype == bool:
        raise InputError(
            "label image is boolean (a mask); label its objects first, "
            "e.g. skimage.measure.label(mask)",
            target_hint,
        )
    if arr.dtype.kind not in "ui":
        if (
            arr.dtype.kind == "f"
            and arr.size
            and np.all(np.isfinite(arr))
            and np.all(arr == np.round(arr))
        ):
            arr = arr.astype(np.int64)
        else:
            raise InputError(
                f"labels must be integers, got dtype {arr.dtype}; "
                "convert with labels.astype(np.int32) after checking the values",
                target_hint,
            )
    if arr.ndim == 2:
        arr = arr[np.newaxis]
    if arr.ndim != 3:
        raise InputError(f"labels must be (Z, Y, X) or (Y, X), got shape {arr.shape}", target_hint)
    if arr.size == 0:
        raise InputError(f"label image has no pixels (shape {arr.shape})", target_hint)
    low, high = int(arr.min()), int(arr.max())
    if low < 0:
        raise InputError(
            f"labels contain negative values (min {low}); background must be 0 and objects 1, 2, ...",
            target_hint,
        )
    if high > _INT32_MAX:
        raise InputError(
            f"largest label {high} does not fit in int32; relabel with "
            "skimage.segmentation.relabel_sequential",
            target_hint,
        )
    out_dtype = np.uint16 if high < 65536 else np.uint32
    pixel_size: PixelSize | None = None
    origin = Origin()
    sources: tuple[Path | None, ...] = ()
    if like is not None:
        if not isinstance(like, Field):
            raise InputError(
                f"like= must be the Field the labels belong to, got {type(like).__name__}",
                target_hint,
            )
        if tuple(arr.shape) != tuple(like.spatial_shape):
            raise InputError(
                f"labels of shape (Z, Y, X) {arr.shape} do not match the image grid "
                f"{like.spatial_shape} of {like.name}; labels must be on the same grid as the image",
                target_hint,
            )
        pixel_size = like.pixel_size
        origin = like.origin
        sources = (like.origin.path,)
    name = str(name).strip()
    if not name:
        raise InputError("the label channel name must not be empty", target_hint)
    target = _check_target(path, overwrite=overwrite, sources=sources)
    data = arr.astype(out_dtype, copy=False)[np.newaxis]
    metadata = _ome_metadata(
        axes="CZYX", channel_names=(name,), pixel_size=pixel_size, origin=origin, name=name
    )
    atomic_write(target, lambda tmp: _imwrite(tmp, data, metadata, pixel_size, "zlib"))
    log.debug("wrote labels %s %s (max %d) to %s", data.shape[1:], data.dtype, high, target)
    return target


# -- helpers ---------------------------------------------------------------------------------
def _check_target(
    path: str | os.PathLike[str], *, overwrite: bool, sources: tuple[Path | None, ...]
) -> Path:
    """Validate an output path: not a folder, not an input, not existing unless ``overwrite``."""
    try:
        target = Path(os.fspath(path)).expanduser()
    except TypeError as exc:
        raise InputError(f"output path must be a file path, got {path!r}") from exc
    if target.is_dir():
        raise InputError("output path is a folder; give a file name such as image.ome.tif", target)
    for source in sources:
        if source is not None and _same_file(target, Path(source)):
            raise InputError(
                "refusing to write over the input image it was read from; choose another output path",
                target,
            )
    if target.exists() and not overwrite:
        raise InputError(
            "file already exists; refusing to overwrite it. Choose another path or pass overwrite=True",
            target,
        )
    return target


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _ome_dtype(data: np.ndarray, target: Path) -> np.ndarray:
    """``data`` in a pixel type OME-TIFF can store (64-bit integers narrowed when they fit)."""
    if data.dtype.newbyteorder("=") in _OME_DTYPES:
        return data
    if data.dtype.kind in "ui" and data.size:
        low, high = int(data.min()), int(data.max())
        for dtype in (np.uint16, np.uint32, np.int32) if low >= 0 else (np.int16, np.int32):
            info = np.iinfo(dtype)
            if info.min <= low and high <= info.max:
                return data.astype(dtype)
    raise InputError(
        f"pixel type {data.dtype} cannot be stored in OME-TIFF; convert to uint16, int32 or float32",
        target,
    )


def _ome_metadata(
    *,
    axes: str,
    channel_names: tuple[str, ...],
    pixel_size: PixelSize | None,
    origin: Origin,
    name: str,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "axes": axes,
        "Name": name,
        "Channel": {"Name": list(channel_names)},
    }
    if pixel_size is not None:
        metadata.update(
            PhysicalSizeX=float(pixel_size.x),
            PhysicalSizeXUnit="µm",
            PhysicalSizeY=float(pixel_size.y),
            PhysicalSizeYUnit="µm",
        )
        if pixel_size.z is not None:
            metadata.update(PhysicalSizeZ=float(pixel_size.z), PhysicalSizeZUnit="µm")
    values = {
        key: str(value)
        for key, value in (
            ("plate", origin.plate),
            ("well", origin.well),
            ("field", origin.field),
            ("stage", origin.stage),
        )
        if value is not None
    }
    if values:
        metadata["MapAnnotation"] = {"Namespace": ORIGIN_NAMESPACE, **values}
    return metadata


def _imwrite(
    tmp: Path,
    data: np.ndarray,
    metadata: dict[str, Any],
    pixel_size: PixelSize | None,
    compression: str | None,
) -> None:
    import tifffile

    options: dict[str, Any] = {}
    if pixel_size is not None:
        # TIFF resolution tags (pixels per cm) for readers that ignore OME-XML
        options.update(
            resolution=(1e4 / float(pixel_size.x), 1e4 / float(pixel_size.y)),
            resolutionunit="CENTIMETER",
        )
    # OME needs a UUID; derive it from the content (not the clock) so that writing the same field
    # twice gives identical bytes (the sample plate is regenerated bit for bit)
    if "UUID" not in metadata:
        import hashlib
        import uuid

        digest = hashlib.sha1(np.ascontiguousarray(data).view(np.uint8).ravel())
        digest.update(repr(sorted(metadata.items())).encode())
        metadata = {
            **metadata,
            "UUID": f"urn:uuid:{uuid.UUID(bytes=digest.digest()[:16], version=5)}",
        }
    tifffile.imwrite(
        tmp,
        data,
        ome=True,
        photometric="minisblack",
        compression=compression,
        metadata=metadata,
        **options,
    )
