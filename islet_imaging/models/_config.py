"""The model configuration: everything needed to rebuild a network and use it, as JSON.

A :class:`ModelConfig` is stored as ``config.json`` in a model directory (see
:mod:`islet_imaging.models._modeldir`). It fixes the architecture, the input channels and their
normalisation, the physical scale the model was trained at, the output maps and how they were
made (see :mod:`islet_imaging.models._targets`), and default post-processing thresholds (see
:class:`Thresholds`; a model directory's ``thresholds.json`` overrides them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from islet_imaging.errors import ModelError

__all__ = [
    "ACTIVATIONS",
    "FORMAT_VERSION",
    "HEAD_MAPS",
    "INPUT_KINDS",
    "NORMS",
    "ModelConfig",
    "Thresholds",
]

#: Version of the model directory format (``config.json`` → ``"format_version"``).
FORMAT_VERSION = 1

#: Input kinds a model can ask for. ``"nuclear"``: the nuclear stain. ``"cluster"``: the stage
#: profile's cluster input (``profile.cluster_input``: the nuclear stain again, or the sum of all
#: channels after per-channel normalisation).
INPUT_KINDS: tuple[str, ...] = ("nuclear", "cluster")

#: Object classes a model can segment and the maps each one's head can predict.
HEAD_MAPS: dict[str, tuple[str, ...]] = {
    "nuclei": ("foreground", "distance"),
    "clusters": ("foreground", "distance"),
}

NORMS: tuple[str, ...] = ("batch", "group", "none")
ACTIVATIONS: tuple[str, ...] = ("relu", "silu", "leaky_relu")


def _where(where: str | None) -> str:
    return f"{where}: " if where else ""


def _reject_unknown_keys(d: Mapping[str, Any], cls: type, what: str, where: str | None) -> None:
    """A key that is not a field of ``cls`` is an error (a typo would be silently ignored)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ModelError(f"{_where(where)}unknown {what} keys {unknown}; known: {sorted(known)}")


#: Thresholds that may be ``None`` (then the 2D level applies).
_OPTIONAL = frozenset({"nuclei_foreground_3d", "nuclei_seed_3d", "clusters_outline"})


