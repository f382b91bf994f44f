"""Public entry point: :func:`generate_field` returns a synthetic field with its exact truth."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from islet_imaging.errors import InputError
from islet_imaging.io import Field, Origin, PixelSize
from islet_imaging.stages import StageProfile, get_stage
from islet_imaging.synth._geometry import Layout, make_layout
from islet_imaging.synth._render import draw_optics, render
from islet_imaging.synth._stages import StageLook, look_for

__all__ = ["SynthField", "cluster_table", "generate_field", "parse_size"]

log = logging.getLogger(__name__)

#: Largest field the generator accepts along one axis (memory guard).
MAX_SIDE = 8192


@dataclass(frozen=True, eq=False)
class SynthField:
    """A synthetic field and its exact ground truth.

    Attributes
    ----------
    field : Field
        ``(C, Z, Y, X)`` uint16 image: DAPI, then the stage's markers in profile order.
    nuclei : (Z, Y, X) ndarray of int32
        Nucleus instance labels 1..N (debris is not labelled).
    clusters : (Z, Y, X) ndarray of int32
        Cluster instance labels 1..M (colonies, patches, aggregates); touching clusters differ.
    cytoplasm : (Z, Y, X) ndarray of int32
        The cytoplasm of each cell (territory minus nucleus), labelled with the cell id.
    cells : pandas.DataFrame
        One row per nucleus, measured from the label arrays: ``cell_id`` (= nucleus label),
        ``cluster_id`` (0 = isolated cell), ``z, y, x`` (centroid, voxels), ``area_um2`` (2D) or
        ``volume_um3`` (3D), ``equivalent_diameter_um``, ``touches_border`` (first/last row or
        column), ``touches_z_border`` (first/last plane of a stack), ``mitotic``,
        ``cell_type``, then ``positive_<MARKER>`` (bool) and ``expression_<MARKER>`` (relative
        level, 1 = typical positive cell) for every marker.
    clusters_table : pandas.DataFrame
        One row per cluster: ``cluster_id``, ``area_um2`` (2D) or ``volume_um3`` (3D),
        ``equivalent_diameter_um`` (of a disc with that area, or of a sphere with that volume),
        ``touches_border`` (y/x image edges), ``touches_z_border`` (first/last plane of a stack),
        ``n_cells``, ``z, y, x`` (centroid, voxels).
    stage : str
        Canonical stage name.
    seed : int
        The seed that reproduces this field bit for bit.
    """

    field: Field
    nuclei: np.ndarray
    clusters: np.ndarray
    cytoplasm: np.ndarray
    cells: pd.DataFrame
    clusters_table: pd.DataFrame
    stage: str
    seed: int
    parameters: dict[str, float] = field(default_factory=dict)


def parse_size(size: int | str | Iterable[int]) -> tuple[int, int]:
    """``512`` → ``(512, 512)``; ``"512x384"`` → ``(384, 512)`` (width x height); ``(Y, X)`` kept.

    Raises
    ------
    InputError
        For sizes that are not positive integers or exceed :data:`MAX_SIDE`.
    """
    try:
        if isinstance(size, str):
            parts = size.lower().replace("×", "x").split("x")
            if len(parts) == 1:
                y = x = int(parts[0])
            elif len(parts) == 2:
                x, y = int(parts[0]), int(parts[1])
            else:
                raise ValueError
        elif isinstance(size, (int, np.integer)):
            y = x = int(size)
        else:
            y, x = (int(v) for v in size)
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"field size {size!r} is not understood; give one number (512) or WIDTHxHEIGHT (512x384)"
        ) from exc
    if not (16 <= y <= MAX_SIDE and 16 <= x <= MAX_SIDE):
        raise InputError(f"field size {x}x{y} must be between 16 and {MAX_SIDE} pixels per side")
    return y, x


def generate_field(
    stage: str | StageProfile,
    *,
    seed: int,
    size: int | str | tuple[int, int] = (512, 512),
    z: int = 1,
    pixel_size_um: float = 0.65,
    z_step_um: float = 2.0,
    absent_markers: Iterable[str] = (),
    look: StageLook | None = None,
    plate: str | None = None,
    well: str | None = None,
    field_index: int | None = None,
) -> SynthField:
    """Generate one synthetic field of a differentiation stage with exact ground truth.

    Parameters
    ----------
    stage : str or StageProfile
        Stage name or alias (``"S6"``, ``"sc-islet"``) or a profile.
    seed : int
        Seed of the ``numpy.random.default_rng`` that draws everything; the same seed gives
        bit-identical arrays.
    size : int, str or (int, int), optional
        ``(Y, X)`` in pixels, one number for a square, or ``"WIDTHxHEIGHT"``.
    z : int, optional
        Number of planes. ``z > 1`` makes a z-stack: aggregates become 3D objects.
    pixel_size_um : float, optional
        Lateral pixel size in µm.
    z_step_um : float, optional
        Distance between planes in µm (used when ``z > 1``).
    absent_markers : iterable of str, optional
        Markers stained but not expressed (negative controls): every cell is negative for them,
        the channel holds only background, autofluorescence and bleed-through.
    look : StageLook, optional
        Override the stage's appearance parameters.
    plate, well, field_index : optional
        Recorded in the field's origin.

    Returns
    -------
    SynthField

    Examples
    --------
    >>> from islet_imaging.synth import generate_field
    >>> s = generate_field("S6", seed=1, size=128)
    >>> s.field.channel_names
    ('DAPI', 'INS', 'NKX6.1', 'GCG')
    >>> int(s.nuclei.max()) == len(s.cells)
    True
    """
    profile = get_stage(stage)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    shape_yx = parse_size(size)
    if not isinstance(z, (int, np.integer)) or isinstance(z, bool) or not 1 <= z <= 512:
        raise InputError(f"z must be a whole number of planes between 1 and 512, got {z!r}")
    for name, value in (("pixel size", pixel_size_um), ("z step", z_step_um)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.05 <= value <= 50):
            raise InputError(f"{name} {value!r} µm must be a number between 0.05 and 50")
    absent = {profile.marker(m).name for m in absent_markers}
    look = look if look is not None else look_for(profile)

    rng = np.random.default_rng(int(seed))
    shape = (int(z), *shape_yx)
    spacing = (
        float(z_step_um) if z > 1 else float(pixel_size_um),
        float(pixel_size_um),
        float(pixel_size_um),
    )
    layout = make_layout(rng, look, shape, spacing)
    types, positive, levels = _assign_markers(rng, look, profile, layout, absent)
    optics = draw_optics(rng, look.haze)
    markers = [(m.name, m.compartment) for m in profile.markers]
    data = render(rng, layout, markers=markers, levels=levels, spacing=spacing, optics=optics)

    pixel_size = PixelSize(pixel_size_um, pixel_size_um, float(z_step_um) if z > 1 else None)
    origin = Origin(stage=profile.name, plate=plate, well=well, field=field_index)
    params = {
        "psf_sigma_xy_um": optics.psf_sigma_xy_um,
        "psf_sigma_z_um": optics.psf_sigma_z_um,
        "gain": optics.gain,
        "read_noise": optics.read_noise,
        "haze": optics.haze,
        "vignetting": optics.vignetting,
    }
    fld = Field(
        data,
        ("DAPI", *profile.marker_names),
        pixel_size,
        origin,
        {"synthetic": True, "seed": int(seed), "generator": "islet_imaging.synth", **params},
    )
    cells = _cell_table(layout, look, profile, types, positive, levels, spacing)
    clusters_table = cluster_table(layout.clusters, layout.nuclei, spacing)
    log.debug(
        "synthetic %s field seed=%d: %d cells, %d clusters",
        profile.name,
        seed,
        len(cells),
        len(clusters_table),
    )
    return SynthField(
        field=fld,
        nuclei=layout.nuclei,
        clusters=layout.clusters,
        cytoplasm=layout.cytoplasm,
        cells=cells,
        clusters_table=clusters_table,
        stage=profile.name,
        seed=int(seed),
        parameters=params,
    )


def _assign_markers(
    rng: np.random.Generator,
    look: StageLook,
    profile: StageProfile,
    layout: Layout,
    absent: set[str],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cell type of every cell, its (N, n_markers) positivity and relative expression levels.

    Positive cells have levels in [0.3, 4] (log-normal around 1), negative cells in [0, 0.15]
    (non-specific staining), so the truth is well defined while dim positives exist.
    """
    n = int(layout.cell_cluster.size)
    types = look.cell_types
    base = np.array([t.fraction for t in types], float)
    base /= base.sum()
    # field-to-field and cluster-to-cluster variation of the composition
    field_mix = rng.dirichlet(base * 150.0 + 1e-3)
    n_clusters = int(layout.cell_cluster.max()) if n else 0
    cluster_mix = np.array(
        [rng.dirichlet(field_mix * 200.0 + 1e-3) for _ in range(n_clusters + 1)]
    ).reshape(n_clusters + 1, len(types))
    probs = cluster_mix[layout.cell_cluster] if n else np.zeros((0, len(types)))
    if look.edge_type is not None and n:
        k = [t.name for t in types].index(look.edge_type)
        boost = 1.0 + (look.edge_boost - 1.0) * np.exp(
            -np.nan_to_num(layout.edge_distance_um, posinf=1e6) / 15.0
        )
        boost[layout.cell_cluster == 0] = look.edge_boost
        probs = probs.copy()
        probs[:, k] *= boost
        probs /= probs.sum(axis=1, keepdims=True)
    u = rng.random(n)
    type_idx = (u[:, None] > np.cumsum(probs, axis=1)).sum(axis=1) if n else np.zeros(0, int)
    type_idx = np.minimum(type_idx, len(types) - 1)

    names = profile.marker_names
    levels = np.zeros((n, len(names)), np.float32)
    positive_all = np.zeros((n, len(names)), bool)
    cluster_factor = np.exp(rng.normal(0.0, 0.15, (n_clusters + 1, len(names))))
    for j, name in enumerate(names):
        positive = np.array([name in types[t].markers for t in type_idx], bool)
        if name in absent:
            positive[:] = False
        pos_level = np.exp(rng.normal(0.0, 0.35, n)) * cluster_factor[layout.cell_cluster, j]
        neg_level = 0.04 * np.exp(rng.normal(0.0, 0.5, n))
        levels[:, j] = np.where(
            positive, np.clip(pos_level, 0.3, 4.0), np.clip(neg_level, 0.0, 0.15)
        )
        positive_all[:, j] = positive
        if name in absent:
            levels[:, j] = 0.0
    return type_idx, positive_all, levels


