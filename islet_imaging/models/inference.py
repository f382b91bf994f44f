"""Scale-aware, tiled inference: a Field in, nucleus and cluster instance labels out.

Steps of :func:`segment_cnn`:

1. **Inputs** (:func:`prepare_input`): the nuclear stain (found through the stage profile) and,
   for a ``"cluster"`` input, the profile's ``cluster_input`` image — the nuclear stain, or the
   sum of all channels each normalised first (then normalised again). Each channel is mapped
   with the config's percentiles (computed on a subsample of the whole stack) to ~0..1.
2. **Scale** (:func:`rescale_factor`): the image is resampled (bilinear, antialiased when
   shrinking) so that its pixels have the model's training size; without a pixel size, the
   nucleus diameter in pixels (``nucleus_diameter_um`` given as pixels) sets the scale, or it is
   estimated from the image (a scale-normalised LoG).
3. **Tiles** (:func:`predict_maps`): the image is cut into overlapping tiles (starts aligned to the
   network's pooling grid), run in batches under ``torch.inference_mode`` and blended with
   separable cosine weights that ignore each tile's outer quarter-overlap; the weight sum is the
   outer product of two 1D sums, and rows are finished one row of tiles at a time, so besides
   the input only the output maps (float16 in :func:`segment_cnn`) and one row of tiles are held.
   With the default 128 px overlap a tiled result equals the untiled one to ~1e-5.
4. **Back** to the field's grid: maps are resampled bilinearly to the native resolution and
   post-processed there (:func:`~islet_imaging.models._postprocess.maps_to_instances`) with the
   field's spacing in µm, so boundaries are as fine as the image. z-stacks are predicted plane by
   plane and post-processed in 3D (seeds linked across planes, size filters in µm³ with the
   anisotropic spacing).

5. **Blocks** (:mod:`~islet_imaging.models._blocks`): a field wider or taller than
   :data:`BLOCK_PX` (4096 px) is segmented block by block: each core of at most 4096² px is
   segmented as above inside a window with :data:`BLOCK_HALO_UM` (200 µm) of context (starting
   on the network's pooling grid), with the whole field's normalisation and scale, and labels
   of an object that crosses a core edge are joined. The stitched labels equal the whole
   field's up to rounding (``benchmarks/blocks.py``).

Memory: the network's share is fixed by the tile size (≈ 0.5 GB for a 1024² tile on CPU); the
whole-field arrays of one window (normalised input and maps in float16, labels in int32, ~25
bytes per pixel) are bounded by the block size. What grows with the field is only the field
itself and its two label images (int32: 8 bytes per pixel) (``benchmarks/speed.py
--memory-only``).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.nn import functional as F

from islet_imaging.errors import (
    CoarseImageWarning,
    EmptyImageWarning,
    InputError,
    SmallImageWarning,
)
from islet_imaging.models._blocks import (
    BLOCK_HALO_UM,
    BLOCK_PX,
    Block,
    plan_blocks,
    stitch_blocks,
)
from islet_imaging.models._config import ModelConfig, Thresholds
from islet_imaging.models._modeldir import Model, load_model
from islet_imaging.models._postprocess import maps_to_instances

if TYPE_CHECKING:
    from islet_imaging.io import Field
    from islet_imaging.segment import Labels
    from islet_imaging.stages import StageProfile

__all__ = [
    "BLOCK_HALO_UM",
    "BLOCK_PX",
    "MAX_UPSCALE",
    "MIN_CONTEXT_PX",
    "MIN_SIZE_PX",
    "CoarseImageWarning",
    "EmptyImageWarning",
    "InputLimits",
    "SmallImageWarning",
    "channel_percentiles",
    "cluster_split_for",
    "estimate_nucleus_diameter_px",
    "field_instances",
    "input_limits",
    "network_factor",
    "normalise_channel",
    "predict_field_maps",
    "predict_maps",
    "prepare_input",
    "rescale_factor",
    "resize_image",
    "resize_labels",
    "segment_cnn",
    "stage_instances",
]

log = logging.getLogger(__name__)

#: Smallest image side (pixels) inference accepts.
MIN_SIZE_PX = 16
#: Below this side (pixels at the model's scale) inference warns (:class:`SmallImageWarning`):
#: the network sees too little around each object. Held-out synthetic fields of all stages,
#: nuclei AP@0.5 of the objects a crop's edge does not cut, the crop segmented alone vs cut from
#: the segmented whole field (``benchmarks/small_images.py``): 0.874 vs 0.918 at 64 px, 0.906
#: vs 0.928 at 96 px, 0.912 vs 0.929 at 128 px, 0.931 vs 0.942 at 192 px, 0.929 vs 0.933 at
#: 256 px.
MIN_CONTEXT_PX = 128
#: Above this resize factor to the model's scale (image pixels this many times the model's)
#: inference warns (:class:`CoarseImageWarning`), and the clusters' maps come from a second pass
#: enlarged only this much (:func:`network_factor`): the default model, trained at 0.5-0.85
#: µm/px, splits large aggregates of an image enlarged more into fragments. Held-out synthetic
#: fields, S6 clusters AP@0.5 0.912 at 1.0 µm/px (×1.54); 0.706 / 0.578 at 1.3 / 1.6 (×2.0 /
#: ×2.46) enlarged fully, 0.740 / 0.752 with the clusters' pass at ×1.8; nuclei 0.95-0.97
#: throughout (benchmarks/README.md, "Other sets"). Chosen on coarse tuning fields (1.2-1.8
#: µm/px, seeds 1100-1107, all stages): pooled clusters AP@0.5 0.833 enlarged fully, 0.878 /
#: 0.886 / 0.850 with the clusters' pass at ×2.0 / ×1.8 / ×1.6.
MAX_UPSCALE = 1.8
_CHUNK_PX = 1 << 22  # pixels per block in block-wise steps
#: Accepted range of the resize factor to the model's scale (outside: a wrong pixel size).
MIN_SCALE, MAX_SCALE = 1 / 32, 16.0
#: Without a pixel size, µm come from one typical nucleus diameter (given or estimated), not from
#: the microscope: the stage's smallest nucleus diameter is lowered by this factor, so that the
#: small nuclei of an image whose typical one was set to the model's size are kept. Chosen on the
#: DSB 2018 ``val`` split: nuclei AP@0.5 0.678 / 0.688 / 0.691 / 0.688 / 0.682 at factors
#: 1 / 0.8 / 0.6 / 0.48 / 0.36 (the default model's weights of commit c8b2f72, nuclear
#: foreground / seed levels 0.5 / 0.6; command in benchmarks/README.md).
UNKNOWN_SCALE_MIN_NUCLEUS = 0.6
_SAMPLE = 4_000_000


# -- normalisation ------------------------------------------------------------------------------
def channel_percentiles(
    image: np.ndarray, percentiles: Sequence[float] = (1.0, 99.8)
) -> tuple[float, float]:
    """Low and high percentiles of an image, from a regular subsample when it is large.

    When they coincide (a sparse signal on a constant background), the minimum and maximum of the
    whole image are returned instead; equal values mean a constant image.

    Parameters
    ----------
    image : ndarray
        One channel, any shape.
    percentiles : (float, float)
    """
    flat = np.asarray(image).reshape(-1)
    step = max(1, flat.size // _SAMPLE)
    sample = flat[::step]
    lo, hi = np.percentile(sample, [float(percentiles[0]), float(percentiles[1])])
    if not hi > lo:  # sparse signal (e.g. a few nuclei on a black field): use the full range
        lo, hi = float(flat.min()), float(flat.max())
    return float(lo), float(hi)


def normalise_channel(
    image: np.ndarray,
    percentiles: Sequence[float] = (1.0, 99.8),
    *,
    limits: tuple[float, float] | None = None,
) -> np.ndarray:
    """Map an image's low / high percentiles to 0 / 1 (float32, not clipped).

    Parameters
    ----------
    image : ndarray
        One channel, any shape.
    percentiles : (float, float)
    limits : (float, float), optional
        Precomputed ``(low, high)`` values (e.g. from :func:`channel_percentiles` of the stack).

    Returns
    -------
    ndarray of float32
        Same shape; all zero when the image is constant.
    """
    lo, hi = limits if limits is not None else channel_percentiles(image, percentiles)
    if not hi > lo:
        return np.zeros(np.shape(image), np.float32)
    out = np.asarray(image, dtype=np.float32) - np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    return out


@dataclass(frozen=True)
class InputLimits:
    """Normalisation of a field's network input: ``(low, high)`` per channel index, and of the
    sum of the normalised channels (``None`` when the cluster input is not a sum)."""

    channels: Mapping[int, tuple[float, float]]
    nuclear: int
    sum: tuple[float, float] | None


def input_limits(field: Field, profile: StageProfile, config: ModelConfig) -> InputLimits:
    """The percentiles that :func:`prepare_input` maps to 0 and 1, over the whole stack.

    Each channel's percentiles (``config.percentiles``) come from a regular subsample of at most
    4 M pixels; with ``profile.cluster_input == "sum"`` (and a ``"cluster"`` input), the sum's
    from the same subsample of every channel.
    """
    nuc = profile.nuclear_channel(field.channel_names, field.origin.path)
    pct = config.percentiles
    data = field.data
    limits = {nuc: channel_percentiles(data[nuc], pct)}
    use_sum = profile.cluster_input == "sum" and field.n_channels > 1 and "cluster" in config.inputs
    if not use_sum:
        return InputLimits(limits, nuc, None)
    for c in range(field.n_channels):
        limits.setdefault(c, channel_percentiles(data[c], pct))
    n = int(np.prod(field.spatial_shape))
    step = max(1, n // _SAMPLE)
    total = sum(
        normalise_channel(data[c].reshape(-1)[::step], limits=limits[c])
        for c in range(field.n_channels)
    )
    return InputLimits(limits, nuc, channel_percentiles(total, pct))


def prepare_input(
    field: Field,
    profile: StageProfile,
    config: ModelConfig,
    *,
    dtype: type[np.floating] | np.dtype = np.float32,
    limits: InputLimits | None = None,
) -> np.ndarray:
    """The normalised network input of a field, at the field's own resolution.

    Each channel's percentiles (``config.percentiles``) are taken over the whole stack (a
    regular subsample of at most 4 M pixels) and mapped to 0 and 1; a ``"cluster"`` input with
    ``profile.cluster_input == "sum"`` is the sum of all normalised channels, normalised again.
    Computed block by block, so temporaries stay small for huge fields.

    Parameters
    ----------
    field : Field
    profile : StageProfile
        Finds the nuclear stain and says what outlines clusters (``profile.cluster_input``).
    config : ModelConfig
        Which inputs, in what order, and the normalisation percentiles.
    dtype : numpy dtype
        Of the result (inference holds it as ``float16`` to halve its memory).
    limits : InputLimits, optional
        Precomputed (:func:`input_limits`), e.g. of the whole field when ``field`` is a part of
        it; default those of ``field``.

    Returns
    -------
    (len(config.inputs), Z, Y, X) ndarray

    Raises
    ------
    InputError
        If the nuclear stain is missing (the message lists the channels present).
    """
    lim = input_limits(field, profile, config) if limits is None else limits
    nuc, data = lim.nuclear, field.data
    out = np.empty((len(config.inputs), *field.spatial_shape), dtype)
    z, h, _ = field.spatial_shape
    rows = max(1, _CHUNK_PX // max(1, field.spatial_shape[2]))
    for k in range(z):
        for y0 in range(0, h, rows):
            sl = (k, slice(y0, min(y0 + rows, h)))
            nuclear = normalise_channel(data[nuc][sl], limits=lim.channels[nuc])
            cluster = nuclear
            if lim.sum is not None:
                block = nuclear.copy()
                for c in range(field.n_channels):
                    if c != nuc:
                        block += normalise_channel(data[c][sl], limits=lim.channels[c])
                cluster = normalise_channel(block, limits=lim.sum)
            for i, kind in enumerate(config.inputs):
                out[(i, *sl)] = nuclear if kind == "nuclear" else cluster
    return out


# -- scale --------------------------------------------------------------------------------------
def estimate_nucleus_diameter_px(image: np.ndarray) -> float:
    """Rough typical nucleus diameter (pixels) of a nuclear-stain plane or stack.

    The smaller of two image-only estimates: the median equivalent diameter of the Otsu
    objects (:func:`~islet_imaging.models.classical.estimate_nucleus_diameter`) and the scale of
    the strongest scale-normalised Laplacian-of-Gaussian response (:func:`_blob_diameter_px`).
    Both fail by overestimating (touching nuclei merged into one Otsu object; large-scale
    structure outshining small nuclei in the LoG), so the smaller is kept. On the DSB 2018
    ``train`` / ``val`` images it is within 25 % of the median true diameter for 89 % / 93 % of
    images (LoG alone: 77 % / 81 %, with misses up to 20×), and on synthetic fields of every
    stage for 94 %. The middle plane of a stack is used. Give the pixel size for exact results.
    """
    from islet_imaging.models.classical import estimate_nucleus_diameter

    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 3:
        img = img[img.shape[0] // 2]
    blob = _blob_diameter_px(img)
    objects = estimate_nucleus_diameter(img)
    return blob if objects is None else min(blob, float(objects))


def _blob_diameter_px(image: np.ndarray) -> float:
    """Nucleus diameter (pixels) from the strongest scale-normalised LoG response.

    A disk of diameter ``d`` responds most at ``sigma = d / (2 √2)`` (blob detector); the
    99.5th percentile of the response is compared over scales. ``image``: (Y, X) or (Z, Y, X)
    (middle plane).
    """
    from scipy import ndimage as ndi

    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 3:
        img = img[img.shape[0] // 2]
    # work on at most ~512 px: shrink by an integer factor (mean), remembered in `f`
    f = max(1, math.ceil(max(img.shape) / 512))
    if f > 1:
        h, w = (img.shape[0] // f) * f, (img.shape[1] // f) * f
        img = img[:h, :w].reshape(h // f, f, w // f, f).mean(axis=(1, 3))
    img = normalise_channel(img)
    sigmas = np.geomspace(0.7, max(img.shape) / 8, 24)
    scores = [float(np.percentile(-(s**2) * ndi.gaussian_laplace(img, s), 99.5)) for s in sigmas]
    best = sigmas[int(np.argmax(scores))]
    return float(2.0 * math.sqrt(2.0) * best * f)


def rescale_factor(
    field: Field,
    config: ModelConfig,
    *,
    nucleus_diameter_um: float | None = None,
) -> tuple[float, float]:
    """How much to resize a field to reach the model's scale, and the field's effective µm/pixel.

    Parameters
    ----------
    field : Field
    config : ModelConfig
    nucleus_diameter_um : float, optional
        With a pixel size: the typical nucleus diameter in µm of this image (when its nuclei are
        unusually large or small). Without a pixel size: the typical nucleus diameter **in
        pixels** (``--nucleus-diameter PX``). Neither: estimated from the image, with a warning.

    Returns
    -------
    factor : float
        Model-scale size / native size (``< 1`` shrinks).
    pixel_size_um : float
        Effective in-plane µm per pixel of the field (the true one when known).
    """
    if nucleus_diameter_um is not None and not (
        math.isfinite(nucleus_diameter_um) and nucleus_diameter_um > 0
    ):
        raise InputError(
            f"nucleus diameter {nucleus_diameter_um!r} must be a positive number",
            field.origin.path,
        )
    typical = config.typical_nucleus_diameter_um
    if field.pixel_size is not None:
        px = field.pixel_size.isotropic_xy
        seen = px if nucleus_diameter_um is None else px * typical / nucleus_diameter_um
    else:
        if nucleus_diameter_um is None:
            nuc = field.data[_nuclear_index_or_first(field)]
            diameter_px = estimate_nucleus_diameter_px(nuc)
            warnings.warn(
                f"{field.origin.path or field.name}: no pixel size; estimated the nucleus diameter "
                f"as {diameter_px:.1f} px from the image. Give --pixel-size UM or "
                "--nucleus-diameter PX for reliable sizes",
                UserWarning,
                stacklevel=3,
            )
        else:
            diameter_px = float(nucleus_diameter_um)
        px = typical / diameter_px
        seen = px
    factor = seen / config.pixel_size_um
    if not MIN_SCALE <= factor <= MAX_SCALE:
        raise InputError(
            f"the image would be resized ×{factor:.3g} to the model's {config.pixel_size_um} µm "
            f"pixels (effective pixel size {seen:.3g} µm); that is outside "
            f"[{MIN_SCALE}, {MAX_SCALE}]. Check --pixel-size (µm) and --nucleus-diameter",
            field.origin.path,
        )
    return factor, px


def network_factor(field: Field, factor: float, max_upscale: float | None = MAX_UPSCALE) -> float:
    """The resize factor of the clusters' maps: ``factor``, but at most ``max_upscale`` for a
    field with a pixel size.

    Beyond :data:`MAX_UPSCALE` a coarse image is enlarged into blur the model was not trained on,
    and large aggregates break into fragments along false valleys of the predicted distance;
    seen less enlarged (nuclei smaller than the model's typical size), they stay whole. Nuclei
    need the full enlargement, so such a field goes through the network twice: at ``factor``
    for the nuclei's maps, at the capped factor for the clusters' (:func:`_field_maps`). The
    clusters' distances are then in larger pixels (:func:`field_instances` scales their cap by
    ``factor / network_factor``). Fields without a pixel size take their scale from their
    nuclei: never capped. ``None``: never capped.
    """
    _check_max_upscale(max_upscale, field)
    if max_upscale is None or field.pixel_size is None:
        return factor
    return min(factor, max_upscale)


def _check_max_upscale(max_upscale: float | None, field: Field) -> None:
    if max_upscale is not None and not (math.isfinite(max_upscale) and max_upscale >= 1):
        raise InputError(
            f"max_upscale {max_upscale!r} must be a number of at least 1 (or None: no cap)",
            field.origin.path,
        )


def _nuclear_index_or_first(field: Field) -> int:
    for i, name in enumerate(field.channel_names):
        from islet_imaging.stages import NUCLEAR_STAIN_ALIASES

        if name.casefold() in {a.casefold() for a in NUCLEAR_STAIN_ALIASES}:
            return i
    return 0


def resize_image(image: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Bilinear resize of the last two axes to ``shape`` (antialiased when shrinking), float32.

    Parameters
    ----------
    image : (..., Y, X) ndarray
    shape : (int, int)
    """
    image = np.asarray(image, dtype=np.float32)
    shape = (int(shape[0]), int(shape[1]))
    if tuple(image.shape[-2:]) == shape:
        return image
    lead = image.shape[:-2]
    t = torch.from_numpy(np.ascontiguousarray(image.reshape(-1, 1, *image.shape[-2:])))
    shrink = shape[0] < image.shape[-2] or shape[1] < image.shape[-1]
    out = torch.empty((t.shape[0], 1, *shape), dtype=torch.float32)
    with torch.inference_mode():
        for i in range(t.shape[0]):  # one plane at a time: bounded memory
            out[i] = F.interpolate(
                t[i : i + 1], size=shape, mode="bilinear", align_corners=False, antialias=shrink
            )[0]
    return out.numpy().reshape(*lead, *shape)


