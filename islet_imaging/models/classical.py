"""Classical baseline segmentation: nuclei and clusters with scikit-image only (no weights, no torch).

Nuclei
    The nuclear channel is flattened (a rolling-minimum background is subtracted), smoothed at a
    fraction of the nucleus size and thresholded (a lowered Otsu threshold, so dim nuclei are
    kept); touching nuclei are split by a watershed seeded at the maxima of a Laplacian-of-Gaussian
    blob detector at the nucleus scale (seeds at least half a nucleus diameter apart); each nucleus
    is then trimmed to the pixels above a fraction of its own brightness, so that dim and bright
    nuclei are outlined alike. Objects outside the stage's plausible nucleus sizes are dropped
    (small ones are debris).
Clusters
    Foreground is either the nuclear foreground closed over about one nucleus diameter
    (``cluster_input = "nuclear"``) or the thresholded, smoothed sum of all normalised channels
    (``"sum"``); holes are filled, objects smaller than the stage's ``min_cluster_diameter_um`` are
    dropped and touching clusters are split by a watershed on the distance transform whose seeds
    must stand out by a fraction of the smallest cluster radius. Every nucleus then belongs wholly
    to the cluster that holds its centre (or to none: an isolated cell).

All sizes are physical: scales come from the field's pixel size (µm) and the stage profile, so the
same settings work at any magnification. Z-stacks are segmented in 3D with anisotropic spacing.

Examples
--------
>>> import numpy as np
>>> from islet_imaging.io import Field, PixelSize
>>> from islet_imaging.stages import get_stage
>>> yy, xx = np.mgrid[:64, :64]
>>> img = 1000.0 * (((yy - 20) ** 2 + (xx - 20) ** 2) < 36) + 10.0
>>> field = Field(img[None, None].astype(np.float32), ("DAPI",), PixelSize(1.0, 1.0))
>>> labels = segment_classical(field, get_stage("S1"), nucleus_diameter_um=12.0)
>>> int(labels.nuclei.max())
1
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.morphology import h_maxima
from skimage.segmentation import watershed

from islet_imaging.errors import EmptyImageWarning, InputError
from islet_imaging.io import Field
from islet_imaging.models._postprocess import object_size_range
from islet_imaging.segment import CLASSICAL, Labels, warn_missing_z_step
from islet_imaging.stages import StageProfile

__all__ = [
    "DEFAULT_PARAMS",
    "ClassicalParams",
    "EmptyImageWarning",
    "estimate_nucleus_diameter",
    "segment_classical",
    "segment_clusters",
    "segment_nuclei",
    "typical_nucleus_diameter",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassicalParams:
    """Settings of the classical segmenter; sizes are in nucleus diameters ``d`` unless stated.

    Parameters
    ----------
    background_size : float
        Width of the rolling-minimum background window, in ``d``.
    smooth_sigma : float
        Gaussian sigma of the image that is thresholded, in ``d`` (raised in noisy images, see
        ``target_snr``).
    seed_sigma : float
        Sigma of the Laplacian-of-Gaussian blob detector that places nucleus seeds, in ``d``.
    seed_distance : float
        Minimum distance between two nucleus seeds, in ``d``.
    seed_mask_weight : float
        Weight (0-1) of the foreground mask against the clipped intensity in the image the blob
        detector sees (1 = shape only).
    threshold_scale : float
        Multiplies the Otsu threshold of the first, global foreground (below 1 keeps dimmer
        nuclei; their outlines are then set per object by ``object_fraction``).
    object_fraction : float
        Each nucleus is trimmed to the pixels above this fraction of its own brightness
        (0 = no trimming).
    object_quantile : float
        Quantile of a nucleus' pixel values taken as its brightness (1 = maximum).
    min_snr : float
        Images whose brightest structures stand less than this many noise standard deviations
        above the background are treated as empty.
    target_snr : float
        Smoothing is raised (up to a quarter nucleus diameter) until nuclei stand this many
        standard deviations of the smoothed noise above the background.
    noise_floor : float
        The foreground threshold is at least the background plus this many standard deviations
        of the smoothed noise (keeps noise speckle out of dim images).
    min_diameter_factor : float
        Nuclei smaller than this times the profile's smallest diameter are dropped (debris;
        below 1 keeps grazing sections through nuclei).
    max_diameter_factor : float
        Nuclei larger than this times the profile's largest diameter are dropped (artefacts).
    closing : float
        Radius of the closing that joins nuclei into cluster foreground (``"nuclear"`` input),
        in ``d``.
    cluster_sigma : float
        Gaussian sigma of the channel sum (``"sum"`` input), in ``d``.
    cluster_grow : float
        Dilation of cluster foreground after closing, in ``d`` (cytoplasm around edge nuclei).
    split_h : float
        A cluster seed must rise this much above the saddle to its neighbour in the distance
        transform, as a fraction of the smallest cluster radius; larger merges more.
    min_cluster_cells : int
        Clusters holding the centres of fewer nuclei are dropped (a lone cell with its
        cytoplasm is not a cluster).
    """

    background_size: float = 4.0
    smooth_sigma: float = 0.08
    seed_sigma: float = 0.3
    seed_distance: float = 0.5
    seed_mask_weight: float = 0.5
    threshold_scale: float = 0.6
    object_fraction: float = 0.4
    object_quantile: float = 1.0
    min_snr: float = 5.0
    target_snr: float = 20.0
    noise_floor: float = 5.0
    min_diameter_factor: float = 0.65
    max_diameter_factor: float = 2.0
    closing: float = 0.7
    cluster_sigma: float = 0.5
    cluster_grow: float = 0.45
    split_h: float = 0.25
    min_cluster_cells: int = 3

    def __post_init__(self) -> None:
        for name in (
            "background_size",
            "smooth_sigma",
            "seed_sigma",
            "seed_distance",
            "threshold_scale",
            "min_snr",
            "target_snr",
            "noise_floor",
            "min_diameter_factor",
            "max_diameter_factor",
            "closing",
            "cluster_sigma",
            "split_h",
        ):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value > 0):
                raise InputError(f"classical parameter {name}={value} must be positive")
        for name in ("seed_mask_weight", "object_fraction", "object_quantile", "cluster_grow"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value >= 0):
                raise InputError(f"classical parameter {name}={value} must be >= 0")
        if int(self.min_cluster_cells) < 0:
            raise InputError("classical parameter min_cluster_cells must be >= 0")
        for name in ("seed_mask_weight", "object_fraction", "object_quantile"):
            if float(getattr(self, name)) > 1:
                raise InputError(f"classical parameter {name} must be in [0, 1]")


#: The defaults, tuned on synthetic fields of every stage (tuning seeds 1000-1099).
DEFAULT_PARAMS = ClassicalParams()


def typical_nucleus_diameter(profile: StageProfile) -> float:
    """The typical nucleus diameter of a stage in µm: the geometric mean of its plausible range."""
    lo, hi = profile.nucleus_diameter_um
    return math.sqrt(lo * hi)


def estimate_nucleus_diameter(
    image: np.ndarray, *, spacing: tuple[float, ...] | None = None
) -> float | None:
    """Estimate the typical nucleus diameter of a nuclear-stain image from the image itself.

    The image is smoothed, thresholded (Otsu) and opened; the median equivalent diameter of the
    connected objects is returned. Touching nuclei merge into one object, so the estimate is for
    images of mostly separate nuclei (on the DSB 2018 training images it is within 25 % of the
    median true diameter for 87 % of images).

    Parameters
    ----------
    image : (Y, X) or (Z, Y, X) ndarray
        Nuclear stain.
    spacing : tuple of float, optional
        Pixel size per axis in µm; default 1 (the result is then in pixels).

    Returns
    -------
    float or None
        Diameter in µm (pixels without ``spacing``); ``None`` when no object is found.
    """
    img = np.nan_to_num(np.asarray(image, dtype=np.float32))
    sp = np.ones(img.ndim) if spacing is None else np.asarray(spacing, dtype=float)
    if float(img.max()) <= float(img.min()):
        return None
    smooth = ndi.gaussian_filter(img, sigma=1.0)
    fg = ndi.binary_opening(smooth > threshold_otsu(smooth))
    comps, n = ndi.label(fg)
    if n == 0:
        return None
    counts = np.bincount(comps.ravel())[1:]
    counts = counts[counts >= 3**img.ndim]
    if counts.size == 0:
        return None
    size = counts * float(np.prod(sp))
    diam = np.sqrt(4.0 * size / math.pi) if img.ndim == 2 else np.cbrt(6.0 * size / math.pi)
    return float(np.median(diam))


# -- helpers --------------------------------------------------------------------------------------
def _spacing(field: Field, nucleus_diameter_um: float | None) -> tuple[float, float, float]:
    """(z, y, x) voxel size in µm (1 per pixel when the user gave a diameter in pixels)."""
    if field.pixel_size is None:
        if nucleus_diameter_um is None:
            raise InputError(
                "this image has no pixel size, so nucleus and cluster sizes in µm cannot be "
                "converted to pixels; give the pixel size (--pixel-size, µm) or the typical "
                "nucleus diameter in pixels (--nucleus-diameter)",
                field.origin.path,
            )
        return (1.0, 1.0, 1.0)
    return field.pixel_size.zyx


def _ellipsoid(radii_px: np.ndarray) -> np.ndarray:
    """Boolean ellipsoid footprint with the given per-axis radii in pixels (at least 1 wide)."""
    r = np.maximum(np.asarray(radii_px, dtype=float), 0.5)
    half = np.floor(r).astype(int)
    grids = np.ogrid[tuple(slice(-h, h + 1) for h in half)]
    dist = sum((g / ri) ** 2 for g, ri in zip(grids, r, strict=True))
    return np.asarray(dist <= 1.0)


def _robust_normalise(img: np.ndarray) -> np.ndarray:
    """Scale so the 1st percentile is 0 and the 99.8th is 1 (float32)."""
    lo, hi = np.percentile(img, (1.0, 99.8))
    if hi <= lo:
        hi = float(img.max())
        lo = float(img.min())
    if hi <= lo:
        return np.zeros_like(img, dtype=np.float32)
    return ((img - lo) / (hi - lo)).astype(np.float32)


def _noise_sigma(img: np.ndarray) -> float:
    """Noise standard deviation from the median absolute pixel-to-pixel difference along x."""
    diff = np.diff(img, axis=-1)
    mad = float(np.median(np.abs(diff - np.median(diff))))
    return 1.4826 * mad / math.sqrt(2.0)


def _relabel_sequential(labels: np.ndarray) -> np.ndarray:
    """Consecutive ids 1..N in the order of the old ids, int32."""
    ids = np.unique(labels)
    ids = ids[ids > 0]
    lut = np.zeros(int(labels.max()) + 1 if labels.size else 1, np.int32)
    lut[ids] = np.arange(1, ids.size + 1, dtype=np.int32)
    return lut[labels]


def _sizes(
    labels: np.ndarray, spacing: np.ndarray, lo_um: float, hi_um: float
) -> tuple[np.ndarray, float, float]:
    """Pixels of each label 0..max and the size range of equivalent diameters ``lo_um..hi_um``
    (3D: as seen through this stack, :func:`~islet_imaging.models._postprocess.object_size_range`)."""
    planes = labels.shape[0] if labels.ndim == 3 else None
    lo, hi = object_size_range((lo_um, hi_um), tuple(spacing), planes=planes)
    return np.bincount(labels.ravel(), minlength=int(labels.max()) + 1), lo, hi


def _filter_sizes(
    labels: np.ndarray, spacing: np.ndarray, lo_um: float, hi_um: float
) -> np.ndarray:
    if labels.max() == 0:
        return labels
    counts, lo, hi = _sizes(labels, spacing, lo_um, hi_um)
    keep = (counts >= lo) & (counts <= hi)
    keep[0] = False
    return np.where(keep[labels], labels, 0)


def _label_argmax(values: np.ndarray, labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-label maximum of ``values`` and the flat index where it is reached, labels 1..n.

    Labels without pixels get ``-inf`` and index -1. Linear time (no sort of the whole image).
    """
    flat_lab = labels.ravel()
    where = np.flatnonzero(flat_lab > 0)
    lab = flat_lab[where]
    val = values.ravel()[where].astype(np.float64)
    best = np.full(n + 1, -np.inf)
    np.maximum.at(best, lab, val)
    hit = val == best[lab]
    index = np.full(n + 1, -1, np.int64)
    index[lab[hit][::-1]] = where[hit][::-1]  # first pixel reaching the maximum wins
    return best, index


