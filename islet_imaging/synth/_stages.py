"""How each differentiation stage looks: layout, cell sizes, packing and marker populations.

A :class:`StageLook` holds the appearance parameters of one stage as ranges; the generator draws one
value per field from each range, so every field is different but every field is plausible for its
stage. Positivity is modelled as a mixture of cell types (each a set of positive markers), which
keeps co-expression realistic (NKX6.1 mostly in INS+ cells, SOX2 mostly in PDX1- cells, ...).

Sizes are in µm, so fields at any pixel size show the same biology.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

from islet_imaging.errors import StageError
from islet_imaging.stages import StageProfile

__all__ = ["LOOKS", "CellType", "StageLook", "look_for"]

Layout = Literal["colony", "sheet", "aggregate"]
Range = tuple[float, float]


@dataclass(frozen=True)
class CellType:
    """A population of cells positive for exactly ``markers``.

    Parameters
    ----------
    name : str
        Short name written to the truth table (``"beta"``, ``"alpha"``, ``"negative"``).
    fraction : float
        Expected fraction of cells of this type (fractions of a stage are normalised to sum to 1).
    markers : tuple of str
        Canonical names of the markers these cells express.
    """

    name: str
    fraction: float
    markers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.fraction >= 0:
            raise StageError(f"cell type {self.name!r}: fraction must be >= 0")
        object.__setattr__(self, "markers", tuple(self.markers))


@dataclass(frozen=True)
class StageLook:
    """Appearance of one stage; every range is sampled uniformly once per field.

    Parameters
    ----------
    layout : {"colony", "sheet", "aggregate"}
        Compact flat colonies, near-confluent monolayer patches with gaps, or dense aggregates
        (3D blobs in a z-stack).
    nucleus_diameter_um : (float, float)
        Range of the field's mean nucleus diameter; cells vary around it by ``nucleus_cv``.
    nucleus_cv : float
        Coefficient of variation of nucleus diameter between cells.
    jitter : float
        Standard deviation of nucleus positions around their lattice sites, in spacings.
    doublet_fraction : float
        Fraction of cells that just divided: two touching, slightly smaller nuclei.
    spacing : (float, float)
        Centre-to-centre distance of neighbouring cells, in nucleus diameters (cell size over
        nucleus size: ~1.1 for the high nuclear-to-cytoplasm ratio of iPSCs, ~1.5 for spread cells).
    fill : (float, float)
        Fraction of lattice sites that hold a cell (the rest are gaps).
    cluster_diameter_um : (float, float)
        Range of cluster diameters (colonies and aggregates; sheets use ``coverage``).
    coverage : (float, float)
        Fraction of the field covered by clusters.
    touching : float
        Probability that a new cluster is placed against an existing one.
    cytoplasm_factor : float
        Cytoplasm reaches at most this many nuclear radii from the nucleus centre.
    isolated_per_mm2 : (float, float)
        Density of single cells outside clusters.
    debris_per_mm2 : (float, float)
        Density of bright non-cell specks in the nuclear channel.
    mitotic_fraction : float
        Fraction of cells with condensed, bright chromatin.
    haze : (float, float)
        Out-of-focus light around clusters, relative to their in-focus brightness (thick aggregates).
    cell_types : tuple of CellType
        Marker populations.
    edge_type : str or None
        A cell type that is enriched at cluster edges (differentiating cells at iPSC colony rims).
    edge_boost : float
        How much more likely ``edge_type`` is on the rim than in the centre.
    """

    layout: Layout
    nucleus_diameter_um: Range
    spacing: Range
    cell_types: tuple[CellType, ...]
    nucleus_cv: float = 0.12
    jitter: float = 0.14
    doublet_fraction: float = 0.04
    fill: Range = (0.92, 0.99)
    cluster_diameter_um: Range = (80.0, 250.0)
    coverage: Range = (0.25, 0.5)
    touching: float = 0.35
    cytoplasm_factor: float = 1.5
    isolated_per_mm2: Range = (20.0, 80.0)
    debris_per_mm2: Range = (60.0, 250.0)
    mitotic_fraction: float = 0.02
    haze: Range = (0.0, 0.0)
    edge_type: str | None = None
    edge_boost: float = 1.0

    def __post_init__(self) -> None:
        if self.layout not in ("colony", "sheet", "aggregate"):
            raise StageError(f"unknown layout {self.layout!r}")
        object.__setattr__(self, "cell_types", tuple(self.cell_types))
        if not self.cell_types or sum(t.fraction for t in self.cell_types) <= 0:
            raise StageError("a stage look needs cell types with positive fractions")
        for name in ("nucleus_diameter_um", "spacing", "fill", "cluster_diameter_um", "coverage"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise StageError(f"{name} {(lo, hi)} must satisfy 0 < low <= high")

    def marker_fraction(self, marker: str) -> float:
        """Expected fraction of cells positive for ``marker``."""
        total = sum(t.fraction for t in self.cell_types)
        return sum(t.fraction for t in self.cell_types if marker in t.markers) / total


def _t(name: str, fraction: float, *markers: str) -> CellType:
    return CellType(name, fraction, markers)


#: Built-in looks, keyed by canonical stage name.
LOOKS: Mapping[str, StageLook] = {
    "ipsc": StageLook(
        layout="colony",
        nucleus_diameter_um=(8.0, 10.0),
        spacing=(1.08, 1.2),
        fill=(0.96, 1.0),
        cluster_diameter_um=(110.0, 320.0),
        coverage=(0.3, 0.6),
        touching=0.3,
        cytoplasm_factor=1.3,
        isolated_per_mm2=(5.0, 30.0),
        mitotic_fraction=0.04,
        cell_types=(
            _t("pluripotent", 0.86, "OCT4", "SOX2", "NANOG"),
            _t("pluripotent-nanog-low", 0.07, "OCT4", "SOX2"),
            _t("neuroectoderm-like", 0.02, "SOX2"),
            _t("differentiating", 0.05),
        ),
        edge_type="differentiating",
        edge_boost=6.0,
    ),
    "definitive-endoderm": StageLook(
        layout="sheet",
        jitter=0.2,
        nucleus_diameter_um=(8.5, 10.5),
        spacing=(1.2, 1.45),
        fill=(0.88, 0.97),
        coverage=(0.6, 0.88),
        cytoplasm_factor=1.75,
        isolated_per_mm2=(20.0, 60.0),
        cell_types=(
            _t("endoderm", 0.70, "SOX17", "FOXA2", "CXCR4"),
            _t("cxcr4-low", 0.08, "SOX17", "FOXA2"),
            _t("sox17-only", 0.07, "SOX17"),
            _t("foxa2-only", 0.06, "FOXA2"),
            _t("negative", 0.09),
        ),
    ),
    "endoderm-stem-cell": StageLook(
        layout="colony",
        nucleus_diameter_um=(8.5, 10.5),
        spacing=(1.15, 1.3),
        fill=(0.92, 0.99),
        cluster_diameter_um=(70.0, 220.0),
        coverage=(0.25, 0.5),
        cytoplasm_factor=1.45,
        cell_types=(
            _t("endoderm-stem", 0.76, "SOX17", "FOXA2", "CXCR4"),
            _t("cxcr4-low", 0.10, "SOX17", "FOXA2"),
            _t("sox17-only", 0.05, "SOX17"),
            _t("negative", 0.09),
        ),
        edge_type="negative",
        edge_boost=2.0,
    ),
    "primitive-gut-tube": StageLook(
        layout="sheet",
        jitter=0.2,
        nucleus_diameter_um=(9.0, 11.0),
        spacing=(1.3, 1.6),
        fill=(0.85, 0.95),
        coverage=(0.55, 0.85),
        cytoplasm_factor=1.8,
        cell_types=(
            _t("gut-tube", 0.62, "FOXA2", "HNF1B", "HNF4A"),
            _t("hnf4a-low", 0.15, "FOXA2", "HNF1B"),
            _t("foxa2-only", 0.10, "FOXA2"),
            _t("hnf1b-low", 0.05, "FOXA2", "HNF4A"),
            _t("negative", 0.08),
        ),
    ),
    "posterior-foregut": StageLook(
        layout="sheet",
        jitter=0.2,
        nucleus_diameter_um=(8.5, 10.5),
        spacing=(1.25, 1.5),
        fill=(0.88, 0.97),
        coverage=(0.6, 0.88),
        cytoplasm_factor=1.7,
        cell_types=(
            _t("posterior-foregut", 0.64, "PDX1", "FOXA2"),
            _t("pdx1-only", 0.05, "PDX1"),
            _t("foxa2-only", 0.14, "FOXA2"),
            _t("anterior-foregut", 0.09, "FOXA2", "SOX2"),
            _t("sox2-only", 0.02, "SOX2"),
            _t("negative", 0.06),
        ),
    ),
    "pancreatic-progenitor": StageLook(
        layout="aggregate",
        nucleus_diameter_um=(7.5, 9.0),
        spacing=(1.22, 1.38),
        cluster_diameter_um=(40.0, 160.0),
        coverage=(0.25, 0.45),
        touching=0.5,
        cytoplasm_factor=2.1,
        haze=(0.05, 0.12),
        cell_types=(
            _t("progenitor-nkx61-sox9", 0.28, "PDX1", "NKX6.1", "SOX9"),
            _t("progenitor-nkx61", 0.27, "PDX1", "NKX6.1"),
            _t("progenitor-sox9", 0.20, "PDX1", "SOX9"),
            _t("pdx1-only", 0.12, "PDX1"),
            _t("sox9-only", 0.05, "SOX9"),
            _t("negative", 0.08),
        ),
    ),
    "endocrine-progenitor": StageLook(
        layout="aggregate",
        nucleus_diameter_um=(7.0, 8.5),
        spacing=(1.25, 1.4),
        cluster_diameter_um=(45.0, 200.0),
        coverage=(0.25, 0.45),
        touching=0.5,
        cytoplasm_factor=2.2,
        haze=(0.06, 0.14),
        cell_types=(
            _t("endocrine-nkx61", 0.22, "NKX2.2", "NEUROD1", "NKX6.1", "CHGA"),
            _t("endocrine", 0.15, "NKX2.2", "NEUROD1", "CHGA"),
            _t("nkx22-nkx61", 0.10, "NKX2.2", "NKX6.1"),
            _t("nkx22-only", 0.05, "NKX2.2"),
            _t("neurod1-chga", 0.05, "NEUROD1", "CHGA"),
            _t("progenitor-nkx61", 0.18, "NKX6.1"),
            _t("negative", 0.25),
        ),
    ),
    "sc-islet": StageLook(
        layout="aggregate",
        nucleus_diameter_um=(6.5, 7.8),
        spacing=(1.25, 1.4),
        fill=(0.93, 0.99),
        cluster_diameter_um=(50.0, 300.0),
        coverage=(0.25, 0.5),
        touching=0.5,
        cytoplasm_factor=2.2,
        haze=(0.08, 0.18),
        debris_per_mm2=(150.0, 400.0),
        cell_types=(
            _t("beta", 0.33, "INS", "NKX6.1"),
            _t("beta-nkx61-low", 0.09, "INS"),
            _t("alpha", 0.07, "GCG"),
            _t("polyhormonal", 0.03, "INS", "GCG"),
            _t("progenitor-nkx61", 0.10, "NKX6.1"),
            _t("negative", 0.38),
        ),
    ),
}


def look_for(profile: StageProfile) -> StageLook:
    """The look of a stage profile.

    A built-in stage gets its own look (markers a user's profile adds are expressed by the stage's
    main population). A user-defined stage inherits the look of the built-in stage with the same
    cluster kind, with half of the cells positive for all its markers, a few missing one marker,
    and the rest negative.
    """
    if profile.name in LOOKS:
        look = LOOKS[profile.name]
        known = {m for t in look.cell_types for m in t.markers}
        if known <= set(profile.marker_names):
            extra = tuple(m for m in profile.marker_names if m not in known)
            if not extra:
                return look
            # markers a (user-extended) profile adds: co-expressed by the main population
            main = max((t for t in look.cell_types if t.markers), key=lambda t: t.fraction)
            types = tuple(
                replace(t, markers=(*t.markers, *extra)) if t is main else t
                for t in look.cell_types
            )
            return replace(look, cell_types=types)
    base = {"colony": "ipsc", "monolayer-patch": "definitive-endoderm", "aggregate": "sc-islet"}[
        profile.cluster_kind
    ]
    template = LOOKS[base]
    # independent markers at 60 %: a mixture over all 2^k combinations would be large, so use
    # one "all positive" type, one type per single marker missing, and negatives.
    names = profile.marker_names
    types = [_t("all-positive", 0.5, *names)]
    for m in names:
        types.append(_t(f"{m}-negative", 0.1 / max(len(names), 1), *(n for n in names if n != m)))
    types.append(_t("negative", 0.4))
    return replace(template, cell_types=tuple(types), edge_type=None)
