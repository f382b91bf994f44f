"""Where the cells are: cluster shapes, nucleus packing, cytoplasm territories and debris.

Everything is laid out in physical units (µm) on a ``(Z, Y, X)`` voxel grid whose voxel ``k`` sits at
``k * spacing``. A 2D field is the ``z = 0`` section through the same 3D objects, so aggregate
sections show nuclei cut at different heights, as a real optical section does.

Objects are painted with a "lowest normalised distance wins" rule: each object defines a score that
is 0 at its centre and 1 on its surface, and a voxel belongs to the object with the lowest score
below 1. Overlapping nuclei therefore end up touching along a natural interface, and touching
clusters are separated the same way, which is what the truth labels need.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from islet_imaging.synth._stages import StageLook

__all__ = ["Layout", "blur", "make_layout", "smooth_noise", "upsample"]

_NONE = np.float32(2.0)  # score of voxels that belong to no object


@dataclass(frozen=True, eq=False)
class Layout:
    """The geometry of one field; every array is on the ``(Z, Y, X)`` grid.

    Attributes
    ----------
    nuclei : (Z, Y, X) ndarray of int32
        Nucleus instance labels 1..N.
    clusters : (Z, Y, X) ndarray of int32
        Cluster instance labels 1..M (the region occupied by the cluster's cells).
    cytoplasm : (Z, Y, X) ndarray of int32
        Each cell's cytoplasm (its territory minus its nucleus), labelled with the cell's id.
    depth : (Z, Y, X) ndarray of float32
        Inside nuclei: ``1 - score`` (1 at the centre, 0 on the surface), 0 elsewhere.
    cell_cluster : (N,) ndarray of int32
        Cluster of cell ``i + 1`` (0 for isolated cells).
    mitotic : (N,) ndarray of bool
        Cells with condensed chromatin.
    edge_distance_um : (N,) ndarray of float
        Distance of each cell's centre to its cluster's edge (inf for isolated cells).
    radius_um : (N,) ndarray of float
        Mean semi-axis of each nucleus.
    debris : (K, 4) ndarray of float
        ``z, y, x, radius`` in µm of each debris speck.
    territory : (Z, Y, X) ndarray of int32
        Each cell's whole territory (nucleus and cytoplasm), labelled with the cell's id.
    nucleus_distance_um : (Z, Y, X) ndarray of float32
        Distance to the nearest nucleus voxel in µm.
    """

    nuclei: np.ndarray
    clusters: np.ndarray
    cytoplasm: np.ndarray
    depth: np.ndarray
    cell_cluster: np.ndarray
    mitotic: np.ndarray
    edge_distance_um: np.ndarray
    radius_um: np.ndarray
    debris: np.ndarray
    territory: np.ndarray
    nucleus_distance_um: np.ndarray


def smooth_noise(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    scale_um: float,
) -> np.ndarray:
    """Smooth Gaussian random field with unit standard deviation and correlation ~``scale_um``.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of randomness.
    shape : (int, int, int)
        ``(Z, Y, X)`` output shape.
    spacing : (float, float, float)
        Voxel size in µm.
    scale_um : float
        Correlation length in µm.

    Returns
    -------
    (Z, Y, X) ndarray of float32
    """
    step = scale_um / 2.0
    coarse_shape = tuple(
        max(2, int(np.ceil(n * s / step)) + 3) if n > 1 else 1
        for n, s in zip(shape, spacing, strict=True)
    )
    coarse = rng.standard_normal(coarse_shape).astype(np.float32)
    sigma = tuple(1.0 if n > 1 else 0.0 for n in coarse_shape)
    coarse = ndi.gaussian_filter(coarse, sigma, mode="wrap")
    out = upsample(coarse, shape, [s / step for s in spacing], offset=1.0)
    out -= out.mean()
    sd = float(out.std())
    return (out / sd if sd > 0 else out).astype(np.float32)


def _interp_along(
    arr: np.ndarray, n_out: int, scale: float, offset: float, axis: int
) -> np.ndarray:
    """Linear interpolation along ``axis``: output k samples input position ``k * scale + offset``."""
    n_in = arr.shape[axis]
    pos = np.clip(np.arange(n_out) * scale + offset, 0.0, n_in - 1.0)
    lo = np.minimum(np.floor(pos).astype(np.intp), max(n_in - 2, 0))
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (pos - lo).astype(np.float32)
    shape = [1, 1, 1]
    shape[axis] = n_out
    frac = frac.reshape(shape)
    a = np.take(arr, lo, axis=axis)
    b = np.take(arr, hi, axis=axis)
    return a + (b - a) * frac


def upsample(
    coarse: np.ndarray, shape: tuple[int, ...], scale: list[float], offset: float = 0.0
) -> np.ndarray:
    """Separable linear interpolation of ``coarse`` onto ``shape`` (output voxel k samples
    coarse position ``k * scale + offset`` along each axis; single-plane axes are broadcast)."""
    out = coarse.astype(np.float32)
    for axis, (n_out, sc) in enumerate(zip(shape, scale, strict=True)):
        n_in = out.shape[axis]
        if n_in == 1:
            out = np.repeat(out, n_out, axis=axis) if n_out > 1 else out
            continue
        out = _interp_along(out, n_out, sc, offset, axis)
    return np.ascontiguousarray(out, dtype=np.float32)


def blur(image: np.ndarray, sigma: list[float] | tuple[float, ...]) -> np.ndarray:
    """Gaussian blur (voxel sigmas); wide kernels run on a binned copy and are interpolated back."""
    smallest = min(
        (s for s, n in zip(sigma, image.shape, strict=True) if n > 1 and s > 0), default=0
    )
    factor = int(smallest // 3)
    if factor < 2:
        return ndi.gaussian_filter(image, sigma, mode="nearest")
    factors = [
        factor if (n > 1 and s >= 3 * factor) else 1
        for s, n in zip(sigma, image.shape, strict=True)
    ]
    pads = [(-n) % f for n, f in zip(image.shape, factors, strict=True)]
    padded = np.pad(image, [(0, p) for p in pads], mode="edge")
    binned = padded.reshape(
        [d for n, f in zip(padded.shape, factors, strict=True) for d in (n // f, f)]
    ).mean(axis=tuple(range(1, 2 * image.ndim, 2)))
    small = ndi.gaussian_filter(
        binned, [s / f for s, f in zip(sigma, factors, strict=True)], mode="nearest"
    )
    scale = [1.0 / f for f in factors]
    offsets = [(1.0 / f - 1.0) / 2.0 for f in factors]
    out = small
    out = out.astype(np.float32)
    for axis, (n_out, sc, off) in enumerate(zip(image.shape, scale, offsets, strict=True)):
        if factors[axis] == 1:
            continue
        out = _interp_along(out, n_out, sc, off, axis)
    return np.ascontiguousarray(out, dtype=np.float32)


def _random_rotation(rng: np.random.Generator, in_plane: bool) -> np.ndarray:
    """A random rotation matrix whose columns are the object's axes in (z, y, x) world frame."""
    if in_plane:
        t = rng.uniform(0, np.pi)
        c, s = np.cos(t), np.sin(t)
        return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _bbox(
    center: np.ndarray, extent: float, spacing: np.ndarray, shape: tuple[int, int, int]
) -> tuple[slice, ...] | None:
    lo = np.maximum(np.floor((center - extent) / spacing).astype(int), 0)
    hi = np.minimum(np.ceil((center + extent) / spacing).astype(int) + 1, shape)
    if np.any(hi <= lo):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))