def _label_quantile(values: np.ndarray, labels: np.ndarray, n: int, q: float) -> np.ndarray:
    """Per-label ``q``-quantile (nearest rank) of ``values`` for labels 0..n (0 and empty: 0)."""
    flat_lab = labels.ravel()
    where = np.flatnonzero(flat_lab > 0)
    lab = flat_lab[where]
    val = values.ravel()[where]
    order = np.lexsort((val, lab))
    counts = np.bincount(lab, minlength=n + 1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    out = np.zeros(n + 1, np.float64)
    ok = counts > 0
    ok[0] = False
    pick = starts[ok] + np.floor(q * (counts[ok] - 1)).astype(np.int64)
    out[ok] = val[order[pick]]
    return out


def _seeds_for_all(markers: np.ndarray, score: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Add a seed at the maximum of ``score`` in each component of ``mask`` that has none."""
    comps, n = ndi.label(mask)
    if n == 0:
        return markers
    has = np.zeros(n + 1, bool)
    has[np.unique(comps[markers > 0])] = True
    missing = np.flatnonzero(~has[1:]) + 1
    if missing.size == 0:
        return markers
    _, index = _label_argmax(score, np.where(has[comps], 0, comps), n)
    next_id = int(markers.max()) + 1
    markers = markers.copy()
    markers.ravel()[index[missing]] = np.arange(next_id, next_id + missing.size)
    return markers


# -- nuclei ---------------------------------------------------------------------------------------
def segment_nuclei(
    image: np.ndarray,
    *,
    spacing: tuple[float, ...],
    nucleus_diameter_um: float,
    diameter_range_um: tuple[float, float] | None = None,
    params: ClassicalParams = DEFAULT_PARAMS,
) -> tuple[np.ndarray, np.ndarray]:
    """Segment nuclei in one nuclear-stain image.

    Parameters
    ----------
    image : (Y, X) or (Z, Y, X) ndarray
        Nuclear stain, any real dtype.
    spacing : tuple of float
        Pixel size per axis in µm (``(y, x)`` or ``(z, y, x)``).
    nucleus_diameter_um : float
        Typical nucleus diameter, in µm.
    diameter_range_um : (float, float), optional
        Plausible equivalent diameters; smaller objects are debris, objects above
        ``params.max_diameter_factor`` times the maximum are dropped. Default ``(0.5 d, 2 d)``.
    params : ClassicalParams
        Scales and thresholds.

    Returns
    -------
    labels : ndarray of int32, same shape as ``image``
        Nuclei, consecutive ids from 1.
    foreground : ndarray of bool
        The thresholded foreground before splitting, without objects smaller than the smallest
        plausible nucleus (what the cluster step closes into cluster foreground).

    Warns
    -----
    EmptyImageWarning
        When the image has no usable signal; the labels are then empty.
    """
    img = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    spacing_arr = np.asarray(spacing, dtype=float)
    if spacing_arr.size != img.ndim:
        raise InputError(f"spacing {tuple(spacing)} does not match an image of shape {img.shape}")
    d = float(nucleus_diameter_um)
    if not (math.isfinite(d) and d > 0):
        raise InputError(f"nucleus diameter {nucleus_diameter_um} must be a positive number")
    lo_range, hi_um = diameter_range_um if diameter_range_um is not None else (0.5 * d, 2.0 * d)
    lo_um = lo_range * params.min_diameter_factor
    empty = np.zeros(img.shape, np.int32)
    if img.size == 0 or float(img.max()) <= float(img.min()):
        warnings.warn(
            "the nuclear channel is blank or saturated (all pixels equal); no nuclei found",
            EmptyImageWarning,
            stacklevel=2,
        )
        return empty, np.zeros(img.shape, bool)
    d_px = d / spacing_arr  # nucleus diameter in pixels, per axis

    # background: rolling minimum over a few nucleus diameters, smoothed
    size = np.maximum(np.round(params.background_size * d_px).astype(int), 3)
    small = img[tuple(slice(None, None, 2) for _ in range(img.ndim))] if img.size > 4e6 else None
    if small is not None:
        bg = ndi.minimum_filter(small, size=np.maximum(size // 2, 2))
        for axis in range(img.ndim):
            bg = np.repeat(bg, 2, axis=axis)
        bg = bg[tuple(slice(0, n) for n in img.shape)]
    else:
        bg = ndi.minimum_filter(img, size=size)
    bg = ndi.gaussian_filter(bg, sigma=0.5 * params.background_size * d_px / 2.0)
    flat = img - np.minimum(bg, img)

    noise = _noise_sigma(img)
    sigma = _adaptive_sigma(flat, noise, d_px, params)
    smooth = ndi.gaussian_filter(flat, sigma=sigma)
    peak = float(np.percentile(smooth, 99.9))
    if noise > 0 and peak < params.min_snr * noise:
        warnings.warn(
            f"no nuclei stand out of the noise (signal {peak:.3g} < {params.min_snr} x noise "
            f"{noise:.3g}); no nuclei found",
            EmptyImageWarning,
            stacklevel=2,
        )
        return empty, np.zeros(img.shape, bool)
    try:
        otsu = threshold_otsu(smooth)
    except ValueError:
        return empty, np.zeros(img.shape, bool)
    # never below the background level plus a few standard deviations of the smoothed noise
    background = float(np.median(smooth[smooth <= otsu]))
    floor = background + params.noise_floor * noise * _noise_gain(sigma)
    thr = max(otsu * params.threshold_scale, floor)
    fg = smooth > thr
    fg = ndi.binary_fill_holes(fg) if img.ndim == 2 else _fill_holes_by_plane(fg)
    comps, _ = ndi.label(fg)
    comps = _filter_sizes(comps, spacing_arr, lo_um, math.inf)
    fg = comps > 0
    if not fg.any():
        return empty, fg
    # what outlines clusters: objects of at least the smallest plausible nucleus size
    cluster_fg = _filter_sizes(comps, spacing_arr, lo_range, math.inf) > 0

    markers, score = _nucleus_seeds(flat, fg, spacing_arr, d, params)
    labels = watershed(-score, markers, mask=fg)
    labels = _refine_objects(labels, smooth, params.object_fraction, params.object_quantile)
    labels = _filter_sizes(labels, spacing_arr, lo_um, params.max_diameter_factor * hi_um)
    return _relabel_sequential(labels), cluster_fg


def _noise_gain(sigma: np.ndarray) -> float:
    """Factor by which a Gaussian filter of per-axis ``sigma`` (px) scales white-noise std."""
    return float(np.prod(1.0 / np.sqrt(2.0 * math.sqrt(math.pi) * np.maximum(sigma, 0.5))))


def _adaptive_sigma(
    flat: np.ndarray, noise: float, d_px: np.ndarray, params: ClassicalParams
) -> np.ndarray:
    """Per-axis smoothing sigma (px): ``params.smooth_sigma`` nucleus diameters, raised (up to a
    quarter diameter) until the brightest structures stand ``params.target_snr`` smoothed-noise
    standard deviations above the median."""
    base = np.maximum(params.smooth_sigma * d_px, 0.5)
    contrast = float(np.percentile(flat, 99.5) - np.median(flat))
    if noise <= 0 or contrast <= 0:
        return base
    for scale in np.linspace(1.0, max(0.25 / params.smooth_sigma, 1.0), 8):
        sigma = np.maximum(scale * params.smooth_sigma * d_px, 0.5)
        if contrast >= params.target_snr * noise * _noise_gain(sigma):
            return sigma
    return sigma


def _nucleus_seeds(
    flat: np.ndarray, fg: np.ndarray, spacing: np.ndarray, d: float, params: ClassicalParams
) -> tuple[np.ndarray, np.ndarray]:
    """Watershed markers and the landscape they were found on (higher = more central).

    The landscape is a blob detector at the nucleus scale: the negative Laplacian of Gaussian
    (sigma ``params.seed_sigma * d``) of the foreground-masked image, half clipped intensity and
    half the mask itself, so that both shape (necks between touching nuclei) and brightness
    differences between neighbours separate nuclei.
    """
    d_px = d / spacing
    ref = float(np.percentile(flat[fg], 95.0))
    inten = np.minimum(flat / max(ref, 1e-12), 1.0)
    w = params.seed_mask_weight
    x = np.where(fg, (1.0 - w) * inten + w, 0.0).astype(np.float32)
    score = -ndi.gaussian_laplace(x, sigma=params.seed_sigma * d_px)
    footprint = _ellipsoid(np.maximum(0.5 * params.seed_distance * d_px, 1.0))
    maxed = ndi.maximum_filter(score, footprint=footprint)
    dist = ndi.distance_transform_edt(fg, sampling=spacing) / (0.5 * d)
    peaks = (score >= maxed) & fg & (dist > 0.2)
    markers, _ = ndi.label(peaks)
    return _seeds_for_all(markers, score, fg), score


def _refine_objects(
    labels: np.ndarray, smooth: np.ndarray, fraction: float, quantile: float
) -> np.ndarray:
    """Trim each object to the pixels brighter than ``fraction`` of its own brightness.

    The brightness of an object is the ``quantile`` of its pixel values (robust to bright spots).

    A global threshold outlines dim nuclei too tightly and bright ones too loosely; a threshold
    relative to each object's brightness puts every outline at the same relative height. Holes the
    trim opens inside an object are filled back.
    """
    n = int(labels.max())
    if n == 0 or fraction <= 0:
        return labels
    peak = _label_quantile(smooth, labels, n, quantile)
    keep = (labels > 0) & (smooth >= fraction * peak[labels])
    filled = ndi.binary_fill_holes(keep) if keep.ndim == 2 else _fill_holes_by_plane(keep)
    out = np.where(filled, labels, 0)
    # a trim can cut an object in pieces: keep the piece with the object's maximum
    pieces, n_pieces = ndi.label(out > 0)
    if n_pieces > n:
        _, index = _label_argmax(smooth, out, n)
        best = np.where(index >= 0, pieces.ravel()[np.maximum(index, 0)], 0)
        out = np.where(pieces == best[out], out, 0)
    return out.astype(np.int32)


def _fill_holes_by_plane(mask: np.ndarray) -> np.ndarray:
    """Fill holes in 3D and in each plane (holes open to the top or bottom of a stack)."""
    out = ndi.binary_fill_holes(mask)
    for z in range(out.shape[0]):
        out[z] = ndi.binary_fill_holes(out[z])
    return out


# -- clusters -------------------------------------------------------------------------------------
def _close(mask: np.ndarray, radius_um: float, spacing: np.ndarray) -> np.ndarray:
    """Binary closing by a ball of ``radius_um`` via two distance transforms (any spacing)."""
    if radius_um <= 0 or not mask.any():
        return mask
    dilated = ndi.distance_transform_edt(~mask, sampling=spacing) <= radius_um
    return ndi.distance_transform_edt(dilated, sampling=spacing) > radius_um


def segment_clusters(
    foreground: np.ndarray,
    *,
    spacing: tuple[float, ...],
    min_cluster_diameter_um: float,
    nuclei: np.ndarray | None = None,
    split: bool = True,
    params: ClassicalParams = DEFAULT_PARAMS,
) -> np.ndarray:
    """Split cluster foreground into clusters and make nuclei consistent with them.

    Parameters
    ----------
    foreground : (Y, X) or (Z, Y, X) ndarray of bool
        Cluster foreground (holes are filled here).
    spacing : tuple of float
        Pixel size per axis in µm.
    min_cluster_diameter_um : float
        Smaller objects (equivalent diameter) are not clusters; also sets how far apart the
        centres of two touching clusters must be to be split.
    nuclei : ndarray of int, optional
        Nucleus labels; each nucleus is painted wholly into the cluster that holds its centre,
        and removed from the clusters if its centre lies outside all of them. Clusters with
        fewer than ``params.min_cluster_cells`` nuclei are then dropped.
    split : bool
        Split touching clusters by a distance-transform watershed (right for round colonies and
        aggregates; monolayer patches have arbitrary shapes and are only split where they do not
        touch).
    params : ClassicalParams
        ``split_h`` sets how readily touching clusters are split.

    Returns
    -------
    ndarray of int32
        Clusters, consecutive ids from 1.
    """
    spacing_arr = np.asarray(spacing, dtype=float)
    fg = np.asarray(foreground, bool)
    fg = ndi.binary_fill_holes(fg) if fg.ndim == 2 else _fill_holes_by_plane(fg)
    comps, _ = ndi.label(fg)
    comps = _filter_sizes(comps, spacing_arr, min_cluster_diameter_um, math.inf)
    fg = comps > 0
    if not fg.any():
        return np.zeros(fg.shape, np.int32)
    if not split:
        clusters = _relabel_sequential(comps)
    else:
        clusters = _split_clusters(fg, spacing_arr, float(min_cluster_diameter_um), params)
        # fragments of a split that are themselves too small go back to their neighbour
        clusters = _merge_small(clusters, spacing_arr, min_cluster_diameter_um)
    if nuclei is not None:
        clusters = _assign_nuclei(clusters, np.asarray(nuclei), int(params.min_cluster_cells))
    clusters = _filter_sizes(
        _relabel_sequential(clusters), spacing_arr, min_cluster_diameter_um, math.inf
    )
    return _relabel_sequential(clusters)


def _split_clusters(
    fg: np.ndarray, spacing_arr: np.ndarray, min_cluster_diameter_um: float, params: ClassicalParams
) -> np.ndarray:
    """Watershed of the distance transform, seeded at maxima that stand out by ``split_h``.

    Seeds are found on a grid coarsened so that the smallest cluster radius spans about 8
    pixels (clusters are much larger than pixels; the h-maxima transform is the slow part).
    """
    r_min = 0.5 * min_cluster_diameter_um
    dist = ndi.distance_transform_edt(fg, sampling=spacing_arr)
    factor = np.clip((r_min / spacing_arr) // 8, 1, 4).astype(int)
    coarse = fg[tuple(slice(None, None, int(f)) for f in factor)]
    cdist = ndi.distance_transform_edt(coarse, sampling=spacing_arr * factor)
    # quantise so h-maxima on floats is stable; h in µm
    h = params.split_h * r_min
    step = max(float((spacing_arr * factor).min()) / 4.0, h / 50.0)
    q = np.round(cdist / step).astype(np.int32)
    maxima = h_maxima(q, max(round(h / step), 1)) > 0
    cmarkers, n = ndi.label(maxima & coarse)
    markers = np.zeros(fg.shape, np.int32)
    if n:
        _, index = _label_argmax(cdist, cmarkers, n)
        pos = np.unravel_index(index[1:], coarse.shape)
        fine = tuple(np.minimum(pos[a] * factor[a], fg.shape[a] - 1) for a in range(fg.ndim))
        markers[fine] = np.arange(1, n + 1)
        markers[~fg] = 0
    markers = _seeds_for_all(markers, dist, fg)
    return watershed(-dist, markers, mask=fg)


def _merge_small(clusters: np.ndarray, spacing: np.ndarray, min_diameter_um: float) -> np.ndarray:
    """Merge watershed fragments below the minimum cluster size into the neighbour they touch most."""
    if clusters.max() == 0:
        return clusters
    counts, lo, _ = _sizes(clusters, spacing, min_diameter_um, math.inf)
    small = np.flatnonzero(counts[1:] < lo) + 1
    if small.size == 0:
        return clusters
    out = clusters.copy()
    for lab in small[np.argsort(counts[small], kind="stable")]:
        region = out == lab
        ring = ndi.binary_dilation(region) & ~region
        neighbours = out[ring]
        neighbours = neighbours[(neighbours > 0) & (neighbours != lab)]
        if neighbours.size:
            out[region] = np.bincount(neighbours).argmax()
    return out


def _assign_nuclei(clusters: np.ndarray, nuclei: np.ndarray, min_cells: int) -> np.ndarray:
    """Paint each nucleus into the cluster at its centre (0 = none) so none straddles two.

    Clusters that end up with fewer than ``min_cells`` nuclei are removed.
    """
    n = int(nuclei.max())
    if n == 0:
        return clusters if min_cells <= 0 else np.zeros_like(clusters)
    flat = nuclei.ravel()
    where = np.flatnonzero(flat)
    lab = flat[where]
    count = np.bincount(lab, minlength=n + 1).astype(float)
    coords = np.unravel_index(where, nuclei.shape)
    centre = tuple(
        np.round(np.bincount(lab, weights=c, minlength=n + 1) / np.maximum(count, 1)).astype(int)
        for c in coords
    )
    owner = clusters[centre].astype(np.int32)
    # a centre outside its own (concave) nucleus: take the cluster most of the nucleus lies in
    odd = np.flatnonzero((nuclei[centre] != np.arange(n + 1)) & (count > 0))
    for k in odd:
        owner[k] = np.bincount(clusters[nuclei == k]).argmax()
    owner[0] = 0
    out = clusters.copy()
    inside = nuclei > 0
    out[inside] = owner[nuclei[inside]]
    n_cells = np.bincount(owner[1:], minlength=int(out.max()) + 1)
    too_few = n_cells < min_cells
    too_few[0] = False
    return np.where(too_few[out], 0, out)


def _cluster_foreground(
    field: Field,
    profile: StageProfile,
    nuclear_fg: np.ndarray,
    spacing: np.ndarray,
    d_um: float,
    params: ClassicalParams,
) -> np.ndarray:
    grow = params.cluster_grow * d_um
    if profile.cluster_input == "sum":
        data = np.nan_to_num(field.data.astype(np.float32))
        total = np.zeros(field.spatial_shape, np.float32)
        for c in range(field.n_channels):
            total += _robust_normalise(data[c])
        total /= field.n_channels
        squeeze = field.spatial_shape[0] == 1
        if squeeze:
            total = total[0]
        smooth = ndi.gaussian_filter(total, sigma=params.cluster_sigma * d_um / spacing)
        if float(smooth.max()) <= float(smooth.min()):
            return np.zeros(smooth.shape, bool)
        fg = smooth > threshold_otsu(smooth)
        fg |= _close(nuclear_fg, params.closing * d_um, spacing)
    else:
        fg = _close(nuclear_fg, params.closing * d_um, spacing)
    if grow > 0 and fg.any():
        fg = ndi.distance_transform_edt(~fg, sampling=spacing) <= grow
    return fg


# -- entry point ----------------------------------------------------------------------------------
def segment_classical(
    field: Field,
    profile: StageProfile,
    *,
    nucleus_diameter_um: float | None = None,
    params: ClassicalParams = DEFAULT_PARAMS,
) -> Labels:
    """Segment a field's nuclei and clusters with the classical (scikit-image) pipeline.

    Parameters
    ----------
    field : Field
        Image with a nuclear stain channel (found through the stage profile's aliases).
    profile : StageProfile
        Stage: nucleus size range, what outlines clusters and the smallest cluster.
    nucleus_diameter_um : float, optional
        Typical nucleus diameter; default the geometric mean of the profile's range. For a field
        without pixel size give the diameter in pixels (pixel size 1 is then assumed, and the
        profile's size ranges are scaled by the same factor).
    params : ClassicalParams
        Scales and thresholds of the pipeline.

    Returns
    -------
    Labels
        ``nuclei`` and ``clusters`` on the field's (Z, Y, X) grid, int32, consecutive ids;
        ``method = "classical"``.

    Raises
    ------
    InputError
        If the field has no nuclear channel, or neither a pixel size nor a nucleus diameter.

    Warns
    -----
    EmptyImageWarning
        For a blank, constant or saturated nuclear channel (labels are then empty).
    MissingZStepWarning
        For a z-stack without a z step.
    """
    warn_missing_z_step(field)
    nuclear = profile.nuclear_channel(field.channel_names, field.origin.path)
    spacing3 = np.asarray(_spacing(field, nucleus_diameter_um), dtype=float)
    typical = typical_nucleus_diameter(profile)
    lo, hi = profile.nucleus_diameter_um
    min_cluster = float(profile.min_cluster_diameter_um)
    if nucleus_diameter_um is not None:
        d_um = float(nucleus_diameter_um)
        if not (math.isfinite(d_um) and d_um > 0):
            raise InputError(
                f"nucleus diameter {nucleus_diameter_um} must be a positive number",
                field.origin.path,
            )
        scale = d_um / typical
        lo, hi = lo * scale, hi * scale
        if field.pixel_size is None:
            min_cluster *= scale
    else:
        d_um = typical
    is_3d = field.is_3d
    spacing = spacing3 if is_3d else spacing3[1:]
    image = field.data[nuclear]
    if not is_3d:
        image = image[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", EmptyImageWarning)
        nuclei, nuclear_fg = segment_nuclei(
            image,
            spacing=tuple(spacing),
            nucleus_diameter_um=d_um,
            diameter_range_um=(lo, hi),
            params=params,
        )
    for w in caught:  # re-issued with the field's name, from the caller's line
        if issubclass(w.category, EmptyImageWarning):
            logger.warning("%s: %s", field.name, w.message)
            warnings.warn(f"{field.name}: {w.message}", EmptyImageWarning, stacklevel=2)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if nuclei.max() == 0:
        clusters = np.zeros_like(nuclei)
    else:
        fg = _cluster_foreground(field, profile, nuclear_fg, spacing, d_um, params)
        clusters = segment_clusters(
            fg,
            spacing=tuple(spacing),
            min_cluster_diameter_um=min_cluster,
            nuclei=nuclei,
            split=profile.cluster_kind != "monolayer-patch",
            params=params,
        )
    logger.info("%s: %d nuclei, %d clusters (classical)", field.name, nuclei.max(), clusters.max())
    if not is_3d:
        nuclei, clusters = nuclei[np.newaxis], clusters[np.newaxis]
    return Labels(nuclei=nuclei, clusters=clusters, method=CLASSICAL)