@dataclass(frozen=True)
class Thresholds:
    """Post-processing thresholds, per object class.

    Parameters
    ----------
    nuclei_foreground, clusters_foreground : float
        Probability above which a pixel belongs to an object (0..1).
    nuclei_seed, clusters_seed : float
        Level of the predicted distance map (0..1) above which a pixel is part of an object's
        seed ("core"); each connected core becomes one object, grown by watershed on the
        negative distance inside the foreground. Higher values split touching objects more.
    nuclei_foreground_3d, nuclei_seed_3d : float or None
        ``nuclei_foreground`` and ``nuclei_seed`` of z-stacks, whose planes are predicted one
        by one and joined in 3D: out-of-focus light above and below a nucleus lengthens it in z
        at a low foreground level, and cores joined across planes chain neighbouring nuclei at
        a low seed level. ``None``: the 2D level.
    nuclei_end_plane_3d : float
        z-stacks: a nucleus's top and bottom planes are dropped while their area is below this
        fraction of its largest plane (the thin tails its out-of-focus light leaves in the
        planes beyond it; :func:`trim_end_planes
        <islet_imaging.models._postprocess.trim_end_planes>`). ``0`` keeps every plane.
    nuclei_min_seed_fraction, clusters_min_seed_fraction : float
        Cores smaller than this fraction of the smallest allowed object are not seeds (their
        pixels join a neighbouring object). Suppresses over-splitting on noisy distance maps.
    clusters_shape_h : float
        With ``cluster_split="shape"``: depth of the saddle between two touching clusters, as a
        fraction of the smallest cluster's radius (see :func:`maps_to_instances`).
    clusters_saddle : float
        With ``cluster_split="combined"``: relative depth ``(lower peak − saddle) / lower peak``
        of the saddle between two touching clusters in the depth map made of the foreground's
        shape and the predicted distance (see :func:`combined_split_instances
        <islet_imaging.models._postprocess.combined_split_instances>`); shallower saddles are
        bumps of one cluster.
    nuclei_merge, clusters_merge : float
        Neighbouring objects are merged again when the mean predicted distance along their shared
        boundary exceeds this level (the boundary is a neck inside one object, not a contact
        between two, which lies in a valley of the distance map). ``1.0`` never merges.
    clusters_absorb_size, clusters_absorb_contact : float
        With ``cluster_split="combined"``: a cluster at most ``clusters_absorb_size`` times the
        size of the neighbour it shares most boundary with, and sharing at least
        ``clusters_absorb_contact`` of its outline with it, joins that neighbour: a small piece
        mostly enclosed by a large aggregate is a piece of it that a false valley of the predicted
        distance cut off, not a cluster of its own. ``clusters_absorb_size`` 0 never joins.
    clusters_outline : float or None
        Clusters, found and split at ``clusters_foreground``, grow into the connected pixels
        whose foreground probability is above this lower level, at most 5 µm beyond their
        outline (a watershed on the probability; :func:`grow_to_level
        <islet_imaging.models._postprocess.grow_to_level>`): the level that splits touching
        clusters best lies inside the network's own outline, and a cluster's outline decides
        its size and IEQ. ``None``: the ``clusters_foreground`` outline.
    nuclei_min_section : float
        2D images of aggregate stages: the smallest nucleus kept, as a fraction of the stage's
        smallest nucleus diameter. Such an image is an optical section through a thick cluster,
        and it cuts most nuclei away from their middle, so their profiles are smaller than whole
        nuclei. ``1.0`` keeps the stage's floor. Colonies and monolayers (nuclei seen whole) and
        z-stacks (nuclei joined in 3D) always use the stage's floor.
    """

    nuclei_foreground: float = 0.5
    nuclei_seed: float = 0.5
    nuclei_foreground_3d: float | None = None
    nuclei_seed_3d: float | None = None
    nuclei_end_plane_3d: float = 0.0
    nuclei_min_seed_fraction: float = 0.1
    nuclei_merge: float = 1.0
    clusters_foreground: float = 0.5
    clusters_seed: float = 0.6
    clusters_min_seed_fraction: float = 0.05
    clusters_merge: float = 0.2
    clusters_shape_h: float = 0.3
    clusters_saddle: float = 0.2
    clusters_absorb_size: float = 0.0
    clusters_absorb_contact: float = 1.0
    clusters_outline: float | None = None
    nuclei_min_section: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in _OPTIONAL:
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
            ):
                raise ModelError(f"threshold {f.name}={value!r} is not a number")
            if not 0.0 <= float(value) <= 1.0:
                raise ModelError(f"threshold {f.name}={value!r} must lie in [0, 1]")
            object.__setattr__(self, f.name, float(value))

    def for_class(self, name: str, *, z_stack: bool = False) -> dict[str, float]:
        """``{"foreground", "seed", "min_seed_fraction", "merge", "end_plane"}`` of ``"nuclei"``
        or ``"clusters"``; of a z-stack with the ``nuclei_*_3d`` levels that are set
        (``"end_plane"``: ``nuclei_end_plane_3d`` for nuclei in a z-stack, else 0)."""
        out = {
            key: getattr(self, f"{name}_{key}")
            for key in ("foreground", "seed", "min_seed_fraction", "merge")
        }
        out["end_plane"] = 0.0
        if z_stack:
            for key in ("foreground", "seed", "end_plane"):
                value = getattr(self, f"{name}_{key}_3d", None)
                if value is not None:
                    out[key] = value
        return out

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)

    @classmethod
    def of(
        cls, thresholds: Thresholds | Mapping[str, Any] | None, default: Thresholds | None = None
    ) -> Thresholds:
        """``thresholds`` as a :class:`Thresholds`: itself, built from a dict, or, when
        ``None``, ``default`` (itself ``None``: the defaults of this class)."""
        if thresholds is None:
            return default if default is not None else cls()
        if isinstance(thresholds, Thresholds):
            return thresholds
        return cls.from_dict(thresholds)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str | None = None) -> Thresholds:
        """Build from a JSON dict; unknown keys are an error (a typo would be silently ignored)."""
        if not isinstance(d, Mapping):
            raise ModelError(
                f"{_where(where)}thresholds must be a JSON object, got {type(d).__name__}"
            )
        _reject_unknown_keys(d, cls, "threshold", where)
        try:
            return cls(**dict(d))
        except ModelError as exc:
            raise ModelError(f"{_where(where)}{exc}") from exc