def _local_offsets(
    sl: tuple[slice, ...], center: np.ndarray, spacing: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    dz = (np.arange(sl[0].start, sl[0].stop) * spacing[0] - center[0])[:, None, None]
    dy = (np.arange(sl[1].start, sl[1].stop) * spacing[1] - center[1])[None, :, None]
    dx = (np.arange(sl[2].start, sl[2].stop) * spacing[2] - center[2])[None, None, :]
    return dz, dy, dx


def _ellipsoid_score(
    d: tuple[np.ndarray, np.ndarray, np.ndarray], rot: np.ndarray, axes: np.ndarray
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Normalised distance ``|A^-1 R^T d|`` and the unit direction in the normalised frame."""
    dz, dy, dx = d
    q = [(rot[0, j] * dz + rot[1, j] * dy + rot[2, j] * dx) / axes[j] for j in range(3)]
    s = np.sqrt(q[0] * q[0] + q[1] * q[1] + q[2] * q[2])
    inv = 1.0 / np.maximum(s, 1e-6)
    return s, (q[0] * inv, q[1] * inv, q[2] * inv)


# -- clusters ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Blob:
    centers: np.ndarray  # (L, 3) lobe centres, µm
    axes: np.ndarray  # (L, 3) lobe semi-axes, µm
    rots: np.ndarray  # (L, 3, 3)
    radius: float


def _make_blob(
    rng: np.random.Generator, center: np.ndarray, radius: float, *, flat: bool, z_ratio: float
) -> _Blob:
    centers = [center]
    axes = [np.array([radius * z_ratio, radius, radius]) * [1.0, *rng.uniform(0.85, 1.15, 2)]]
    rots = [_random_rotation(rng, in_plane=True)]
    for _ in range(int(rng.integers(0, 4))):
        direction = rng.standard_normal(3)
        if flat:
            direction[0] = 0.0
        else:
            direction[0] *= 0.5
        direction /= np.linalg.norm(direction) + 1e-12
        r = radius * rng.uniform(0.35, 0.6)
        centers.append(center + direction * radius * rng.uniform(0.45, 0.75))
        axes.append(np.array([r * z_ratio, r, r]) * [1.0, *rng.uniform(0.8, 1.2, 2)])
        rots.append(_random_rotation(rng, in_plane=True))
    return _Blob(np.array(centers), np.array(axes), np.array(rots), radius)


def _place_blobs(
    rng: np.random.Generator,
    look: StageLook,
    extent_um: np.ndarray,
    *,
    flat: bool,
    thick: bool,
) -> list[_Blob]:
    """Cluster blobs covering about ``look.coverage`` of the field, some touching, some cut."""
    height, width = float(extent_um[1]), float(extent_um[2])
    coverage = rng.uniform(*look.coverage)
    lo, hi = look.cluster_diameter_um
    blobs: list[_Blob] = []
    covered = 0.0
    for _ in range(300):
        if covered >= coverage * height * width:
            break
        radius = 0.5 * float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        if blobs and rng.random() < look.touching:
            other = blobs[int(rng.integers(len(blobs)))]
            dist = (other.radius + radius) * rng.uniform(0.68, 0.85)
            # prefer a direction that keeps the new cluster's centre in the field
            for _try in range(8):
                angle = rng.uniform(0, 2 * np.pi)
                yx = other.centers[0][1:] + dist * np.array([np.sin(angle), np.cos(angle)])
                if 0 <= yx[0] <= height and 0 <= yx[1] <= width:
                    break
            touching_other: _Blob | None = other
        else:
            margin = 0.4 * radius
            yx = np.array(
                [rng.uniform(-margin, height + margin), rng.uniform(-margin, width + margin)]
            )
            touching_other = None
        ok = True
        for b in blobs:
            gap = float(np.hypot(*(b.centers[0][1:] - yx)))
            limit = 0.66 if b is touching_other else 1.02
            if gap < limit * (b.radius + radius):
                ok = False
                break
        if not ok:
            continue
        if thick:
            # aggregates in a z-stack: centre somewhere in (or a little outside) the stack
            z = rng.uniform(-0.2 * radius, float(extent_um[0]) + 0.2 * radius)
            z_ratio = rng.uniform(0.8, 1.0)
        elif flat:
            z, z_ratio = 0.0, 1e3  # colonies and sheets: the section is the whole shape
        else:
            z, z_ratio = rng.uniform(-0.2, 0.2) * radius, rng.uniform(0.85, 1.0)
        center = np.array([z, yx[0], yx[1]])
        blobs.append(_make_blob(rng, center, radius, flat=flat, z_ratio=z_ratio))
        y0, y1 = max(yx[0] - radius, 0.0), min(yx[0] + radius, height)
        x0, x1 = max(yx[1] - radius, 0.0), min(yx[1] + radius, width)
        covered += max(y1 - y0, 0.0) * max(x1 - x0, 0.0) * np.pi / 4
    return blobs


def _paint_blobs(
    blobs: list[_Blob],
    shape: tuple[int, int, int],
    spacing: np.ndarray,
    noise: np.ndarray,
    roughness: float,
) -> np.ndarray:
    labels = np.zeros(shape, np.int32)
    score = np.full(shape, _NONE, np.float32)
    for i, blob in enumerate(blobs, start=1):
        extent = 1.9 * blob.radius
        sl = _bbox(blob.centers[0], np.full(3, extent), spacing, shape)
        if sl is None:
            continue
        best: np.ndarray | None = None
        for c, a, r in zip(blob.centers, blob.axes, blob.rots, strict=True):
            s, _ = _ellipsoid_score(_local_offsets(sl, c, spacing), r, a)
            best = s if best is None else np.minimum(best, s)
        assert best is not None
        s = best / np.maximum(1.0 + roughness * noise[sl], 0.3)
        reg, sc = labels[sl], score[sl]
        m = (s < 1.0) & (s < sc)
        reg[m] = i
        sc[m] = s[m]
    return _largest_components(labels)


def _sheet_labels(
    rng: np.random.Generator,
    look: StageLook,
    shape: tuple[int, int, int],
    spacing: np.ndarray,
    nucleus_d: float,
) -> np.ndarray:
    """Near-confluent monolayer patches: a thresholded smooth random field, holes as gaps."""
    flat_shape = (1, shape[1], shape[2])
    coverage = rng.uniform(*look.coverage)
    field = smooth_noise(rng, flat_shape, tuple(spacing), rng.uniform(45.0, 90.0))
    field += 0.25 * smooth_noise(rng, flat_shape, tuple(spacing), 12.0)
    thr = float(np.quantile(field, 1.0 - coverage))
    mask = field[0] > thr
    # remove thin necks and specks smaller than a few cells
    r = 0.6 * nucleus_d
    # opening with a disc of radius r through distance transforms (fast for large r)
    eroded = ndi.distance_transform_edt(mask, sampling=spacing[1:]) > r
    mask = ndi.distance_transform_edt(~eroded, sampling=spacing[1:]) <= r
    labels, _ = ndi.label(mask)
    areas = np.bincount(labels.ravel())
    small = areas < (4 * nucleus_d / spacing[1]) ** 2
    small[0] = False
    labels[small[labels]] = 0
    labels = _relabel(labels)
    return np.broadcast_to(labels[None], flat_shape).astype(np.int32)


def _relabel(labels: np.ndarray) -> np.ndarray:
    ids = np.unique(labels)
    ids = ids[ids > 0]
    lut = np.zeros(int(labels.max()) + 1, np.int32)
    lut[ids] = np.arange(1, ids.size + 1, dtype=np.int32)
    return lut[labels]


def _pieces(
    labels: np.ndarray, structure: np.ndarray | None = None
) -> Iterator[tuple[int, tuple[slice, ...], np.ndarray, np.ndarray]]:
    """Per label: ``(label, bounding-box slice, its connected pieces 1..n in the box, sizes)``.

    ``sizes[k]`` is the voxel count of piece ``k`` (``sizes[0] = 0``); ``structure`` as in
    :func:`scipy.ndimage.label` (default: face connectivity).
    """
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        comp, _ = ndi.label(labels[sl] == i, structure)
        sizes = np.bincount(comp.ravel())
        sizes[0] = 0
        yield i, sl, comp, sizes


def _largest_components(labels: np.ndarray) -> np.ndarray:
    """Keep only the largest connected piece of every label (touching clusters can cut others)."""
    out = labels.copy()
    for _, sl, comp, sizes in _pieces(labels):
        if sizes.size > 2:
            out[sl][(comp > 0) & (comp != int(np.argmax(sizes)))] = 0
    return out


# -- nuclei ------------------------------------------------------------------------------------
def _lattice(
    rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray, step: float, *, volume: bool
) -> np.ndarray:
    """Jitter-free close-packed lattice points covering the box ``lo..hi`` (µm), random orientation."""
    center = 0.5 * (lo + hi)
    half = 0.5 * float(np.max(hi - lo)) * (1.8 if volume else 1.5) + step
    n = int(np.ceil(half / step)) + 1
    i = np.arange(-n, n + 1)
    if volume:
        a, b, c = np.meshgrid(i, i, i, indexing="ij")
        a, b, c = a.ravel(), b.ravel(), c.ravel()
        pts = step * np.stack(
            [np.sqrt(2.0 / 3.0) * c, np.sqrt(3.0) / 2.0 * (b + c / 3.0), a + (b + c) / 2.0],
            axis=1,
        )
        rot = _random_rotation(rng, in_plane=False)
    else:
        a, b = np.meshgrid(i, i, indexing="ij")
        a, b = a.ravel(), b.ravel()
        pts = step * np.stack([np.zeros(a.size), np.sqrt(3.0) / 2.0 * b, a + b / 2.0], axis=1)
        rot = _random_rotation(rng, in_plane=True)
    pts = pts @ rot.T + center + rng.uniform(-0.5, 0.5, 3) * step * (1 if volume else [0, 1, 1])
    keep = np.all((pts >= lo - step) & (pts <= hi + step), axis=1)
    return pts[keep]


def _voxel_of(points: np.ndarray, spacing: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Nearest voxel of each point (a single plane holds every z)."""
    idx = np.rint(points / spacing).astype(int)
    if shape[0] == 1:
        idx[:, 0] = 0
    return np.clip(idx, 0, np.array(shape) - 1)


def _inside(points: np.ndarray, shape: tuple[int, int, int], spacing: np.ndarray) -> np.ndarray:
    idx = np.rint(points / spacing)
    if shape[0] == 1:
        idx[:, 0] = 0
    return np.all((idx >= 0) & (idx < np.array(shape)), axis=1)


@dataclass
class _Cells:
    centers: list[np.ndarray]
    axes: list[np.ndarray]
    rots: list[np.ndarray]
    bumps: list[np.ndarray]
    cluster: list[int]
    mitotic: list[bool]
    edge: list[float]

    @classmethod
    def empty(cls) -> _Cells:
        return cls([], [], [], [], [], [], [])

    def add(
        self,
        rng: np.random.Generator,
        center: np.ndarray,
        diameter: float,
        *,
        cluster: int,
        edge: float,
        in_plane: bool,
        z_ratio: float,
        aspect_sd: float,
        mitotic: bool,
    ) -> None:
        r = 0.5 * diameter
        aspect = 1.0 + min(abs(rng.normal(0.0, aspect_sd)), 0.9)
        axes = np.array([r * z_ratio, r * np.sqrt(aspect), r / np.sqrt(aspect)])
        self.centers.append(center)
        self.axes.append(axes)
        self.rots.append(_random_rotation(rng, in_plane=in_plane))
        # shape irregularity: three quadratic bumps + one cubic (egg-shape) term
        dirs = rng.standard_normal((4, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        amps = np.concatenate([rng.normal(0.0, 0.09, 3), rng.normal(0.0, 0.07, 1)])
        self.bumps.append(np.concatenate([dirs, amps[:, None]], axis=1))
        self.cluster.append(cluster)
        self.mitotic.append(mitotic)
        self.edge.append(edge)


def _paint_nuclei(
    cells: _Cells, shape: tuple[int, int, int], spacing: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    labels = np.zeros(shape, np.int32)
    score = np.full(shape, _NONE, np.float32)
    for i in range(len(cells.centers)):
        c, a, rot, bump = cells.centers[i], cells.axes[i], cells.rots[i], cells.bumps[i]
        extent = float(a.max()) * 1.45
        sl = _bbox(c, np.full(3, extent), spacing, shape)
        if sl is None:
            continue
        s, u = _ellipsoid_score(_local_offsets(sl, c, spacing), rot, a)
        eps = 0.0
        for k in range(4):
            proj = u[0] * bump[k, 0] + u[1] * bump[k, 1] + u[2] * bump[k, 2]
            eps = eps + bump[k, 3] * (proj * proj - 1.0 / 3.0 if k < 3 else proj * proj * proj)
        s = (s / np.maximum(1.0 + eps, 0.5)).astype(np.float32)
        reg, sc = labels[sl], score[sl]
        m = (s < 1.0) & (s < sc)
        reg[m] = i + 1
        sc[m] = s[m]
    return labels, score


def _clean_nuclei(labels: np.ndarray, expected_voxels: np.ndarray, min_voxels: int) -> np.ndarray:
    """Largest connected piece of every nucleus; drop slivers smaller than a third of expected."""
    out = labels.copy()
    for i, sl, comp, sizes in _pieces(labels):
        largest = int(np.argmax(sizes))
        out[sl][(comp > 0) & (comp != largest)] = 0
        if sizes[largest] < max(min_voxels, 0.33 * expected_voxels[i - 1]):
            out[sl][comp == largest] = 0
    return out


# -- main entry --------------------------------------------------------------------------------
def make_layout(
    rng: np.random.Generator,
    look: StageLook,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
) -> Layout:
    """Draw the geometry of one field.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of randomness; the layout is a pure function of its state.
    look : StageLook
        The stage's appearance parameters.
    shape : (int, int, int)
        ``(Z, Y, X)`` grid.
    spacing : (float, float, float)
        Voxel size in µm (z step, y, x). For a single plane the z value is unused.
    """
    sp = np.asarray(spacing, float)
    extent = np.array(shape) * sp
    stack = shape[0] > 1
    flat = look.layout in ("colony", "sheet")
    nucleus_d = rng.uniform(*look.nucleus_diameter_um)
    step = nucleus_d * rng.uniform(*look.spacing)
    fill = rng.uniform(*look.fill)

    # 1. cluster regions ---------------------------------------------------------------------
    z0 = 0.5 * float(extent[0] - sp[0]) if stack else 0.0  # mid-plane of a monolayer stack
    slab = 1.5 * nucleus_d  # thickness of a monolayer / colony
    if look.layout == "sheet":
        blob_labels = _sheet_labels(rng, look, shape, sp, nucleus_d)
    else:
        blobs = _place_blobs(rng, look, extent, flat=flat, thick=stack and not flat)
        rough_scale = rng.uniform(12.0, 25.0)
        noise = smooth_noise(rng, (1, *shape[1:]) if flat else shape, tuple(sp), rough_scale)
        noise += 0.3 * smooth_noise(rng, noise.shape, tuple(sp), 5.0)  # ragged colony edges
        roughness = rng.uniform(0.06, 0.12)
        blob_labels = _paint_blobs(blobs, noise.shape, sp, noise, roughness)
        if blob_labels.shape != shape:
            blob_labels = np.broadcast_to(blob_labels, shape).copy()
    if stack and flat:
        zc = np.arange(shape[0]) * sp[0]
        outside = np.abs(zc - z0) > 0.5 * slab
        blob_labels = np.where(outside[:, None, None], 0, blob_labels).astype(np.int32)

    # distance to the nearest cluster edge (touching clusters count as edges)
    inner = blob_labels > 0
    inner &= ~_label_boundaries(blob_labels)
    edge_dist = ndi.distance_transform_edt(inner, sampling=sp) if inner.any() else None

    # 2. nuclei in clusters ------------------------------------------------------------------
    cells = _Cells.empty()
    volume = stack and not flat
    aspect_sd = 0.3 if look.layout == "sheet" else 0.2
    for cid, sl in enumerate(ndi.find_objects(blob_labels), start=1):
        if sl is None:
            continue
        lo = np.array([s.start for s in sl]) * sp
        hi = np.array([s.stop - 1 for s in sl]) * sp
        if look.layout == "sheet" and cid > 1:
            continue  # one lattice covers every patch of a sheet
        if look.layout == "sheet":
            lo, hi = np.zeros(3), (np.array(shape) - 1) * sp
        pts = _lattice(rng, lo, hi, step, volume=volume)
        pts = pts + rng.normal(0.0, look.jitter * step, pts.shape) * (
            [1.0, 1.0, 1.0] if volume else [0.0, 1.0, 1.0]
        )
        if not volume:
            if flat:
                pts[:, 0] = z0 + (rng.normal(0, 0.06 * nucleus_d, len(pts)) if stack else 0.0)
            else:
                # a section through an aggregate cuts each cell at a random height
                pts[:, 0] = rng.uniform(-0.3, 0.3, len(pts)) * step
        pts = pts[_inside(pts, shape, sp)]
        if len(pts) == 0:
            continue
        vox = _voxel_of(pts, sp, shape)
        owner = blob_labels[vox[:, 0], vox[:, 1], vox[:, 2]]
        dist = edge_dist[vox[:, 0], vox[:, 1], vox[:, 2]] if edge_dist is not None else 0
        wanted = owner > 0 if look.layout == "sheet" else owner == cid
        keep = wanted & (dist >= 0.3 * nucleus_d) & (rng.random(len(pts)) < fill)
        for p, owner_id, d_edge in zip(
            pts[keep], owner[keep], np.atleast_1d(dist)[keep], strict=True
        ):
            _add_cell(
                rng, cells, look, p, nucleus_d, int(owner_id), float(d_edge), stack, flat, aspect_sd
            )

    # 3. isolated cells -------------------------------------------------------------------------
    area_mm2 = float(extent[1] * extent[2]) * 1e-6
    n_iso = int(rng.poisson(rng.uniform(*look.isolated_per_mm2) * area_mm2))
    if n_iso:
        free = ndi.distance_transform_edt(blob_labels == 0, sampling=sp)
        placed: list[np.ndarray] = []
        for _ in range(n_iso * 6):
            if len(placed) >= n_iso:
                break
            p = rng.uniform(0, 1, 3) * (extent - sp)
            p[0] = z0 if (flat or not stack) else p[0]
            v = _voxel_of(p[None], sp, shape)[0]
            if free[tuple(v)] < 1.3 * nucleus_d:
                continue
            if any(np.linalg.norm(p - q) < 2.0 * nucleus_d for q in placed):
                continue
            placed.append(p)
            _add_cell(rng, cells, look, p, nucleus_d, 0, np.inf, stack, flat, aspect_sd)

    # 4. rasterise, clip to own cluster, clean -------------------------------------------------
    labels, score = _paint_nuclei(cells, shape, sp)
    cell_cluster = np.asarray([0, *cells.cluster], np.int32)
    labels[cell_cluster[labels] != blob_labels] = 0
    axes = np.asarray(cells.axes) if cells.axes else np.zeros((0, 3))
    voxel_volume = float(np.prod(sp)) if stack else float(sp[1] * sp[2])
    if stack:
        expected = 4.0 / 3.0 * np.pi * np.prod(axes, axis=1) / voxel_volume
    else:
        expected = np.pi * axes[:, 1] * axes[:, 2] / voxel_volume if len(axes) else axes[:, 0]
        # a section through a nucleus away from its centre is smaller: scale by the cut
        centers = np.asarray(cells.centers) if cells.centers else np.zeros((0, 3))
        if len(centers):
            cut = np.clip(1.0 - (centers[:, 0] / np.maximum(axes[:, 0], 1e-6)) ** 2, 0.0, 1.0)
            expected = expected * cut
    labels = _clean_nuclei(labels, expected, min_voxels=8 if not stack else 12)
    score[labels == 0] = _NONE

    # relabel nuclei 1..N in the order they were created
    present = np.unique(labels)
    present = present[present > 0]
    lut = np.zeros(len(cells.centers) + 1, np.int32)
    lut[present] = np.arange(1, present.size + 1, dtype=np.int32)
    labels = lut[labels]
    old = present - 1
    cell_cluster_new = (
        np.asarray(cells.cluster, np.int32)[old] if old.size else np.zeros(0, np.int32)
    )
    mitotic = np.asarray(cells.mitotic, bool)[old] if old.size else np.zeros(0, bool)
    edge = np.asarray(cells.edge, float)[old] if old.size else np.zeros(0)
    radius = axes[old].mean(axis=1) if old.size else np.zeros(0)

    # 5. cytoplasm territories and final cluster regions ---------------------------------------
    territory, ndist = _territories(labels, blob_labels, cell_cluster_new, radius, look, sp)
    clusters = _final_clusters(blob_labels, territory, cell_cluster_new, 0.6 * nucleus_d, sp)
    clusters, cell_cluster_new = _split_pieces(clusters, labels, cell_cluster_new, nucleus_d, sp)
    # renumber clusters 1..M and the cells' cluster ids with them
    clusters, cluster_lut = _relabel_with_lut(clusters)
    cell_cluster_new = cluster_lut[cell_cluster_new]
    cytoplasm = np.where(labels > 0, 0, territory).astype(np.int32)
    depth = np.where(labels > 0, 1.0 - score, 0.0).astype(np.float32)

    # 6. debris ---------------------------------------------------------------------------------
    debris = _debris(rng, look, labels, shape, sp, extent, z0 if (flat or not stack) else None)
    return Layout(
        nuclei=labels,
        clusters=clusters,
        cytoplasm=cytoplasm,
        depth=depth,
        cell_cluster=cell_cluster_new,
        mitotic=mitotic,
        edge_distance_um=edge,
        radius_um=radius,
        debris=debris,
        territory=territory,
        nucleus_distance_um=ndist,
    )


def _add_cell(
    rng: np.random.Generator,
    cells: _Cells,
    look: StageLook,
    p: np.ndarray,
    nucleus_d: float,
    cluster: int,
    edge: float,
    stack: bool,
    flat: bool,
    aspect_sd: float,
) -> None:
    d = nucleus_d * float(np.exp(rng.normal(0.0, look.nucleus_cv)))
    mitotic = bool(rng.random() < look.mitotic_fraction)
    z_ratio = 0.6 if flat else rng.uniform(0.8, 1.0)
    kw = dict(cluster=cluster, edge=edge, in_plane=flat, z_ratio=z_ratio, aspect_sd=aspect_sd)
    if mitotic:
        cells.add(rng, p, 0.75 * d, mitotic=True, **kw)  # type: ignore[arg-type]
    elif rng.random() < look.doublet_fraction:
        direction = rng.standard_normal(3)
        if flat or not stack:
            direction[0] = 0.0
        direction /= np.linalg.norm(direction) + 1e-12
        for sign in (-1.0, 1.0):
            q = p + sign * direction * 0.36 * d
            cells.add(rng, q, 0.8 * d, mitotic=False, **kw)  # type: ignore[arg-type]
    else:
        cells.add(rng, p, d, mitotic=False, **kw)  # type: ignore[arg-type]


def _label_boundaries(labels: np.ndarray) -> np.ndarray:
    """Voxels of a label that touch a different (non-zero or zero) label along y or x."""
    b = np.zeros(labels.shape, bool)
    for axis in (1, 2):
        if labels.shape[axis] < 2:
            continue
        a = np.swapaxes(labels, 0, axis)
        bb = np.swapaxes(b, 0, axis)
        diff = a[1:] != a[:-1]
        bb[1:] |= diff
        bb[:-1] |= diff
    return b & (labels > 0)


def _territories(
    nuclei: np.ndarray,
    blobs: np.ndarray,
    cell_cluster: np.ndarray,
    radius: np.ndarray,
    look: StageLook,
    sp: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Voronoi territory of each nucleus within its own cluster, at most ``cytoplasm_factor`` radii."""
    if not nuclei.any():
        return np.zeros_like(nuclei), np.full(nuclei.shape, np.inf, np.float32)
    dist, idx = ndi.distance_transform_edt(nuclei == 0, sampling=sp, return_indices=True)
    owner = nuclei[idx[0], idx[1], idx[2]]
    limit = np.concatenate([[0.0], (look.cytoplasm_factor - 1.0) * radius])
    lut_cluster = np.concatenate([[-1], cell_cluster]).astype(np.int32)
    ok = (dist <= limit[owner]) & (lut_cluster[owner] == blobs)
    return np.where(ok, owner, 0).astype(np.int32), dist.astype(np.float32)


def _final_clusters(
    blobs: np.ndarray,
    territory: np.ndarray,
    cell_cluster: np.ndarray,
    reach_um: float,
    sp: np.ndarray,
) -> np.ndarray:
    """Cluster regions: the blob voxels within ``reach_um`` of its cells' territories, holes filled.

    The reach closes the thin gaps between cells and between touching clusters, so that clusters
    that touch in the blobs also touch in the truth.
    """
    lut = np.concatenate([[0], cell_cluster]).astype(np.int32)
    covered = lut[territory]
    if covered.any() and reach_um > 0:
        dist, idx = ndi.distance_transform_edt(covered == 0, sampling=sp, return_indices=True)
        nearest = covered[idx[0], idx[1], idx[2]]
        covered = np.where((dist <= reach_um) & (nearest == blobs), nearest, covered)
    out = np.zeros_like(blobs)
    for cid, sl in enumerate(ndi.find_objects(covered), start=1):
        if sl is None:
            continue
        m = covered[sl] == cid
        filled = (
            np.stack([ndi.binary_fill_holes(p) for p in m])
            if m.shape[0] > 1
            else (ndi.binary_fill_holes(m[0])[None])
        )
        filled &= blobs[sl] == cid
        out[sl][filled] = cid
    return out


def _split_pieces(
    clusters: np.ndarray,
    nuclei: np.ndarray,
    cell_cluster: np.ndarray,
    nucleus_d: float,
    sp: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Give every connected piece of a cluster its own label; each cell follows its nucleus.

    A cluster region can come apart where its cells do not reach across a thin part of its blob
    (monolayer sheets mostly). Pieces that do not touch are separate objects in the image, so the
    truth counts them as such (8-/26-connectivity: pieces touching at a corner stay one). A piece
    other than the largest that is smaller than a few cells (the rule of :func:`_sheet_labels`:
    (4 nucleus diameters)² in a plane, (2 nucleus diameters)³ in a stack) is not a cluster: it is
    cleared and its cells count as outside any cluster.
    """
    structure = ndi.generate_binary_structure(clusters.ndim, clusters.ndim)
    flat = clusters.shape[0] == 1
    min_voxels = (
        (4 * nucleus_d) ** 2 / float(sp[1] * sp[2])
        if flat
        else (2 * nucleus_d) ** 3 / float(np.prod(sp))
    )
    out = clusters.copy()
    next_id = int(clusters.max()) + 1
    split = False
    for _, sl, comp, sizes in _pieces(clusters, structure):
        if sizes.size <= 2:
            continue
        split = True
        largest = int(np.argmax(sizes))
        for k in range(1, sizes.size):
            if k == largest:
                continue
            if sizes[k] < min_voxels:
                out[sl][comp == k] = 0
            else:
                out[sl][comp == k] = next_id
                next_id += 1
    if not split or not nuclei.any():
        return out, cell_cluster
    inside = nuclei > 0
    key = nuclei[inside].astype(np.int64) * next_id + out[inside]
    uniq, counts = np.unique(key, return_counts=True)
    order = np.lexsort((counts, uniq // next_id))  # per nucleus, the most voxels last
    last = np.r_[uniq[order][1:] // next_id != uniq[order][:-1] // next_id, True]
    best = uniq[order][last]
    new = cell_cluster.copy()
    cells = best // next_id - 1
    keep = new[cells] > 0  # cells outside every cluster stay outside
    new[cells[keep]] = (best % next_id)[keep].astype(new.dtype)  # 0 where the piece was cleared
    return out, new


def _relabel_with_lut(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids = np.unique(labels)
    ids = ids[ids > 0]
    lut = np.zeros(int(labels.max()) + 1 if labels.size else 1, np.int32)
    lut[ids] = np.arange(1, ids.size + 1, dtype=np.int32)
    return lut[labels], lut


def _debris(
    rng: np.random.Generator,
    look: StageLook,
    nuclei: np.ndarray,
    shape: tuple[int, int, int],
    sp: np.ndarray,
    extent: np.ndarray,
    z_plane: float | None,
) -> np.ndarray:
    area_mm2 = float(extent[1] * extent[2]) * 1e-6
    n = int(rng.poisson(rng.uniform(*look.debris_per_mm2) * area_mm2))
    out: list[tuple[float, float, float, float]] = []
    near = ndi.binary_dilation(nuclei > 0, iterations=2) if n else None
    for _ in range(n):
        p = rng.uniform(0, 1, 3) * (extent - sp)
        if z_plane is not None:
            p[0] = z_plane
        pieces = 1 if rng.random() < 0.65 else int(rng.integers(3, 7))
        for _k in range(pieces):
            q = p + (
                rng.normal(0, 1.5, 3) * [0 if z_plane is not None else 1, 1, 1] if pieces > 1 else 0
            )
            if not _inside(q[None], shape, sp)[0]:
                continue
            v = _voxel_of(q[None], sp, shape)[0]
            assert near is not None
            if near[tuple(v)]:
                continue
            out.append(
                (q[0], q[1], q[2], rng.uniform(0.35, 1.2) if pieces == 1 else rng.uniform(0.3, 0.7))
            )
    return np.asarray(out, float).reshape(-1, 4)