def _cell_table(
    layout: Layout,
    look: StageLook,
    profile: StageProfile,
    type_idx: np.ndarray,
    positive: np.ndarray,
    levels: np.ndarray,
    spacing: tuple[float, float, float],
) -> pd.DataFrame:
    look_types = look.cell_types
    nuclei = layout.nuclei
    n = int(layout.cell_cluster.size)
    stats = _label_stats(nuclei, n, spacing)
    table = {
        "cell_id": np.arange(1, n + 1, dtype=np.int32),
        "cluster_id": _majority_cluster(nuclei, layout.clusters, n),
        **stats,
        "mitotic": layout.mitotic.astype(bool),
    }
    df = pd.DataFrame(table)
    df["cell_type"] = pd.Series([look_types[t].name for t in type_idx], dtype="object")
    for j, name in enumerate(profile.marker_names):
        df[f"positive_{name}"] = positive[:, j]
    for j, name in enumerate(profile.marker_names):
        df[f"expression_{name}"] = levels[:, j].astype(float)
    return df


def _majority_cluster(nuclei: np.ndarray, clusters: np.ndarray, n: int) -> np.ndarray:
    """The cluster holding each nucleus (by construction the whole nucleus lies in it)."""
    out = np.zeros(n, np.int32)
    if n == 0:
        return out
    m = nuclei > 0
    ids = nuclei[m]
    cl = clusters[m]
    # nucleus voxels all share one cluster id, so the maximum is that id
    np.maximum.at(out, ids - 1, cl)
    return out