#: Probabilities are clipped to [eps, 1 − eps] before :func:`resize_probabilities` takes logits.
_LOGIT_EPS = 1e-4


def resize_probabilities(maps: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """:func:`resize_image` of sigmoid maps in logit space, float32 in 0..1.

    The network computes logits and a sigmoid; interpolating the logits puts a level's crossing
    between two pixels where the network's own ramp puts it. Interpolating the probabilities
    moves a low level's crossing outward instead (an edge from 0.01 to 0.99 crosses 0.3 at 0.30
    of the way from the outer pixel centre, against 0.41 in logits): nuclei outlined at 0.3 came
    out 2–3 % wider on resized fields than at the model's own pixel size
    (benchmarks/README.md, "Other sets").
    """
    maps = np.asarray(maps, dtype=np.float32)
    shape = (int(shape[0]), int(shape[1]))
    if tuple(maps.shape[-2:]) == shape:
        return maps
    with torch.inference_mode():  # torch's kernels: several times numpy's speed here
        logits = torch.logit(torch.from_numpy(np.ascontiguousarray(maps)), eps=_LOGIT_EPS)
        resized = torch.from_numpy(resize_image(logits.numpy(), shape))
        return torch.sigmoid_(resized).numpy()


def resize_labels(labels: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize of the last two axes of a label image (pixel centres aligned).

    Parameters
    ----------
    labels : (..., Y, X) ndarray of int
    shape : (int, int)
    """
    labels = np.asarray(labels)
    h, w = labels.shape[-2:]
    ys = np.minimum(((np.arange(shape[0]) + 0.5) * h / shape[0]).astype(np.int64), h - 1)
    xs = np.minimum(((np.arange(shape[1]) + 0.5) * w / shape[1]).astype(np.int64), w - 1)
    return labels[..., ys[:, None], xs[None, :]]


# -- tiling -------------------------------------------------------------------------------------
def _tiling(length: int, tile: int, overlap: int, multiple: int) -> tuple[int, list[int]]:
    """Tile size and start positions along one axis of ``length`` (a multiple of ``multiple``).

    As few tiles as ``tile`` allows, evenly spread, shrunk to the smallest size that still keeps
    ``overlap`` between neighbours; sizes and starts are multiples of ``multiple`` (the network's
    pooling grid stays aligned, so a tiled result equals an untiled one away from tile edges).
    """
    if length <= tile:
        return length, [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    size = min(tile, math.ceil((length + (n - 1) * (overlap + multiple)) / n / multiple) * multiple)
    starts = [
        min((round(i * (length - size) / (n - 1)) // multiple) * multiple, length - size)
        for i in range(n)
    ]
    starts[-1] = length - size
    return size, sorted(set(starts))


def _ramp(size: int, overlap: int, lead: bool, trail: bool) -> np.ndarray:
    """1D blend weights of one tile: 0 over the outer quarter of an interior overlap, a cosine
    rise over the next half, 1 elsewhere. Image borders (``lead``/``trail`` False) keep weight 1."""
    w = np.ones(size, np.float64)
    q = overlap // 4
    rise = max(overlap - 2 * q, 1)
    r = 0.5 - 0.5 * np.cos(np.pi * (np.arange(rise) + 0.5) / rise)
    ramp = np.concatenate([np.zeros(q), r])[: min(size, q + rise)]
    if lead:
        w[: ramp.size] = np.minimum(w[: ramp.size], ramp)
    if trail:
        w[size - ramp.size :] = np.minimum(w[size - ramp.size :], ramp[::-1])
    return w


def _padded_size(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple, and at least two multiples."""
    return max(2 * multiple, -(-n // multiple) * multiple)


def _tile(image: np.ndarray, y0: int, x0: int, th: int, tw: int) -> np.ndarray:
    """The (C, th, tw) float32 tile at (y0, x0); parts beyond the image are mirrored (reflect)."""
    h, w = image.shape[-2:]
    crop = np.asarray(image[:, y0 : min(y0 + th, h), x0 : min(x0 + tw, w)], dtype=np.float32)
    ph, pw = th - crop.shape[1], tw - crop.shape[2]
    if ph or pw:
        mode = "reflect" if min(crop.shape[1:]) > 1 else "edge"
        crop = np.pad(crop, [(0, 0), (0, ph), (0, pw)], mode=mode)
    return crop


def predict_maps(
    image: np.ndarray | Field,
    model: Model | str | os.PathLike[str],
    *,
    profile: StageProfile | str | None = None,
    device: str | torch.device | None = None,
    tile: int = 1024,
    overlap: int = 128,
    batch_size: int = 1,
    channels_last: bool = True,
    compile: bool = False,
    augment: bool = False,
    dtype: type[np.floating] | np.dtype = np.float32,
) -> dict[str, np.ndarray]:
    """The network's maps of a normalised, model-scale input, tiled with seamless blending.

    Parameters
    ----------
    image : (C, Y, X) or (C, Z, Y, X) ndarray of float32, or Field
        Normalised input at the model's pixel size (:func:`prepare_input` + :func:`resize_image`);
        ``C = len(config.inputs)``. A z-stack is predicted plane by plane. A :class:`Field` goes
        through :func:`predict_field_maps` (inputs, rescaling and back): the maps are then
        ``(Z, Y, X)`` on the field's grid.
    model : Model, name or path
    profile : StageProfile or str, optional
        For a Field: its stage (default ``field.origin.stage``).
    device : str, optional
        ``"cpu"`` / ``"cuda"``; default the model's device.
    tile : int
        Tile side in pixels (rounded down to a multiple of ``config.size_multiple``).
    overlap : int
        Overlap of neighbouring tiles; the outer quarter of each overlap is ignored, so
        ``overlap / 4`` should cover half the network's effective receptive field.
    batch_size : int
        Tiles per forward pass.
    channels_last : bool
        Run in channels-last memory format (faster on CPU).
    compile : bool
        ``torch.compile`` the network first (off by default: it pays only on long runs).
    augment : bool
        Test-time augmentation: each tile's maps are the mean of the network's maps of the tile
        and of its three mirror images (flipped in x, in y, in both), flipped back. Four times
        the network time.
    dtype : numpy dtype
        Of the returned maps (``float16`` halves their memory; blending is float32 either way).

    Returns
    -------
    dict of str to (Y, X) or (Z, Y, X) ndarray
        ``config.output_names`` → maps in 0..1 (sigmoid of the logits).

    Notes
    -----
    Memory: the input, the output maps, one row of tiles (float32) and one forward pass of
    ``batch_size`` tiles (≈ 0.5 GB for 1024² pixels with the default network).
    """
    mdl = load_model(model, device=device)
    cfg = mdl.config
    if not isinstance(image, np.ndarray) and hasattr(image, "channel_names"):
        from islet_imaging.stages import get_stage

        stage = profile if profile is not None else image.origin.stage
        if stage is None:
            raise InputError(
                "the image does not say its stage; pass profile=... (e.g. 'S6')", image.origin.path
            )
        maps, _ = predict_field_maps(
            image,
            get_stage(stage),
            mdl,
            tile=tile,
            overlap=overlap,
            batch_size=batch_size,
            compile=compile,
            augment=augment,
            dtype=dtype,
        )
        return maps
    image = np.asarray(image)
    if image.ndim == 4:
        planes = [
            predict_maps(
                image[:, z],
                mdl,
                device=device,
                tile=tile,
                overlap=overlap,
                batch_size=batch_size,
                channels_last=channels_last,
                compile=compile,
                augment=augment,
                dtype=dtype,
            )
            for z in range(image.shape[1])
        ]
        return {k: np.stack([p[k] for p in planes]) for k in cfg.output_names}
    if image.ndim != 3 or image.shape[0] != cfg.in_channels:
        raise InputError(
            f"model input must be ({cfg.in_channels}, Y, X) for inputs {list(cfg.inputs)}, "
            f"got shape {image.shape}"
        )
    if min(image.shape[-2:]) < 1:
        raise InputError(f"model input has no pixels (shape {image.shape})")
    m = cfg.size_multiple
    tile = max(m, (int(tile) // m) * m)
    overlap = max(0, int(overlap))
    if overlap >= tile:
        raise InputError(f"tile overlap {overlap} must be smaller than the tile size {tile}")
    dev = mdl.device
    net = mdl.inference_network(channels_last=channels_last and dev.type == "cpu", compile=compile)

    h, w = image.shape[-2:]
    hp, wp = _padded_size(h, m), _padded_size(w, m)
    th, sy = _tiling(hp, tile, overlap, m)
    tw, sx = _tiling(wp, tile, overlap, m)
    wy = {y0: _ramp(th, overlap, y0 > 0, y0 + th < hp) for y0 in sy}
    wx = {x0: _ramp(tw, overlap, x0 > 0, x0 + tw < wp) for x0 in sx}
    sum_y, sum_x = np.zeros(hp), np.zeros(wp)
    for y0 in sy:
        sum_y[y0 : y0 + th] += wy[y0]
    for x0 in sx:
        sum_x[x0 : x0 + tw] += wx[x0]
    inv_y = (1.0 / sum_y).astype(np.float32)
    inv_x = (1.0 / sum_x[:w]).astype(np.float32)
    out = np.empty((cfg.out_channels, h, w), dtype)
    # float32 accumulator for one row of tiles; rows above the next tile row are final
    acc = np.zeros((cfg.out_channels, th, w), np.float32)
    mf = torch.channels_last if channels_last and dev.type == "cpu" else torch.contiguous_format
    with torch.inference_mode():
        for r, y0 in enumerate(sy):
            row = [(y0, x0) for x0 in sx]
            for b in range(0, len(row), batch_size):
                batch = row[b : b + batch_size]
                x = np.stack([_tile(image, y, x_, th, tw) for y, x_ in batch])
                xt = torch.from_numpy(x).to(dev).contiguous(memory_format=mf)
                pred = _forward(net, xt, augment).float().cpu().numpy()
                for (_, x0), p in zip(batch, pred, strict=True):
                    x1 = min(x0 + tw, w)
                    if x1 > x0:
                        weight = np.outer(wy[y0], wx[x0][: x1 - x0]).astype(np.float32)
                        acc[:, :, x0:x1] += p[:, :, : x1 - x0] * weight
            y_next = sy[r + 1] if r + 1 < len(sy) else y0 + th
            n_final = min(y_next, h) - y0
            if n_final > 0:
                block = acc[:, :n_final] * inv_y[y0 : y0 + n_final, None] * inv_x[None, None, :]
                np.clip(block, 0.0, 1.0, out=block)
                out[:, y0 : y0 + n_final] = block
            # keep the rows the next tile row overlaps, at the top of the accumulator
            keep = th - (y_next - y0)
            if keep > 0:
                acc[:, :keep] = acc[:, th - keep :]
            acc[:, max(keep, 0) :] = 0.0
    return {name: out[k] for k, name in enumerate(cfg.output_names)}


#: The mirror images of test-time augmentation: tensor dims flipped (batch, channel, y, x).
_MIRRORS = ((), (3,), (2,), (2, 3))
#: Appended to the model's name in ``Labels.method`` (and the benchmarks' method names) when the
#: maps are augmented.
AUGMENTED_SUFFIX = "+augment"


def _forward(net: torch.nn.Module, x: torch.Tensor, augment: bool) -> torch.Tensor:
    """The network's sigmoid maps of a batch, or their mean over ``_MIRRORS`` (``augment``)."""
    if not augment:
        return torch.sigmoid(net(x))
    total = torch.zeros(())
    for dims in _MIRRORS:
        p = torch.sigmoid(net(x.flip(dims) if dims else x))
        total = total + (p.flip(dims) if dims else p)
    return total / len(_MIRRORS)


def predict_field_maps(
    field: Field,
    profile: StageProfile,
    model: Model | str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    nucleus_diameter_um: float | None = None,
    tile: int = 1024,
    overlap: int = 128,
    batch_size: int = 1,
    compile: bool = False,
    augment: bool = False,
    dtype: type[np.floating] | np.dtype = np.float32,
    max_upscale: float | None = MAX_UPSCALE,
) -> tuple[dict[str, np.ndarray], tuple[float, float, float]]:
    """The network's maps of a field on the field's own (Z, Y, X) grid.

    Parameters are those of :func:`segment_cnn` and :func:`predict_maps`.

    Returns
    -------
    maps : dict of str to (Z, Y, X) ndarray of ``dtype``
    spacing : (float, float, float)
        ``(z, y, x)`` µm per voxel used for post-processing (effective when the field has no
        pixel size).
    """
    mdl = load_model(model, device=device)
    cfg = mdl.config
    _check_field(field)
    _check_max_upscale(max_upscale, field)
    factor, px = rescale_factor(field, cfg, nucleus_diameter_um=nucleus_diameter_um)
    _warn_about_scale(field, factor, cfg)
    return _field_maps(
        field,
        profile,
        mdl,
        factor,
        px,
        cluster_factor=network_factor(field, factor, max_upscale),
        tile=tile,
        overlap=overlap,
        batch_size=batch_size,
        compile=compile,
        augment=augment,
        dtype=dtype,
    )


def _warn_about_scale(field: Field, factor: float, config: ModelConfig) -> None:
    """:class:`CoarseImageWarning` and :class:`SmallImageWarning` when they apply."""
    _, h, w = field.spatial_shape
    mh, mw = max(1, round(h * factor)), max(1, round(w * factor))
    if factor > MAX_UPSCALE:
        warnings.warn(
            f"{field.origin.path or field.name}: {factor * config.pixel_size_um:.3g} µm per pixel "
            f"(effective), {factor:.2g}× the model's {config.pixel_size_um:g} µm: with the default "
            "model (trained at 0.5-0.85 µm/px) nuclei hold up; clusters are found on the image "
            f"enlarged at most {MAX_UPSCALE:g}× (a second pass), but large aggregates may still "
            "be split into fragments (held-out S6 clusters AP@0.5 0.91 at 1.0 µm/px, 0.74 at "
            "1.3, 0.75 at 1.6). Image at 1 µm/px or finer for cluster sizes and IEQ",
            CoarseImageWarning,
            stacklevel=3,
        )
    if min(mh, mw) < MIN_CONTEXT_PX:
        warnings.warn(
            f"{field.origin.path or field.name}: the image is {h}×{w} px, {mh}×{mw} px at the "
            f"model's {config.pixel_size_um:g} µm pixels: less than the {MIN_CONTEXT_PX} px of "
            "context the CNN needs around each object, so expect lower accuracy (nuclei "
            "AP@0.5 about 0.02 lower at 96-128 px, 0.04 at 64 px). Segment the whole field, "
            "not a crop",
            SmallImageWarning,
            stacklevel=3,
        )


def _field_maps(
    field: Field,
    profile: StageProfile,
    model: Model,
    factor: float,
    pixel_size_um: float,
    *,
    limits: InputLimits | None = None,
    tile: int,
    overlap: int,
    batch_size: int,
    compile: bool,
    augment: bool,
    dtype: type[np.floating] | np.dtype,
    cluster_factor: float | None = None,
) -> tuple[dict[str, np.ndarray], tuple[float, float, float]]:
    """:func:`predict_field_maps` once the scale (``factor``, effective µm per pixel) is known.

    ``cluster_factor`` (:func:`network_factor`), when not ``factor``: the clusters' maps come
    from a second pass at that scale, on the same normalised input.
    """
    if field.pixel_size is not None:
        spacing = field.pixel_size.zyx
    else:
        spacing = (pixel_size_um,) * 3
    inputs = prepare_input(
        field,
        profile,
        model.config,
        dtype=np.float16 if dtype == np.float16 else np.float32,
        limits=limits,
    )
    opts = dict(tile=tile, overlap=overlap, batch_size=batch_size, compile=compile, augment=augment)
    maps = _maps_at(inputs, model, factor, name=field.name, dtype=dtype, **opts)
    if cluster_factor is not None and not math.isclose(cluster_factor, factor):
        clusters = [n for n in maps if n.startswith("clusters_")]
        maps.update(
            _maps_at(
                inputs, model, cluster_factor, name=field.name, dtype=dtype, keep=clusters, **opts
            )
        )
    del inputs
    return maps, spacing


def _maps_at(
    inputs: np.ndarray,
    model: Model,
    factor: float,
    *,
    name: str,
    tile: int,
    overlap: int,
    batch_size: int,
    compile: bool,
    augment: bool,
    dtype: type[np.floating] | np.dtype,
    keep: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """The network's maps of the normalised ``(C, Z, Y, X)`` input resized by ``factor``, back
    on the input's grid; only those named in ``keep`` (default all)."""
    _, z, h, w = inputs.shape
    mh, mw = max(1, round(h * factor)), max(1, round(w * factor))
    log.debug(
        "%s: scale ×%.3f to %d×%d px at %.3f µm", name, factor, mh, mw, model.config.pixel_size_um
    )
    same = (mh, mw) == (h, w)
    maps: dict[str, np.ndarray] = {}
    for k in range(z):
        x = inputs[:, k] if same else resize_image(inputs[:, k], (mh, mw))
        plane = predict_maps(
            x,
            model,
            tile=tile,
            overlap=overlap,
            batch_size=batch_size,
            compile=compile,
            augment=augment,
            dtype=dtype,
        )
        del x
        plane = {n: v for n, v in plane.items() if keep is None or n in keep}
        if not same:
            plane = {
                n: resize_probabilities(plane.pop(n), (h, w)).astype(dtype, copy=False)
                for n in list(plane)
            }
        if z == 1:  # no copy: views of the one plane
            maps = {n: v[np.newaxis] for n, v in plane.items()}
        else:
            for n, v in plane.items():
                if n not in maps:
                    maps[n] = np.empty((z, h, w), dtype)
                maps[n][k] = v
        del plane
    return maps


def cluster_split_for(profile: StageProfile, config: ModelConfig) -> str:
    """How inference splits touching clusters at this stage (``maps_to_instances(cluster_split=)``).

    Monolayer patches (S1-S3) are never split: patches of arbitrary shape that touch cannot be
    told apart. Colonies and aggregates follow ``config.cluster_split``.
    """
    return "none" if profile.cluster_kind == "monolayer-patch" else config.cluster_split


def _check_field(field: Field) -> None:
    _, h, w = field.spatial_shape
    if min(h, w) < MIN_SIZE_PX:
        raise InputError(
            f"image is {h}×{w} px; the CNN needs at least {MIN_SIZE_PX}×{MIN_SIZE_PX}. "
            "Use a larger field (or --model classical)",
            field.origin.path,
        )


def stage_instances(
    maps: Mapping[str, np.ndarray],
    spacing: Sequence[float],
    profile: StageProfile,
    config: ModelConfig,
    thresholds: Thresholds | Mapping[str, float],
    *,
    scale: float = 1.0,
    min_nucleus_factor: float = 1.0,
    map_scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`maps_to_instances` with the stage's size filters and cluster split.

    ``maps`` are 2D or 3D with ``spacing`` (µm) per axis. ``scale``: nuclei are this many times
    the model's typical size (a user-given nucleus diameter), which shifts the nucleus size
    filter and the cluster distance cap in µm with it. ``min_nucleus_factor`` lowers the
    smallest nucleus diameter further (:data:`UNKNOWN_SCALE_MIN_NUCLEUS`); so does
    ``thresholds.nuclei_min_section`` in a 2D image of an aggregate stage (an optical section
    through thick clusters, which shows most nuclei smaller than they are). ``map_scale``: the
    maps were predicted in pixels this many times the model's (:func:`network_factor`), which
    scales the cluster distance cap in µm.
    """
    th = Thresholds.of(thresholds)
    lo_d, hi_d = profile.nucleus_diameter_um
    lo_d *= min_nucleus_factor
    if len(spacing) == 2 and profile.cluster_kind == "aggregate":
        lo_d *= th.nuclei_min_section
    cap_px = config.distance_cap_px.get("clusters")
    return maps_to_instances(
        maps,
        thresholds=th,
        spacing=tuple(spacing),
        nucleus_diameter_um=(lo_d * scale, hi_d * scale),
        cluster_diameter_um=(profile.min_cluster_diameter_um, None),
        cluster_split=cluster_split_for(profile, config),
        cluster_distance_cap_um=(
            None if cap_px is None else cap_px * config.pixel_size_um * scale * map_scale
        ),
    )


def field_instances(
    maps: Mapping[str, np.ndarray],
    spacing: Sequence[float],
    field: Field,
    profile: StageProfile,
    model: Model,
    *,
    thresholds: Thresholds | Mapping[str, float] | None = None,
    nucleus_diameter_um: float | None = None,
    max_upscale: float | None = MAX_UPSCALE,
) -> tuple[np.ndarray, np.ndarray]:
    """Nucleus and cluster instances, ``(Z, Y, X)`` int32, from :func:`predict_field_maps` output.

    The post-processing half of :func:`segment_cnn`, separate so that it can be re-run on cached
    maps (e.g. to tune thresholds). ``nucleus_diameter_um`` and ``max_upscale`` must be those
    the maps were predicted with.
    """
    cfg = model.config
    scale = map_scale = 1.0
    if field.pixel_size is not None:
        if nucleus_diameter_um is not None:
            # the user says nuclei here are this big: shift the plausible range with them
            scale = nucleus_diameter_um / cfg.typical_nucleus_diameter_um
        factor, _ = rescale_factor(field, cfg, nucleus_diameter_um=nucleus_diameter_um)
        map_scale = factor / network_factor(field, factor, max_upscale)
    th = model.thresholds if thresholds is None else thresholds
    opts = {
        "scale": scale,
        "min_nucleus_factor": 1.0 if field.pixel_size is not None else UNKNOWN_SCALE_MIN_NUCLEUS,
        "map_scale": map_scale,
    }
    if field.is_3d:
        return stage_instances(maps, spacing, profile, cfg, th, **opts)
    view = {k: v[0] for k, v in maps.items()}
    nuclei, clusters = stage_instances(view, tuple(spacing)[1:], profile, cfg, th, **opts)
    return nuclei[np.newaxis], clusters[np.newaxis]


def segment_cnn(
    field: Field,
    profile: StageProfile,
    *,
    model: str | os.PathLike[str] | Model = "default",
    device: str | None = None,
    nucleus_diameter_um: float | None = None,
    return_probabilities: bool = False,
    thresholds: Thresholds | Mapping[str, float] | None = None,
    tile: int = 1024,
    overlap: int = 128,
    batch_size: int = 1,
    compile: bool = False,
    augment: bool = False,
    block: int | None = BLOCK_PX,
    block_halo_um: float = BLOCK_HALO_UM,
    max_upscale: float | None = MAX_UPSCALE,
) -> Labels:
    """Segment one field with a CNN model into nucleus and cluster instances.

    Parameters
    ----------
    field : Field
        Any size, 2D or a z-stack; needs a nuclear stain channel.
    profile : StageProfile
        Nuclear channel aliases, what outlines clusters, and the size filters
        (``nucleus_diameter_um``, ``min_cluster_diameter_um``).
    model : str, path or Model
        ``"default"``, a model name or directory, or a loaded :class:`Model`.
    device : str, optional
        ``"cpu"`` or ``"cuda"``; default CUDA when available.
    nucleus_diameter_um : float, optional
        See :func:`rescale_factor` (pixels when the field has no pixel size).
    return_probabilities : bool
        Keep the maps (on the field's grid, float32 holding float16 precision) in
        ``Labels.probabilities``.
    thresholds : Thresholds or dict, optional
        Override the model's tuned thresholds.
    tile, overlap, batch_size : int
        Tiling (see :func:`predict_maps`).
    compile : bool
        ``torch.compile`` the network (see :func:`predict_maps`).
    augment : bool
        Test-time augmentation: maps averaged over mirror images, 4× the network time (see
        :func:`predict_maps`).
    block : int or None
        A field with more than this many pixels along y or x is segmented block by block
        (cores of at most ``block`` px, each inside a window with ``block_halo_um`` of context
        on every side) and the labels stitched (:mod:`~islet_imaging.models._blocks`), so that
        memory beyond the field and its labels stays flat however large the field is.
        ``None``: always whole.
    block_halo_um : float
        Context around each block, in µm (default :data:`BLOCK_HALO_UM`).
    max_upscale : float or None
        The clusters' maps of a field with a pixel size come from the image enlarged at most
        this much (a second pass when the model's scale needs more; :func:`network_factor`);
        ``None``: one pass, always at the model's pixel size.

    Returns
    -------
    Labels
        ``(Z, Y, X)`` int32 nuclei and clusters on the field's grid; ``method`` is the model's
        name, with ``+augment`` appended when augmented.

    Warns
    -----
    EmptyImageWarning
        When the nuclear channel is constant (all zero or saturated); the labels are empty.
    MissingZStepWarning
        For a z-stack without a z step.
    """
    from islet_imaging.segment import Labels, warn_missing_z_step

    mdl = load_model(model, device=device)
    cfg = mdl.config
    _check_field(field)
    warn_missing_z_step(field)
    if block is not None and block < MIN_SIZE_PX:
        raise InputError(f"block {block} px is smaller than the {MIN_SIZE_PX} px the CNN needs")
    if not block_halo_um >= 0:
        raise InputError(f"block halo {block_halo_um} µm must be zero or more")
    _check_max_upscale(max_upscale, field)
    method = mdl.name + AUGMENTED_SUFFIX if augment else mdl.name
    limits = input_limits(field, profile, cfg)  # of the whole field, for every block
    lo, hi = limits.channels[limits.nuclear]
    if not hi > lo:
        zeros = np.zeros(field.spatial_shape, np.int32)
        warnings.warn(
            f"{field.origin.path or field.name}: the nuclear channel is constant (all zero or "
            "saturated); nothing to segment, returning empty labels",
            EmptyImageWarning,
            stacklevel=2,
        )
        probs = (
            {n: np.zeros(field.spatial_shape, np.float32) for n in cfg.output_names}
            if return_probabilities
            else {}
        )
        return Labels(zeros, zeros.copy(), probs, method)
    factor, px = rescale_factor(field, cfg, nucleus_diameter_um=nucleus_diameter_um)
    _warn_about_scale(field, factor, cfg)
    _, h, w = field.spatial_shape
    halo = math.ceil(block_halo_um / px)
    net = network_factor(field, factor, max_upscale)
    # at the model's scale, windows start on the network's pooling grid, as the whole field does
    align = cfg.size_multiple if math.isclose(factor, 1.0) else 1
    blocks = plan_blocks((h, w), max(h, w) if block is None else block, halo, align=align)
    probs: dict[str, np.ndarray] = {}

    def segment_window(blk: Block) -> tuple[np.ndarray, np.ndarray]:
        part = field if len(blocks) == 1 else field.with_data(field.data[(..., *blk.window)])
        maps, spacing = _field_maps(
            part,
            profile,
            mdl,
            factor,
            px,
            cluster_factor=net,
            limits=limits,
            tile=tile,
            overlap=overlap,
            batch_size=batch_size,
            compile=compile,
            augment=augment,
            dtype=np.float16,  # halves the maps' memory; thresholds need no more precision
        )
        if len(blocks) > 1:
            log.info("%s: block %d of %d", field.name, blocks.index(blk) + 1, len(blocks))
        if return_probabilities and len(blocks) == 1:
            probs.update((n, v.astype(np.float32)) for n, v in maps.items())
        elif return_probabilities:
            for n, v in maps.items():
                if n not in probs:
                    probs[n] = np.zeros(field.spatial_shape, np.float32)
                probs[n][(..., *blk.core)] = v[(..., *blk.core_in_window)]
        return field_instances(
            maps,
            spacing,
            part,
            profile,
            mdl,
            thresholds=thresholds,
            nucleus_diameter_um=nucleus_diameter_um,
            max_upscale=max_upscale,
        )

    if len(blocks) == 1:
        nuclei, clusters = segment_window(blocks[0])
    else:
        log.info(
            "%s: %d×%d px, segmented in %d blocks with %d px halos",
            field.name,
            h,
            w,
            len(blocks),
            halo,
        )
        nuclei, clusters = stitch_blocks(field.spatial_shape, blocks, segment_window, halo=halo)
    return Labels(nuclei, clusters, probs, method)