@dataclass(frozen=True)
class ModelConfig:
    """Architecture, inputs, scale, outputs and post-processing defaults of a segmentation model.

    Parameters
    ----------
    name : str
        Short model name (used as ``Labels.method``).
    inputs : tuple of str
        Input channels in order, each one of :data:`INPUT_KINDS`. ``in_channels = len(inputs)``.
    base_channels : int
        Channels at full resolution; doubles at each level (default 16-32-64-128-256,
        about 1.8 M parameters).
    depth : int
        Number of resolution levels (``depth - 1`` downsamplings); input sizes are padded to a
        multiple of ``2 ** (depth - 1)``.
    max_channels : int
        Cap on the channels of the deepest levels.
    context_blocks : int
        Residual blocks of dilated 3×3 convolutions at the deepest level (block ``k`` dilated
        ``2 ** (k + 1)``), which widen the receptive field without more downsampling: each adds
        ``4 · 2 ** (k + 1) · 2 ** (depth - 1)`` pixels (at depth 5: 128, 256, ...). Each starts as
        the identity (its last normalisation, or convolution, is zero), so blocks can be added to
        a trained network without changing its output
        (:func:`~islet_imaging.models.add_context_blocks`).
    norm : {"batch", "group", "none"}
        Normalisation after each convolution.
    activation : {"relu", "silu", "leaky_relu"}
    heads : dict of str to tuple of str
        Object class → the maps predicted for it, e.g.
        ``{"nuclei": ("foreground", "distance"), "clusters": ("foreground", "distance")}``.
        Output channel ``k`` is ``output_names[k]`` (``"nuclei_foreground"``, ...).
    distance_cap_px : dict of str to float or None
        How the distance target of each class is made (see :func:`make_targets`): ``None`` →
        the distance to the object's boundary divided by that object's maximum (0..1, every object
        peaks at 1); a number ``c`` → ``min(distance, c) / c`` (local, for objects larger than
        the network's field of view, such as clusters).
    percentiles : (float, float)
        Low and high percentiles mapped to 0 and 1 for each input channel.
    pixel_size_um : float
        In-plane pixel size (µm) of the training images; inputs are rescaled to it.
    typical_nucleus_diameter_um : float
        Typical nucleus diameter at training scale; lets images without a pixel size be rescaled
        from a nucleus diameter in pixels.
    thresholds : Thresholds
        Default post-processing thresholds (a model directory's ``thresholds.json`` wins).
    cluster_split : {"distance", "shape", "combined"}
        How inference splits touching clusters of colony and aggregate stages: from the predicted
        cluster distance map, by the shape of the predicted cluster foreground, or at saddles of
        either (monolayer patches are never split). See :func:`~islet_imaging.models._postprocess.maps_to_instances`.
    description : str
    """

    name: str = "unet"
    inputs: tuple[str, ...] = ("nuclear", "cluster")
    base_channels: int = 16
    depth: int = 5
    max_channels: int = 256
    context_blocks: int = 0
    norm: str = "batch"
    activation: str = "relu"
    heads: dict[str, tuple[str, ...]] = field(
        default_factory=lambda: {
            "nuclei": ("foreground", "distance"),
            "clusters": ("foreground", "distance"),
        }
    )
    distance_cap_px: dict[str, float | None] = field(
        default_factory=lambda: {"nuclei": None, "clusters": 12.0}
    )
    percentiles: tuple[float, float] = (1.0, 99.8)
    pixel_size_um: float = 0.65
    typical_nucleus_diameter_um: float = 10.0
    thresholds: Thresholds = field(default_factory=Thresholds)
    cluster_split: str = "combined"
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ModelError("config: 'name' must be a non-empty string")
        inputs = tuple(self.inputs) if not isinstance(self.inputs, str) else (self.inputs,)
        if not inputs or any(i not in INPUT_KINDS for i in inputs):
            raise ModelError(
                f"config: inputs {list(inputs)} must be a non-empty list of {list(INPUT_KINDS)}"
            )
        object.__setattr__(self, "inputs", inputs)
        for key, lo, hi in (
            ("base_channels", 1, 512),
            ("depth", 1, 8),
            ("max_channels", 1, 2048),
            ("context_blocks", 0, 4),
        ):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ModelError(f"config: {key}={value!r} must be an integer in [{lo}, {hi}]")
        if self.max_channels < self.base_channels:
            raise ModelError("config: max_channels must be >= base_channels")
        if self.norm not in NORMS:
            raise ModelError(f"config: norm={self.norm!r} is not one of {list(NORMS)}")
        if self.norm == "group" and self.base_channels % 4:
            raise ModelError("config: norm='group' needs base_channels divisible by 4")
        if self.activation not in ACTIVATIONS:
            raise ModelError(
                f"config: activation={self.activation!r} is not one of {list(ACTIVATIONS)}"
            )
        if not isinstance(self.heads, Mapping) or not self.heads:
            raise ModelError("config: heads must map object classes to lists of maps")
        heads: dict[str, tuple[str, ...]] = {}
        for cls_name, maps in self.heads.items():
            if cls_name not in HEAD_MAPS:
                raise ModelError(f"config: head {cls_name!r} is not one of {list(HEAD_MAPS)}")
            maps = (maps,) if isinstance(maps, str) else tuple(maps)
            if (
                "foreground" not in maps
                or any(m not in HEAD_MAPS[cls_name] for m in maps)
                or len(set(maps)) != len(maps)
            ):
                raise ModelError(
                    f"config: head {cls_name!r} maps {list(maps)} must include 'foreground' and be "
                    f"distinct items of {list(HEAD_MAPS[cls_name])}"
                )
            heads[cls_name] = maps
        if "nuclei" not in heads:
            raise ModelError("config: a model needs a 'nuclei' head")
        object.__setattr__(self, "heads", heads)
        if not isinstance(self.distance_cap_px, Mapping):
            raise ModelError("config: distance_cap_px must map object classes to a number or null")
        caps: dict[str, float | None] = {}
        for cls_name in heads:
            cap = self.distance_cap_px.get(cls_name)
            if cap is not None:
                if (
                    isinstance(cap, bool)
                    or not isinstance(cap, int | float)
                    or not (math.isfinite(cap) and cap > 0)
                ):
                    raise ModelError(
                        f"config: distance_cap_px[{cls_name!r}]={cap!r} must be positive or null"
                    )
                cap = float(cap)
            caps[cls_name] = cap
        extra = sorted(set(self.distance_cap_px) - set(heads))
        if extra:
            raise ModelError(f"config: distance_cap_px names classes {extra} without a head")
        object.__setattr__(self, "distance_cap_px", caps)
        try:
            lo, hi = (float(v) for v in self.percentiles)
        except (TypeError, ValueError) as exc:
            raise ModelError("config: percentiles must be two numbers, e.g. [1, 99.8]") from exc
        if not 0.0 <= lo < hi <= 100.0:
            raise ModelError(
                f"config: percentiles {self.percentiles} must satisfy 0 <= low < high <= 100"
            )
        object.__setattr__(self, "percentiles", (lo, hi))
        for key in ("pixel_size_um", "typical_nucleus_diameter_um"):
            value = getattr(self, key)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not (math.isfinite(value) and value > 0)
            ):
                raise ModelError(f"config: {key}={value!r} must be a positive number")
            object.__setattr__(self, key, float(value))
        if self.cluster_split not in ("distance", "shape", "combined"):
            raise ModelError(
                f"config: cluster_split={self.cluster_split!r} is not 'distance', 'shape' or "
                "'combined'"
            )
        if isinstance(self.thresholds, Mapping):
            object.__setattr__(
                self, "thresholds", Thresholds.from_dict(self.thresholds, where="config")
            )
        elif not isinstance(self.thresholds, Thresholds):
            raise ModelError("config: thresholds must be a JSON object")

    # -- derived ---------------------------------------------------------------------------------
    @property
    def in_channels(self) -> int:
        return len(self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        """Names of the output channels in order: ``"<class>_<map>"``."""
        return tuple(f"{c}_{m}" for c, maps in self.heads.items() for m in maps)

    @property
    def out_channels(self) -> int:
        return len(self.output_names)

    @property
    def channels(self) -> tuple[int, ...]:
        """Feature channels per resolution level, e.g. ``(16, 32, 64, 128)``."""
        return tuple(min(self.base_channels * 2**i, self.max_channels) for i in range(self.depth))

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this (inference pads)."""
        return 2 ** (self.depth - 1)

    def replace(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)

    # -- JSON ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (lists for tuples), with ``format_version``."""
        return {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "inputs": list(self.inputs),
            "base_channels": self.base_channels,
            "depth": self.depth,
            "max_channels": self.max_channels,
            "context_blocks": self.context_blocks,
            "norm": self.norm,
            "activation": self.activation,
            "heads": {k: list(v) for k, v in self.heads.items()},
            "distance_cap_px": dict(self.distance_cap_px),
            "percentiles": list(self.percentiles),
            "pixel_size_um": self.pixel_size_um,
            "typical_nucleus_diameter_um": self.typical_nucleus_diameter_um,
            "thresholds": self.thresholds.to_dict(),
            "cluster_split": self.cluster_split,
            "description": self.description,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str | None = None) -> ModelConfig:
        """Rebuild from :meth:`to_dict` output. Unknown keys and bad values raise ModelError."""
        if not isinstance(d, Mapping):
            raise ModelError(f"{_where(where)}config must be a JSON object")
        d = dict(d)
        version = d.pop("format_version", FORMAT_VERSION)
        d.pop("checksums", None)
        if version != FORMAT_VERSION:
            raise ModelError(
                f"{_where(where)}format_version {version!r} is not supported (this version reads "
                f"{FORMAT_VERSION}); update islet-imaging"
            )
        _reject_unknown_keys(d, cls, "config", where)
        try:
            if "thresholds" in d:
                d["thresholds"] = Thresholds.from_dict(d["thresholds"])
            return cls(**d)
        except ModelError as exc:
            raise ModelError(f"{_where(where)}{exc}") from exc
        except (TypeError, ValueError) as exc:
            raise ModelError(f"{_where(where)}invalid config: {exc}") from exc