def _label_stats(
    labels: np.ndarray, n: int, spacing: tuple[float, float, float]
) -> dict[str, np.ndarray]:
    """Centroid (voxels), size in µm, equivalent diameter and border contact of labels 1..n."""
    stack = labels.shape[0] > 1
    flat = labels.ravel()
    counts = np.bincount(flat, minlength=n + 1)[1 : n + 1].astype(float)
    zz, yy, xx = np.indices(labels.shape, sparse=True)
    cents = []
    for g in (zz, yy, xx):
        w = np.broadcast_to(g, labels.shape).ravel().astype(float)
        s = np.bincount(flat, weights=w, minlength=n + 1)[1 : n + 1]
        cents.append(np.divide(s, counts, out=np.zeros(n), where=counts > 0))
    border = np.zeros(labels.shape, bool)
    border[:, 0, :] = border[:, -1, :] = True
    border[:, :, 0] = border[:, :, -1] = True
    on_border = np.zeros(max(n + 1, int(labels.max()) + 1), bool)
    on_border[np.unique(labels[border])] = True
    on_z_border = np.zeros_like(on_border)
    if stack:
        on_z_border[np.unique(labels[[0, -1]])] = True
    out: dict[str, np.ndarray] = {"z": cents[0], "y": cents[1], "x": cents[2]}
    if stack:
        volume = counts * spacing[0] * spacing[1] * spacing[2]
        out["volume_um3"] = volume
        out["equivalent_diameter_um"] = 2.0 * np.cbrt(3.0 * volume / (4.0 * np.pi))
    else:
        area = counts * spacing[1] * spacing[2]
        out["area_um2"] = area
        out["equivalent_diameter_um"] = 2.0 * np.sqrt(area / np.pi)
    out["touches_border"] = on_border[1 : n + 1]
    out["touches_z_border"] = on_z_border[1 : n + 1]
    return out


