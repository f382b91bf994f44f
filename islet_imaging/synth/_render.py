"""From geometry to camera counts: staining, optics and noise.

The model, in the order it is applied:

1. **staining**: DAPI fills nuclei (brighter where the nucleus is thicker, chromatin texture, darker
   nucleoli, bright condensed mitotic cells); nuclear markers fill nuclei of positive cells with a
   per-cell level; cytoplasmic markers fill the cytoplasm of positive cells with a granular texture
   (membrane-like for surface markers such as CXCR4); every cell has a little autofluorescence.
   Debris adds bright specks to DAPI (and a little to the other channels).
2. **bleed-through** of each channel into the next one.
3. **out-of-focus haze** around thick aggregates and **intensity decay with depth** in z-stacks.
4. **PSF blur**: Gaussian, wider along z.
5. **illumination**: smooth vignetting, plus background autofluorescence of the dish.
6. **camera**: Poisson shot noise, Gaussian read noise, offset of ~100 ADU, 16-bit clipping.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from islet_imaging.synth._geometry import Layout, blur, smooth_noise

__all__ = ["Optics", "draw_optics", "render"]

#: Markers stained at the cell surface rather than in cytoplasmic granules.
MEMBRANE_MARKERS = frozenset({"CXCR4"})


@dataclass(frozen=True)
class Optics:
    """Microscope and camera parameters of one field (drawn by :func:`draw_optics`)."""

    psf_sigma_xy_um: float
    psf_sigma_z_um: float
    vignetting: float
    vignetting_center: tuple[float, float]
    gain: float  # ADU per photo-electron
    offset: float  # ADU
    read_noise: float  # ADU
    depth_decay_um: float
    haze: float


def draw_optics(rng: np.random.Generator, haze_range: tuple[float, float]) -> Optics:
    """One field's optics: a 20x-40x widefield / spinning-disk system with an sCMOS camera."""
    return Optics(
        psf_sigma_xy_um=float(rng.uniform(0.35, 0.6)),
        psf_sigma_z_um=float(rng.uniform(1.2, 2.0)),
        vignetting=float(rng.uniform(0.12, 0.35)),
        vignetting_center=(float(rng.uniform(0.35, 0.65)), float(rng.uniform(0.35, 0.65))),
        gain=float(rng.uniform(0.5, 1.2)),
        offset=float(rng.uniform(98.0, 102.0)),
        read_noise=float(rng.uniform(1.5, 3.5)),
        depth_decay_um=float(rng.uniform(50.0, 140.0)),
        haze=float(rng.uniform(*haze_range)),
    )


def _white(rng: np.random.Generator, shape: tuple[int, ...], sigma: Sequence[float]) -> np.ndarray:
    """Smoothed white noise rescaled to unit standard deviation."""
    out = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="reflect")
    sd = float(out.std())
    return out / sd if sd > 0 else out


def _sigma(
    um: float, sp: np.ndarray, shape: tuple[int, ...], z_um: float | None = None
) -> list[float]:
    zs = (z_um if z_um is not None else um) / sp[0] if shape[0] > 1 else 0.0
    return [zs, um / sp[1], um / sp[2]]


