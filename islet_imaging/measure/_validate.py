"""Input checks shared by the measurement functions: label arrays, intensity arrays, spacing."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from islet_imaging.errors import InputError

__all__ = ["as_intensity", "as_labels", "as_spacing", "grouped_percentile"]


def as_labels(labels: np.ndarray, name: str = "labels", *, convert: bool = True) -> np.ndarray:
    """A label image as a (Z, Y, X) int64 array (a (Y, X) image gets Z = 1).

    ``convert=False`` only checks it and returns a (Z, Y, X) view in its own integer dtype (no
    copy of a large field).

    Raises
    ------
    InputError
        For boolean, float or negative labels, or a shape that is not 2D / 3D.
    """
    arr = np.asarray(labels)
    if arr.dtype == bool:
        raise InputError(f"{name} is a boolean mask; label it first (skimage.measure.label(mask))")
    if arr.dtype.kind not in "iu":
        raise InputError(
            f"{name} has dtype {arr.dtype}; label images must be integers "
            f"(use {name}.astype(np.int32) if the values are whole numbers)"
        )
    if arr.ndim == 2:
        arr = arr[np.newaxis]
    if arr.ndim != 3:
        raise InputError(f"{name} must be (Z, Y, X) or (Y, X), got shape {arr.shape}")
    if arr.size and arr.dtype.kind == "i" and arr.min() < 0:
        raise InputError(f"{name} has negative values; labels are 0 (background) or positive")
    return arr.astype(np.int64, copy=False) if convert else arr


def as_intensity(
    image: np.ndarray, shape: tuple[int, ...], name: str, *, convert: bool = True
) -> np.ndarray:
    """A marker image as a float64 (Z, Y, X) array of the labels' shape.

    ``convert=False`` only checks it and returns a (Z, Y, X) view in its own dtype, so that a
    caller with many channels converts one at a time.
    """
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[np.newaxis]
    if arr.shape != tuple(shape):
        raise InputError(
            f"image of {name!r} has shape {np.asarray(image).shape} but the labels have shape "
            f"{tuple(shape)}; measure labels made on this image's grid"
        )
    if arr.dtype.kind not in "uif":
        raise InputError(f"image of {name!r} has unsupported dtype {arr.dtype}")
    return arr.astype(np.float64, copy=False) if convert else arr


def as_spacing(
    spacing: float | Sequence[float] | None, ndim: int = 3
) -> tuple[float, float, float]:
    """``(z, y, x)`` voxel size in µm from a scalar, a (y, x) pair or a (z, y, x) triple.

    Raises
    ------
    InputError
        If the spacing is missing, non-positive or not finite.
    """
    if spacing is None:
        raise InputError(
            "no pixel size; give spacing in µm (e.g. spacing=(2.0, 0.65, 0.65) for (z, y, x))"
        )
    values = [float(spacing)] * 3 if np.isscalar(spacing) else [float(s) for s in spacing]  # type: ignore[arg-type]
    if len(values) == 2:
        values = [values[1], *values]  # z unknown: use x (only matters for 3D)
    if len(values) != 3:
        raise InputError(f"spacing {spacing!r} must be a number, (y, x) or (z, y, x) in µm")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise InputError(f"spacing {spacing!r} must be positive finite µm")
    return (values[0], values[1], values[2])


def grouped_percentile(
    values: np.ndarray, groups: np.ndarray, n_groups: int, q: float
) -> np.ndarray:
    """Percentile ``q`` (0–100, linear interpolation) of ``values`` per group ``1..n_groups``.

    Parameters
    ----------
    values : (N,) ndarray
    groups : (N,) int ndarray
        Group index per value; 0 and values above ``n_groups`` are ignored.
    n_groups : int
    q : float

    Returns
    -------
    (n_groups + 1,) ndarray
        Entry ``g`` holds group ``g``'s percentile, NaN for empty groups; entry 0 is NaN.
    """
    out = np.full(n_groups + 1, np.nan)
    keep = (groups > 0) & (groups <= n_groups)
    if not np.any(keep):
        return out
    v = values[keep]
    g = groups[keep]
    order = np.lexsort((v, g))
    v, g = v[order], g[order]
    counts = np.bincount(g, minlength=n_groups + 1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    present = np.flatnonzero(counts)
    pos = starts[present] + q / 100.0 * (counts[present] - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, starts[present] + counts[present] - 1)
    frac = pos - lo
    out[present] = v[lo] * (1 - frac) + v[hi] * frac
    return out