def cluster_table(
    clusters: np.ndarray, nuclei: np.ndarray, spacing: tuple[float, float, float]
) -> pd.DataFrame:
    """Truth table of clusters measured from label images.

    Parameters
    ----------
    clusters, nuclei : (Z, Y, X) ndarray of int
        Cluster and nucleus labels.
    spacing : (float, float, float)
        Voxel size ``(z, y, x)`` in µm (z unused for a single plane).

    Returns
    -------
    pandas.DataFrame
        ``cluster_id``, ``area_um2`` (2D) or ``volume_um3`` (3D), ``equivalent_diameter_um``,
        ``touches_border`` (the cluster reaches the first or last row or column of the image, in any
        plane), ``touches_z_border`` (it reaches the first or last plane of a z-stack; always False
        in 2D), ``n_cells`` and the centroid ``z, y, x`` in voxels. Sizes, border contact and
        centroids are those :func:`islet_imaging.measure.measure_clusters` measures from the
        true labels (in a z-stack, a cluster cut by the first or last plane is sized by its
        projected outline).
    """
    from islet_imaging.measure._clusters import measure_clusters

    m = int(clusters.max()) if clusters.size else 0
    t = measure_clusters(clusters, spacing=spacing, shape_features=False)
    t = t.set_index("cluster_id").reindex(np.arange(1, m + 1))
    n_nuclei = int(nuclei.max()) if nuclei.size else 0
    owner = _majority_cluster(nuclei, clusters, n_nuclei)
    n_cells = np.bincount(owner, minlength=m + 1)[1 : m + 1]
    size_key = "volume_um3" if clusters.shape[0] > 1 else "area_um2"
    df = pd.DataFrame(
        {
            "cluster_id": np.arange(1, m + 1, dtype=np.int32),
            size_key: t[size_key].to_numpy(float),
            "equivalent_diameter_um": t["equivalent_diameter_um"].to_numpy(float),
            "touches_border": t["touches_border"].fillna(False).to_numpy(bool),
            "touches_z_border": t["touches_z_border"].fillna(False).to_numpy(bool),
            "n_cells": n_cells.astype(np.int64),
            "z": t["centroid_z"].to_numpy(float),
            "y": t["centroid_y"].to_numpy(float),
            "x": t["centroid_x"].to_numpy(float),
        }
    )
    return df