def _spots(
    shape: tuple[int, int, int],
    sp: np.ndarray,
    points_um: np.ndarray,
    weights: np.ndarray,
    sigma_um: float,
) -> np.ndarray:
    """Sum of Gaussian spots with peak height ``weights`` at ``points_um``."""
    img = np.zeros(shape, np.float32)
    if len(points_um):
        idx = np.rint(points_um / sp).astype(int)
        ok = np.all((idx >= 0) & (idx < np.array(shape)), axis=1)
        np.add.at(img, tuple(idx[ok].T), weights[ok].astype(np.float32))
    sigma = _sigma(sigma_um, sp, shape)
    img = ndi.gaussian_filter(img, sigma, mode="constant")
    probe = np.zeros(tuple(int(2 * np.ceil(4 * s) + 1) for s in sigma), np.float32)
    probe[tuple(n // 2 for n in probe.shape)] = 1.0
    peak = float(ndi.gaussian_filter(probe, sigma, mode="constant").max())
    return img / peak


def render(
    rng: np.random.Generator,
    layout: Layout,
    *,
    markers: Sequence[tuple[str, str]],
    levels: np.ndarray,
    spacing: tuple[float, float, float],
    optics: Optics,
) -> np.ndarray:
    """Render one field.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of randomness.
    layout : Layout
        The geometry.
    markers : sequence of (name, compartment)
        The marker channels after DAPI, in channel order.
    levels : (N, len(markers)) ndarray of float
        Relative expression of each marker in each cell (1 = typical positive cell).
    spacing : (float, float, float)
        Voxel size in µm.
    optics : Optics
        Microscope and camera.

    Returns
    -------
    (C, Z, Y, X) ndarray of uint16
        DAPI first, then the markers.
    """
    sp = np.asarray(spacing, float)
    shape = layout.nuclei.shape
    stack = shape[0] > 1
    nuclei, cyto = layout.nuclei, layout.cytoplasm
    n_cells = int(layout.cell_cluster.size)
    in_nucleus = nuclei > 0
    in_cell = layout.territory > 0

    # -- DAPI ---------------------------------------------------------------------------------
    dapi_bright = float(rng.uniform(1200.0, 3200.0))
    cell_dapi = np.exp(rng.normal(0.0, 0.22, n_cells + 1)).astype(np.float32)
    cell_dapi[1:][layout.mitotic] *= rng.uniform(1.8, 2.6)
    cell_dapi[0] = 0.0
    s = np.float32(1.0) - layout.depth
    thickness = np.sqrt(np.clip(np.float32(1.0) - s * s, 0.0, 1.0)) * in_nucleus
    fine = _white(rng, shape, _sigma(0.35, sp, shape))
    medium = _white(rng, shape, _sigma(1.1, sp, shape))
    mitotic_vox = np.concatenate([[False], layout.mitotic])[nuclei]
    a_fine = np.where(mitotic_vox, np.float32(0.45), np.float32(0.16))
    a_medium = np.where(mitotic_vox, np.float32(0.3), np.float32(0.12))
    chroma = a_fine * fine + a_medium * medium
    texture = np.exp(chroma - np.float32(0.02))
    nucleoli = _nucleoli(rng, layout, sp)
    dapi = cell_dapi[nuclei] * (np.float32(0.5) + np.float32(0.5) * thickness) * texture
    dapi *= np.float32(1.0) - np.float32(0.45) * nucleoli
    # a faint cytoplasmic signal (RNA, autofluorescence)
    dapi += np.float32(0.025) * (in_cell & ~in_nucleus)
    debris, debris_marker = _debris_image(rng, layout, sp, shape)
    dapi += debris
    channels = [dapi * dapi_bright]

    # -- markers ------------------------------------------------------------------------------
    lv = np.vstack([np.zeros((1, levels.shape[1] if levels.ndim == 2 else 0)), levels])
    radius_vox = np.concatenate([[1.0], np.maximum(layout.radius_um, 1e-3)])
    for j, (name, compartment) in enumerate(markers):
        bright = float(rng.uniform(700.0, 2600.0))
        autof = float(rng.uniform(0.015, 0.045))
        level = lv[:, j].astype(np.float32)
        if compartment == "nuclear":
            speckle = _white(rng, shape, _sigma(0.4, sp, shape))
            tex = np.exp(0.2 * speckle - 0.02)
            img = level[nuclei] * (0.7 + 0.3 * thickness) * tex * (1.0 - 0.35 * nucleoli)
            img = img * in_nucleus
        else:
            granules = _white(rng, shape, _sigma(0.3, sp, shape))
            g = np.exp(0.65 * granules - 0.5 * 0.65**2)
            rel = layout.nucleus_distance_um / radius_vox[cyto]
            if name.upper() in MEMBRANE_MARKERS:
                edge = _membrane(layout.territory)
                weight = 0.25 + 1.6 * ndi.gaussian_filter(edge, _sigma(0.4, sp, shape))
                g = np.exp(0.3 * granules - 0.045)
            else:
                weight = 0.7 + 0.45 * np.exp(-rel / 0.45)  # perinuclear (Golgi) enrichment
            img = level[cyto] * weight * g * (cyto > 0)
            # out-of-focus cytoplasm above and below the nucleus of a positive cell
            img += (0.05 if stack else 0.14) * level[nuclei] * in_nucleus
        img = img + autof * in_cell + debris_marker * float(rng.uniform(0.0, 0.08))
        channels.append(img.astype(np.float32) * bright)
    signal = np.stack(channels).astype(np.float32)

    # -- bleed-through into the next channel -------------------------------------------------
    for c in range(len(channels) - 1, 0, -1):
        k = rng.uniform(0.01, 0.035) if c == 1 else rng.uniform(0.004, 0.02)
        signal[c] += k * signal[c - 1]

    # -- haze around aggregates, depth decay, blur ------------------------------------------------
    if optics.haze > 0:
        h = optics.haze * (0.35 if stack else 1.0)
        clusters = (layout.clusters > 0).astype(np.float32)
        far = blur(clusters, _sigma(10.0, sp, shape, z_um=15.0))
        for c in range(signal.shape[0]):
            near = blur(signal[c], _sigma(3.5, sp, shape, z_um=6.0))
            mean_in = float(signal[c][clusters > 0].mean()) if clusters.any() else 0.0
            signal[c] += h * (near + 0.6 * mean_in * far)
    if stack:
        z = np.arange(shape[0]) * sp[0]
        signal *= np.exp(-z / optics.depth_decay_um)[None, :, None, None].astype(np.float32)
    for c in range(signal.shape[0]):
        widen = 0.85 if c == 0 else float(rng.uniform(0.95, 1.15))
        sigma = _sigma(optics.psf_sigma_xy_um * widen, sp, shape, z_um=optics.psf_sigma_z_um)
        signal[c] = ndi.gaussian_filter(signal[c], sigma, mode="nearest")

    # -- illumination and dish background ----------------------------------------------------
    yy = (np.arange(shape[1]) / max(shape[1] - 1, 1) - optics.vignetting_center[0])[:, None]
    xx = (np.arange(shape[2]) / max(shape[2] - 1, 1) - optics.vignetting_center[1])[None, :]
    illum = 1.0 - optics.vignetting * (yy * yy + xx * xx) / 0.5
    illum = illum * (1.0 + 0.04 * smooth_noise(rng, (1, *shape[1:]), tuple(sp), 120.0)[0])
    for c in range(signal.shape[0]):
        bg = float(rng.uniform(15.0, 60.0) if c == 0 else rng.uniform(25.0, 120.0))
        patchy = 1.0 + 0.15 * smooth_noise(rng, (1, *shape[1:]), tuple(sp), 60.0)[0]
        signal[c] = (signal[c] + bg * patchy[None]) * illum[None].astype(np.float32)

    # -- camera -----------------------------------------------------------------------------
    electrons = np.clip(signal / np.float32(optics.gain), 0.0, None)
    counts = rng.poisson(electrons).astype(np.float32) * np.float32(optics.gain)
    read = rng.standard_normal(counts.shape, dtype=np.float32) * np.float32(optics.read_noise)
    counts += np.float32(optics.offset) + read
    return np.clip(np.rint(counts), 0, 65535).astype(np.uint16)


def _membrane(territory: np.ndarray) -> np.ndarray:
    edge = np.zeros(territory.shape, np.float32)
    for axis in (1, 2):
        if territory.shape[axis] < 2:
            continue
        a = np.swapaxes(territory, 0, axis)
        e = np.swapaxes(edge, 0, axis)
        diff = a[1:] != a[:-1]
        e[1:] += diff
        e[:-1] += diff
    return np.clip(edge, 0, 1) * (territory > 0)


def _nucleoli(rng: np.random.Generator, layout: Layout, sp: np.ndarray) -> np.ndarray:
    """1-3 dark nucleoli per interphase nucleus; a (Z, Y, X) map in [0, 1]."""
    nuclei = layout.nuclei
    n = int(layout.cell_cluster.size)
    if n == 0:
        return np.zeros(nuclei.shape, np.float32)
    ids = np.arange(1, n + 1)
    centers = np.asarray(ndi.center_of_mass(np.ones(nuclei.shape, np.float32), nuclei, ids))
    centers = centers.reshape(-1, 3) * sp
    counts = rng.integers(1, 4, n)
    counts[layout.mitotic] = 0
    owner = np.repeat(np.arange(n), counts)
    r = layout.radius_um[owner][:, None]
    offsets = rng.normal(0.0, 0.3, (owner.size, 3)) * r
    if nuclei.shape[0] == 1:
        offsets[:, 0] = 0.0  # a single plane: nucleoli lie in it
    pts = centers[owner] + offsets
    weights = rng.uniform(0.5, 1.0, owner.size)
    spots = _spots(nuclei.shape, sp, pts, weights, sigma_um=0.55)
    return np.clip(spots, 0.0, 1.0) * (nuclei > 0)


def _debris_image(
    rng: np.random.Generator, layout: Layout, sp: np.ndarray, shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Bright debris specks in DAPI units (1 = a typical nucleus) and their marker footprint."""
    img = np.zeros(shape, np.float32)
    for z, y, x, radius in layout.debris:
        c = np.array([z, y, x])
        ext = radius + sp.max()
        lo = np.maximum(np.floor((c - ext) / sp).astype(int), 0)
        hi = np.minimum(np.ceil((c + ext) / sp).astype(int) + 1, shape)
        if np.any(hi <= lo):
            continue
        sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
        grids = np.ogrid[sl]
        d2 = sum(((g * s - cc) / radius) ** 2 for g, s, cc in zip(grids, sp, c, strict=True))
        if shape[0] == 1:
            d2 = sum(
                ((g * s - cc) / radius) ** 2
                for g, s, cc in zip(grids[1:], sp[1:], c[1:], strict=True)
            )[None]
        img[sl] = np.maximum(img[sl], float(rng.uniform(1.0, 3.5)) * (d2 <= 1.0))
    marker = ndi.gaussian_filter(img, _sigma(0.8, sp, shape)) if img.any() else img
    return img, marker
