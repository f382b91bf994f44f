"""Per-cell measurements: marker intensities in each cell's compartment, cluster membership, size.

A cell is a nucleus label. Nuclear markers are measured over the nucleus; cytoplasmic markers over
the cell's *territory* minus its nucleus, where the territory is the nucleus grown by
``cytoplasm_um`` (``skimage.segmentation.expand_labels`` with the voxel spacing, so in µm in every
axis) and clipped to the cell's own cluster (or, for a cell outside any cluster, to the background).

Intensities are corrected for the local background before they are summarised (see
:func:`background_levels`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from skimage.segmentation import expand_labels as _skimage_expand_labels

from islet_imaging.errors import InputError
from islet_imaging.measure._validate import as_intensity, as_labels, as_spacing, grouped_percentile

if TYPE_CHECKING:
    from islet_imaging.models._blocks import Block

__all__ = [
    "BackgroundMethod",
    "background_levels",
    "background_rings",
    "cell_cluster_ids",
    "cytoplasm_labels",
    "measure_cells",
]

log = logging.getLogger(__name__)

BackgroundMethod = Literal["ring", "global", "none"]

#: Smallest number of background voxels a ring (or the field) needs for a background estimate.
MIN_BACKGROUND_VOXELS = 50


#: Fields wider or taller than this many pixels are measured in blocks of it (flat memory).
MEASURE_BLOCK = 2048

#: Rows per strip of :func:`expand_labels` (a whole-image distance transform with indices
#: takes ~32 bytes per pixel; strips bound that).
_STRIP_ROWS = 1024


def expand_labels(labels: np.ndarray, *, distance: float, spacing: Sequence[float]) -> np.ndarray:
    """``skimage.segmentation.expand_labels``, computed in strips of rows for bounded memory.

    Exact: a pixel takes the label of its nearest labelled pixel within ``distance``, and that
    pixel, with every nearer one, lies within ``distance`` of it, so inside a strip grown by
    ``distance`` on each side. ``labels``: (Y, X) or (Z, Y, X), strips along Y.
    """
    axis = labels.ndim - 2
    n = labels.shape[axis]
    halo = math.ceil(distance / float(spacing[axis])) + 1
    if n <= _STRIP_ROWS + 2 * halo:
        return _skimage_expand_labels(labels, distance=distance, spacing=spacing)
    out = np.empty_like(labels)
    for y0 in range(0, n, _STRIP_ROWS):
        y1 = min(n, y0 + _STRIP_ROWS)
        lo, hi = max(0, y0 - halo), min(n, y1 + halo)
        strip = _skimage_expand_labels(
            np.take(labels, np.arange(lo, hi), axis=axis), distance=distance, spacing=spacing
        )
        core = [slice(None)] * labels.ndim
        core[axis] = slice(y0, y1)
        inner = [slice(None)] * labels.ndim
        inner[axis] = slice(y0 - lo, y1 - lo)
        out[tuple(core)] = strip[tuple(inner)]
    return out


def cell_cluster_ids(nuclei: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """The cluster of each nucleus: the cluster label most of its voxels lie in (0 = none).

    Voxels outside every cluster vote for 0; ties go to the smaller label.

    Parameters
    ----------
    nuclei, clusters : (Z, Y, X) or (Y, X) int ndarray
        Label images on the same grid.

    Returns
    -------
    (max(nuclei) + 1,) int64 ndarray
        ``ids[n]`` is the cluster of nucleus ``n``; ``ids[0] = 0``.
    """
    nuc = as_labels(nuclei, "nuclei")
    clu = as_labels(clusters, "clusters")
    if nuc.shape != clu.shape:
        raise InputError(
            f"nuclei labels {nuc.shape} and cluster labels {clu.shape} differ in shape"
        )
    n = int(nuc.max(initial=0))
    ids = np.zeros(n + 1, dtype=np.int64)
    inside = nuc > 0
    if not np.any(inside):
        return ids
    pairs = np.stack([nuc[inside], clu[inside]], axis=1)
    uniq, counts = np.unique(pairs, axis=0, return_counts=True)
    # sort by nucleus, then count descending, then cluster ascending; first row per nucleus wins
    order = np.lexsort((uniq[:, 1], -counts, uniq[:, 0]))
    uniq = uniq[order]
    first = np.ones(len(uniq), dtype=bool)
    first[1:] = uniq[1:, 0] != uniq[:-1, 0]
    ids[uniq[first, 0]] = uniq[first, 1]
    return ids


def cytoplasm_labels(
    nuclei: np.ndarray,
    clusters: np.ndarray,
    *,
    spacing: float | Sequence[float],
    cytoplasm_um: float = 5.0,
    cluster_ids: np.ndarray | None = None,
) -> np.ndarray:
    """Cytoplasm regions labelled with their cell's nucleus label.

    Each nucleus is grown by ``cytoplasm_um`` µm (Voronoi-split between neighbours, in physical
    distance), the growth is kept only where it lies in the cell's own cluster (or outside all
    clusters for a cell with cluster id 0), and the nucleus itself is removed.

    Parameters
    ----------
    nuclei, clusters : (Z, Y, X) or (Y, X) int ndarray
        Label images on the same grid.
    spacing : float or sequence
        Voxel size in µm, ``(z, y, x)`` or ``(y, x)``.
    cytoplasm_um : float
        How far the cytoplasm reaches beyond the nucleus edge, µm (about a nuclear radius).
    cluster_ids : ndarray, optional
        Output of :func:`cell_cluster_ids`, when already computed.

    Returns
    -------
    (Z, Y, X) int64 ndarray
        0 outside every cytoplasm.
    """
    nuc = as_labels(nuclei, "nuclei")
    clu = as_labels(clusters, "clusters")
    if nuc.shape != clu.shape:
        raise InputError(
            f"nuclei labels {nuc.shape} and cluster labels {clu.shape} differ in shape"
        )
    zyx = as_spacing(spacing)
    if cytoplasm_um < 0:
        raise InputError(f"cytoplasm_um={cytoplasm_um} must be >= 0")
    if cluster_ids is None:
        cluster_ids = cell_cluster_ids(nuc, clu)
    if nuc.shape[0] == 1:
        grown = expand_labels(nuc[0], distance=cytoplasm_um, spacing=zyx[1:])[np.newaxis]
    else:
        grown = expand_labels(nuc, distance=cytoplasm_um, spacing=zyx)
    own_cluster = cluster_ids[grown]
    keep = (grown > 0) & (nuc == 0) & (clu == own_cluster)
    return np.where(keep, grown, 0)


def background_levels(
    image: np.ndarray,
    clusters: np.ndarray,
    *,
    spacing: float | Sequence[float],
    nuclei: np.ndarray | None = None,
    method: BackgroundMethod = "ring",
    percentile: float = 50.0,
    ring_gap_um: float = 2.0,
    ring_width_um: float = 15.0,
    fallback_percentile: float = 5.0,
) -> tuple[np.ndarray, float]:
    """Local background of one marker for each cluster, and for cells outside clusters.

    ``"ring"``: for each cluster, the ``percentile`` of the marker over the voxels that lie
    between ``ring_gap_um`` and ``ring_gap_um + ring_width_um`` outside it (in µm, split between
    neighbouring clusters), excluding every cluster and nucleus voxel. A ring with fewer than
    50 voxels uses the field value. ``"global"``: one field value for all. ``"none"``: 0.

    The field value is the ``percentile`` of all voxels outside clusters and nuclei; when fewer than
    50 such voxels exist (a field covered by one monolayer), the ``fallback_percentile`` of the
    whole image.

    Parameters
    ----------
    image : (Z, Y, X) or (Y, X) ndarray
        One marker channel.
    clusters : (Z, Y, X) or (Y, X) int ndarray
    spacing : float or sequence
        Voxel size in µm.
    nuclei : (Z, Y, X) int ndarray, optional
        Nucleus voxels are excluded from background.
    method : {"ring", "global", "none"}
    percentile : float
        Percentile (0–100) of background voxels; 50 = median.
    ring_gap_um, ring_width_um : float
        Ring geometry in µm.
    fallback_percentile : float
        Used when there is no background outside clusters.

    Returns
    -------
    per_cluster : (max(clusters) + 1,) ndarray
        Background per cluster label; entry 0 is the field value (for unclustered cells).
    field_value : float
    """
    clu = as_labels(clusters, "clusters", convert=False)
    img = as_intensity(image, clu.shape, "marker", convert=False)
    nuc = None if nuclei is None else as_labels(nuclei, "nuclei", convert=False)
    per_cluster = _backgrounds(
        nuc,
        clu,
        {"marker": img},
        spacing=as_spacing(spacing),
        method=method,
        percentile=percentile,
        ring_gap_um=ring_gap_um,
        ring_width_um=ring_width_um,
        fallback_percentile=fallback_percentile,
        block=None,
    )["marker"]
    return per_cluster, float(per_cluster[0])


def background_rings(
    clusters: np.ndarray,
    *,
    spacing: float | Sequence[float],
    free: np.ndarray | None = None,
    ring_gap_um: float = 2.0,
    ring_width_um: float = 15.0,
) -> np.ndarray:
    """Background rings around clusters, labelled with the cluster label.

    Voxels between ``ring_gap_um`` and ``ring_gap_um + ring_width_um`` (µm) outside the clusters,
    split between neighbours by distance, restricted to ``free`` (default: outside all clusters).

    Returns
    -------
    (Z, Y, X) int64 ndarray
    """
    clu = as_labels(clusters, "clusters")
    zyx = as_spacing(spacing)
    if free is None:
        free = clu == 0
    sp = zyx[1:] if clu.shape[0] == 1 else zyx
    src = clu[0] if clu.shape[0] == 1 else clu
    outer = expand_labels(src, distance=ring_gap_um + ring_width_um, spacing=sp)
    inner = expand_labels(src, distance=ring_gap_um, spacing=sp) if ring_gap_um > 0 else src
    if clu.shape[0] == 1:
        outer, inner = outer[np.newaxis], inner[np.newaxis]
    return np.where(free & (inner == 0), outer, 0)


def _region_stats(
    values: np.ndarray, regions: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """count, sum, mean, median of ``values`` per region label 1..n (index 0 unused)."""
    flat_r = regions.ravel()
    flat_v = values.ravel()
    count = np.bincount(flat_r, minlength=n + 1)[: n + 1].astype(np.float64)
    total = np.bincount(flat_r, weights=flat_v, minlength=n + 1)[: n + 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    median = grouped_percentile(flat_v, flat_r, n, 50.0)
    return count, total, mean, median


def measure_cells(
    nuclei: np.ndarray,
    clusters: np.ndarray,
    intensities: Mapping[str, np.ndarray],
    *,
    spacing: float | Sequence[float],
    compartments: Mapping[str, str] | None = None,
    cytoplasm_um: float = 5.0,
    background: BackgroundMethod | Mapping[str, float] = "ring",
    background_percentile: float = 50.0,
    ring_gap_um: float = 2.0,
    ring_width_um: float = 15.0,
    block: int | None = MEASURE_BLOCK,
) -> pd.DataFrame:
    """One row per nucleus: cluster, size, and background-corrected intensity of every marker.

    Fields wider or taller than ``block`` pixels are measured block by block: each cell inside
    a window that holds its nucleus and everything its cytoplasm depends on, and each
    background from its voxels gathered over the blocks, so the working memory stays flat as
    fields grow (stitched well mosaics) and the table is the one measured whole.

    Parameters
    ----------
    nuclei : (Z, Y, X) or (Y, X) int ndarray
        Nucleus instance labels; each label is a cell.
    clusters : (Z, Y, X) or (Y, X) int ndarray
        Cluster instance labels on the same grid.
    intensities : dict of str to (Z, Y, X) ndarray
        Marker name → its channel. Include the nuclear stain if its intensity is wanted.
    spacing : float or sequence
        Voxel size in µm, ``(z, y, x)`` or ``(y, x)``.
    compartments : dict of str to {"nuclear", "cytoplasmic"}, optional
        Where each marker is measured; markers not listed are nuclear.
    cytoplasm_um : float
        Reach of the cytoplasm beyond the nucleus, µm (see :func:`cytoplasm_labels`).
    background : {"ring", "global", "none"} or dict of str to float
        Background correction (see :func:`background_levels`), or fixed values per marker.
    background_percentile, ring_gap_um, ring_width_um : float
        Passed to :func:`background_levels`.
    block : int or None
        Block side in pixels (default :data:`MEASURE_BLOCK`); ``None``: the field whole.

    Returns
    -------
    pandas.DataFrame
        Columns ``cell_id`` (nucleus label), ``cluster_id`` (0 if none), ``centroid_z``,
        ``centroid_y``, ``centroid_x`` (voxels), ``n_voxels``, ``area_um2`` (2D) or ``volume_um3``
        (3D; the other is NaN), ``equivalent_diameter_um``, ``n_voxels_cytoplasm``, and for every
        marker ``M``: ``mean_M``, ``median_M``, ``integrated_M`` (background-corrected; integrated
        = sum over the compartment's voxels, intensity × voxels) and ``background_M``. A cell whose
        cytoplasm is empty (its nucleus fills its territory) is measured over its nucleus and has
        ``cytoplasm_empty`` True. Labels that do not occur are absent.

    Examples
    --------
    >>> nuc = np.zeros((1, 20, 20), np.int32); nuc[0, 8:12, 8:12] = 1
    >>> clu = np.zeros_like(nuc); clu[0, 4:16, 4:16] = 1
    >>> img = np.where(clu > 0, 10.0, 2.0)
    >>> t = measure_cells(nuc, clu, {"INS": img}, spacing=1.0, compartments={"INS": "cytoplasmic"},
    ...                   background="global")
    >>> float(t.loc[0, "mean_INS"])
    8.0
    """
    nuc = as_labels(nuclei, "nuclei", convert=False)
    clu = as_labels(clusters, "clusters", convert=False)
    if nuc.shape != clu.shape:
        raise InputError(
            f"nuclei labels {nuc.shape} and cluster labels {clu.shape} differ in shape; "
            "both must be on the image's grid"
        )
    if block is not None and not (isinstance(block, int | np.integer) and block >= 1):
        raise InputError(f"block={block!r} must be a whole number of pixels >= 1 (or None)")
    zyx = as_spacing(spacing)
    compartments = dict(compartments or {})
    # checked now, converted to float64 window by window below (memory)
    images = {
        name: as_intensity(img, nuc.shape, name, convert=False) for name, img in intensities.items()
    }
    for name, comp in compartments.items():
        if comp not in ("nuclear", "cytoplasmic"):
            raise InputError(f"compartment of {name!r} is {comp!r}; use 'nuclear' or 'cytoplasmic'")
    n_clusters = int(clu.max(initial=0))
    if isinstance(background, Mapping):
        missing = [name for name in images if name not in background]
        if missing:
            raise InputError(f"no background value given for marker {missing[0]!r}")
        backgrounds = {name: np.full(n_clusters + 1, float(background[name])) for name in images}
    else:
        backgrounds = _backgrounds(
            nuc,
            clu,
            images,
            spacing=zyx,
            method=background,
            percentile=background_percentile,
            ring_gap_um=ring_gap_um,
            ring_width_um=ring_width_um,
            block=block,
        )
    needs_cyto = any(c == "cytoplasmic" for c in compartments.values())
    # each cell is measured in the window of the block holding its bounding box's first corner;
    # the window reaches past the block by the largest nucleus and twice the cytoplasm (the
    # nuclei that compete for its cytoplasm), so the cell sees all it would see whole
    boxes = ndi.find_objects(nuc)
    starts = np.array([(-1, -1) if b is None else (b[1].start, b[2].start) for b in boxes])
    starts = starts.reshape(-1, 2)
    extent = max(
        (max(b[1].stop - b[1].start, b[2].stop - b[2].start) for b in boxes if b is not None),
        default=0,
    )
    reach = max(math.ceil(2 * cytoplasm_um / v) + 2 for v in zyx[1:]) if needs_cyto else 0
    jobs = []
    for blk in _blocks(nuc.shape, block, halo=extent + reach):
        (y0, y1), (x0, x1) = ((sl.start, sl.stop) for sl in blk.core)
        owned = np.zeros(len(boxes) + 1, dtype=bool)
        owned[1:] = (
            (starts[:, 0] >= y0) & (starts[:, 0] < y1) & (starts[:, 1] >= x0) & (starts[:, 1] < x1)
        )
        if owned.any():
            jobs.append(((slice(None), *blk.window), owned))
    if not jobs:  # no nuclei: the columns, without rows
        jobs.append(((slice(None), slice(0, 1), slice(0, 1)), np.zeros(len(boxes) + 1, bool)))
    parts = [
        _cell_columns(
            nuc[win],
            clu[win],
            {name: img[win] for name, img in images.items()},
            spacing=zyx,
            compartments=compartments,
            cytoplasm_um=cytoplasm_um,
            needs_cyto=needs_cyto,
            backgrounds=backgrounds,
            owned=owned,
            offset=(win[1].start, win[2].start),
            is_3d=nuc.shape[0] > 1,
        )
        for win, owned in jobs
    ]
    table = pd.DataFrame({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    return table.sort_values("cell_id", kind="stable", ignore_index=True)


def _blocks(shape: tuple[int, ...], block: int | None, *, halo: int) -> list[Block]:
    """The blocks that tile a (Z, Y, X) field (:func:`~islet_imaging.models._blocks.plan_blocks`,
    as segmentation plans them; one block when ``None``), windows ``halo`` px around their cores."""
    from islet_imaging.models._blocks import plan_blocks

    _, height, width = shape
    return plan_blocks((height, width), max(height, width) if block is None else block, halo)


def _cell_columns(
    nuclei: np.ndarray,
    clusters: np.ndarray,
    images: Mapping[str, np.ndarray],
    *,
    spacing: tuple[float, float, float],
    compartments: Mapping[str, str],
    cytoplasm_um: float,
    needs_cyto: bool,
    backgrounds: Mapping[str, np.ndarray],
    owned: np.ndarray | None,
    offset: tuple[int, int],
    is_3d: bool,
) -> dict[str, np.ndarray]:
    """The columns of :func:`measure_cells` for the cells of one window (``owned`` labels only)."""
    nuc = nuclei.astype(np.int64, copy=False)
    clu = clusters.astype(np.int64, copy=False)
    zyx = spacing
    n = int(nuc.max(initial=0))
    count = np.bincount(nuc.ravel(), minlength=n + 1).astype(np.float64)
    present = np.flatnonzero(count)
    present = present[present > 0]
    if owned is not None:
        present = present[owned[present]]
    table: dict[str, np.ndarray] = {"cell_id": present.astype(np.int64)}
    cluster_ids = cell_cluster_ids(nuc, clu)
    table["cluster_id"] = cluster_ids[present]
    zz, yy, xx = np.indices(nuc.shape, sparse=True)
    for axis, coords, shift in zip(("z", "y", "x"), (zz, yy, xx), (0, *offset), strict=True):
        w = np.broadcast_to(coords, nuc.shape).ravel().astype(np.float64)
        sums = np.bincount(nuc.ravel(), weights=w, minlength=n + 1)
        table[f"centroid_{axis}"] = sums[present] / count[present] + shift
    table["n_voxels"] = count[present].astype(np.int64)
    if is_3d:
        volume = count[present] * zyx[0] * zyx[1] * zyx[2]
        table["area_um2"] = np.full(len(present), np.nan)
        table["volume_um3"] = volume
        table["equivalent_diameter_um"] = np.cbrt(6.0 * volume / np.pi)
    else:
        area = count[present] * zyx[1] * zyx[2]
        table["area_um2"] = area
        table["volume_um3"] = np.full(len(present), np.nan)
        table["equivalent_diameter_um"] = np.sqrt(4.0 * area / np.pi)

    cyto = None
    cyto_count = np.zeros(n + 1)
    if needs_cyto:
        cyto = cytoplasm_labels(
            nuc, clu, spacing=zyx, cytoplasm_um=cytoplasm_um, cluster_ids=cluster_ids
        )
        cyto_count = np.bincount(cyto.ravel(), minlength=n + 1)[: n + 1].astype(np.float64)
    table["n_voxels_cytoplasm"] = cyto_count[present].astype(np.int64)
    empty = cyto_count[present] == 0
    table["cytoplasm_empty"] = empty if needs_cyto else np.zeros(len(present), dtype=bool)

    for name, view in images.items():
        img = as_intensity(view, nuc.shape, name)
        cell_bg = backgrounds[name][cluster_ids[present]]
        _, n_total, n_mean, n_median = _region_stats(img, nuc, n)
        if compartments.get(name, "nuclear") == "cytoplasmic":
            assert cyto is not None
            c_count, c_total, c_mean, c_median = _region_stats(img, cyto, n)
            use_nuc = empty
            raw_mean = np.where(use_nuc, n_mean[present], c_mean[present])
            raw_median = np.where(use_nuc, n_median[present], c_median[present])
            raw_total = np.where(use_nuc, n_total[present], c_total[present])
            voxels = np.where(use_nuc, count[present], c_count[present])
        else:
            raw_mean, raw_median = n_mean[present], n_median[present]
            raw_total, voxels = n_total[present], count[present]
        table[f"mean_{name}"] = raw_mean - cell_bg
        table[f"median_{name}"] = raw_median - cell_bg
        table[f"integrated_{name}"] = raw_total - cell_bg * voxels
        table[f"background_{name}"] = cell_bg
        del img
    return table


def _backgrounds(
    nuclei: np.ndarray | None,
    clusters: np.ndarray,
    images: Mapping[str, np.ndarray],
    *,
    spacing: tuple[float, float, float],
    method: BackgroundMethod,
    percentile: float,
    ring_gap_um: float,
    ring_width_um: float,
    fallback_percentile: float = 5.0,
    block: int | None,
) -> dict[str, np.ndarray]:
    """:func:`background_levels` of every marker, gathered block by block (see there).

    Returns, per marker, the background per cluster label with the field value at entry 0.
    """
    n = int(clusters.max(initial=0))
    if method == "none":
        return {name: np.zeros(n + 1) for name in images}
    if method not in ("ring", "global"):
        raise InputError(f"background method {method!r} is not one of 'ring', 'global', 'none'")
    rings = method == "ring" and n > 0
    # a voxel's ring label depends on the clusters within the ring's outer reach of it
    reach = (
        max(math.ceil((ring_gap_um + ring_width_um) / v) + 1 for v in spacing[1:]) if rings else 0
    )
    free_values = {name: _Values() for name in images}
    ring_values = {name: _Values() for name in images}
    n_free = 0
    blocks = _blocks(clusters.shape, block, halo=reach)
    for blk in blocks:
        win = (slice(None), *blk.window)
        inner = (slice(None), *blk.core_in_window)
        clu = clusters[win].astype(np.int64, copy=False)
        free = clu == 0
        if nuclei is not None:
            free &= nuclei[win] == 0
        ring = (
            background_rings(
                clu,
                spacing=spacing,
                free=free,
                ring_gap_um=ring_gap_um,
                ring_width_um=ring_width_um,
            )[inner]
            if rings
            else None
        )
        free = free[inner]
        n_free += int(np.count_nonzero(free))
        for name, img in images.items():
            values = img[(slice(None), *blk.core)]
            free_values[name].add(None, values[free])
            if ring is not None:
                on_ring = ring > 0
                ring_values[name].add(ring[on_ring], values[on_ring])
    out = {}
    for name, img in images.items():
        if n_free >= MIN_BACKGROUND_VOXELS:
            field_value = free_values[name].percentiles(percentile, 1)[1]
        else:
            everything = _Values()
            for blk in blocks:
                everything.add(None, img[(slice(None), *blk.core)].ravel())
            field_value = everything.percentiles(fallback_percentile, 1)[1]
            log.debug(
                "no background outside clusters; using the image's %g-th percentile",
                fallback_percentile,
            )
        per_cluster = np.full(n + 1, float(field_value))
        if rings:
            values = ring_values[name].percentiles(percentile, n)
            ok = ring_values[name].counts(n) >= MIN_BACKGROUND_VOXELS
            ok[0] = False
            per_cluster[ok] = values[ok]
        out[name] = per_cluster
    return out


class _Values:
    """Values per label gathered block by block, for exact percentiles per label.

    Integer values of at most 16 bits (what microscopes write) are kept as counts of distinct
    (label, value) pairs, so memory follows the number of distinct pairs, not of voxels.
    """

    _BITS = 17  # value + 2**15 of any 8/16-bit integer fits in 17 bits
    _COMPACT = 1 << 22  # merge the counts of the blocks when they hold this many entries

    def __init__(self) -> None:
        self._labels: list[np.ndarray] = []
        self._values: list[np.ndarray] = []
        self._counts: list[np.ndarray] = []
        self._keys: list[np.ndarray] = []
        self._pending = 0

    def add(self, labels: np.ndarray | None, values: np.ndarray) -> None:
        """Add ``values`` with their ``labels`` (``None``: all label 1)."""
        values = np.ravel(values)
        labels = (
            np.ones(values.size, np.int64) if labels is None else np.ravel(labels).astype(np.int64)
        )
        if values.dtype.kind in "iu" and values.dtype.itemsize <= 2:
            keys = (labels << self._BITS) | (values.astype(np.int64) + 2**15)
            keys, counts = np.unique(keys, return_counts=True)
            self._keys.append(keys)
            self._counts.append(counts)
            self._pending += keys.size
            if self._pending > self._COMPACT:
                self._compact()
        else:
            self._labels.append(labels)
            self._values.append(values.astype(np.float64))

    def _compact(self) -> None:
        keys, inverse = np.unique(np.concatenate(self._keys), return_inverse=True)
        counts = np.bincount(inverse.ravel(), weights=np.concatenate(self._counts))
        self._keys, self._counts = [keys], [counts.astype(np.int64)]
        self._pending = keys.size

    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(labels, values, counts) sorted by label, then value."""
        if self._keys:
            self._compact()
            keys = self._keys[0]
            labels = keys >> self._BITS
            values = ((keys & ((1 << self._BITS) - 1)) - 2**15).astype(np.float64)
            return labels, values, self._counts[0]
        if not self._labels:
            return np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64)
        labels = np.concatenate(self._labels)
        values = np.concatenate(self._values)
        order = np.lexsort((values, labels))
        return labels[order], values[order], np.ones(labels.size, np.int64)

    def counts(self, n: int) -> np.ndarray:
        """Number of values of each label ``0..n``."""
        labels, _, counts = self._arrays()
        keep = labels <= n
        return np.bincount(labels[keep], weights=counts[keep], minlength=n + 1).astype(np.int64)

    def percentiles(self, q: float, n: int) -> np.ndarray:
        """Percentile ``q`` of each label ``0..n`` (NaN where a label has none), as
        :func:`~islet_imaging.measure._validate.grouped_percentile` computes it."""
        labels, values, counts = self._arrays()
        keep = labels <= n
        labels, values, counts = labels[keep], values[keep], counts[keep]
        out = np.full(n + 1, np.nan)
        totals = np.bincount(labels, weights=counts, minlength=n + 1).astype(np.int64)
        present = np.flatnonzero(totals)
        if present.size == 0:
            return out
        starts = np.concatenate([[0], np.cumsum(totals)[:-1]])[present]
        last = np.cumsum(counts)  # rank just past each entry, in the expanded sorted values
        pos = starts + q / 100.0 * (totals[present] - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, starts + totals[present] - 1)
        frac = pos - lo
        v_lo = values[np.searchsorted(last, lo, side="right")]
        v_hi = values[np.searchsorted(last, hi, side="right")]
        out[present] = v_lo * (1 - frac) + v_hi * frac
        return out
