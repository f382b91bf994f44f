"""Stage profiles: what each differentiation stage looks like and what it is judged by.

A :class:`StageProfile` names a stage's markers (with their compartment), the nuclear stain, what a
"cluster" is at that stage, the sizes that are plausible there, the double-positive populations that
matter and the QC targets a good differentiation reaches. Built-in profiles cover every stage from iPSC
to SC-islet; users add or override profiles with a TOML file (see :func:`load_stages`).

Examples
--------
>>> from islet_imaging.stages import get_stage
>>> p = get_stage("S6")
>>> p.name, [m.name for m in p.markers]
('sc-islet', ['INS', 'NKX6.1', 'GCG'])
>>> p.marker("C-peptide").name
'INS'
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

from islet_imaging.errors import StageError

__all__ = [
    "BUILTIN_STAGES",
    "Marker",
    "QCTarget",
    "StageProfile",
    "StageRegistry",
    "get_stage",
    "list_stages",
    "load_stages",
]

Compartment = Literal["nuclear", "cytoplasmic"]
ClusterKind = Literal["colony", "monolayer-patch", "aggregate"]
ClusterInput = Literal["nuclear", "sum"]

COMPARTMENTS: tuple[str, ...] = ("nuclear", "cytoplasmic")
CLUSTER_KINDS: tuple[str, ...] = ("colony", "monolayer-patch", "aggregate")
CLUSTER_INPUTS: tuple[str, ...] = ("nuclear", "sum")

#: Names under which the nuclear stain is found in files, matched case-insensitively.
NUCLEAR_STAIN_ALIASES: tuple[str, ...] = (
    "DAPI",
    "Hoechst",
    "Hoechst33342",
    "DNA",
    "nuclei",
    "DRAQ5",
)


def _norm(name: str) -> str:
    """Normalise a channel or stage name for matching: case, spaces, '-', '_' and '.' ignored."""
    return "".join(ch for ch in str(name).casefold() if ch.isalnum())


@dataclass(frozen=True)
class Marker:
    """A stained marker.

    Parameters
    ----------
    name : str
        Canonical channel name, e.g. ``"INS"``; tables use it (``fraction_positive_INS``).
    compartment : {"nuclear", "cytoplasmic"}
        Where the marker is measured: inside the nucleus, or in a cytoplasm region around it.
    aliases : tuple of str
        Other channel names that mean this marker (``"C-peptide"`` for ``"INS"``).
    description : str
        What the marker shows at this stage.
    """

    name: str
    compartment: Compartment
    aliases: tuple[str, ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        if not str(self.name).strip():
            raise StageError("a marker needs a non-empty name")
        if self.compartment not in COMPARTMENTS:
            raise StageError(
                f"marker {self.name!r}: compartment {self.compartment!r} is not one of {COMPARTMENTS}"
            )
        object.__setattr__(self, "aliases", tuple(str(a) for a in self.aliases))

    def matches(self, channel_name: str) -> bool:
        """True if ``channel_name`` is this marker's name or one of its aliases."""
        key = _norm(channel_name)
        return key == _norm(self.name) or any(key == _norm(a) for a in self.aliases)


@dataclass(frozen=True)
class QCTarget:
    """A target fraction of cells positive for one marker, or for a combination (``"PDX1+NKX6.1"``).

    A well passes when ``minimum <= fraction <= maximum`` (either bound may be absent).
    """

    population: str
    minimum: float | None = None
    maximum: float | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if self.minimum is None and self.maximum is None:
            raise StageError(f"QC target {self.population!r} needs a minimum or a maximum")
        for bound in (self.minimum, self.maximum):
            if bound is not None and not (0.0 <= float(bound) <= 1.0):
                raise StageError(
                    f"QC target {self.population!r}: bound {bound} is not a fraction in [0, 1]"
                )
        if self.minimum is not None and self.maximum is not None and self.minimum > self.maximum:
            raise StageError(f"QC target {self.population!r}: minimum > maximum")

    @property
    def markers(self) -> tuple[str, ...]:
        """The marker names the population combines: ``"PDX1+NKX6.1"`` → ``("PDX1", "NKX6.1")``."""
        return tuple(m for m in self.population.split("+") if m)

    def passes(self, fraction: float) -> bool | None:
        """Whether ``fraction`` meets the target; ``None`` when the fraction is NaN."""
        if fraction is None or math.isnan(fraction):
            return None
        if self.minimum is not None and fraction < self.minimum:
            return False
        return not (self.maximum is not None and fraction > self.maximum)

    def describe(self) -> str:
        lo = f"≥ {self.minimum:.0%}" if self.minimum is not None else ""
        hi = f"≤ {self.maximum:.0%}" if self.maximum is not None else ""
        if lo and hi:
            return f"{self.population}+ {self.minimum:.0%}–{self.maximum:.0%}"
        return f"{self.population}+ {lo or hi}"


@dataclass(frozen=True)
class StageProfile:
    """One differentiation stage.

    Parameters
    ----------
    name : str
        Canonical name, e.g. ``"pancreatic-progenitor"``.
    aliases : tuple of str
        Short names (``"S4"``, ``"PP"``), matched case-insensitively.
    order : int
        Position in the differentiation (0 = iPSC).
    markers : tuple of Marker
        Stage markers, in their usual channel order after the nuclear stain.
    cluster_kind : {"colony", "monolayer-patch", "aggregate"}
        What counts as a cluster at this stage.
    cluster_input : {"nuclear", "sum"}
        Which image outlines clusters for segmentation: the nuclear stain alone, or the sum of
        all channels (cytoplasmic markers fill aggregates between nuclei).
    nuclear_stain : str
        Canonical name of the nuclear channel.
    nucleus_diameter_um : (float, float)
        Plausible range of nucleus equivalent diameters in µm; objects outside are filtered.
    min_cluster_diameter_um : float
        Smallest object counted as a cluster (smaller ones are single cells or debris).
    double_positives : tuple of str
        Populations positive for several markers, written ``"INS+NKX6.1"``.
    qc_targets : tuple of QCTarget
        Targets a good differentiation meets at this stage.
    description : str
        One line on the stage.
    """

    name: str
    aliases: tuple[str, ...]
    order: int
    markers: tuple[Marker, ...]
    cluster_kind: ClusterKind
    cluster_input: ClusterInput = "nuclear"
    nuclear_stain: str = "DAPI"
    nucleus_diameter_um: tuple[float, float] = (5.0, 18.0)
    min_cluster_diameter_um: float = 20.0
    double_positives: tuple[str, ...] = ()
    qc_targets: tuple[QCTarget, ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        where = f"stage {self.name!r}: "
        if not _norm(self.name):
            raise StageError("a stage profile needs a non-empty name")
        if self.cluster_kind not in CLUSTER_KINDS:
            raise StageError(
                f"{where}cluster_kind {self.cluster_kind!r} is not one of {CLUSTER_KINDS}"
            )
        if self.cluster_input not in CLUSTER_INPUTS:
            raise StageError(
                f"{where}cluster_input {self.cluster_input!r} is not one of {CLUSTER_INPUTS}"
            )
        object.__setattr__(self, "aliases", tuple(str(a) for a in self.aliases))
        object.__setattr__(self, "markers", tuple(self.markers))
        object.__setattr__(self, "double_positives", tuple(self.double_positives))
        object.__setattr__(self, "qc_targets", tuple(self.qc_targets))
        names = [_norm(m.name) for m in self.markers]
        if len(set(names)) != len(names):
            raise StageError(f"{where}marker names {[m.name for m in self.markers]} repeat")
        lo, hi = (float(v) for v in self.nucleus_diameter_um)
        if not (0 < lo < hi):
            raise StageError(
                f"{where}nucleus_diameter_um {self.nucleus_diameter_um} must be 0 < min < max"
            )
        object.__setattr__(self, "nucleus_diameter_um", (lo, hi))
        if not float(self.min_cluster_diameter_um) > 0:
            raise StageError(f"{where}min_cluster_diameter_um must be positive")
        known = {_norm(m.name) for m in self.markers}
        for pop in (*self.double_positives, *(t.population for t in self.qc_targets)):
            for m in pop.split("+"):
                if m and _norm(m) not in known:
                    raise StageError(
                        f"{where}population {pop!r} names marker {m!r}, which is not one of "
                        f"this stage's markers {[mk.name for mk in self.markers]}"
                    )

    @property
    def marker_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.markers)

    @property
    def short_name(self) -> str:
        """The first alias (``"S4"``), or the name."""
        return self.aliases[0] if self.aliases else self.name

    def marker(self, name: str) -> Marker:
        """The marker called ``name`` or one of its aliases."""
        for m in self.markers:
            if m.matches(name):
                return m
        raise StageError(
            f"marker {name!r} is not part of stage {self.name!r}; its markers are {list(self.marker_names)}"
        )

    def is_nuclear_stain(self, channel_name: str) -> bool:
        key = _norm(channel_name)
        return key == _norm(self.nuclear_stain) or key in {_norm(a) for a in NUCLEAR_STAIN_ALIASES}

    def match_channels(self, channel_names: Sequence[str]) -> dict[str, int]:
        """Map the nuclear stain and each marker present to its channel index.

        Returns a dict ``{canonical name: index}``; the nuclear stain is under ``"nuclear"``.
        Markers whose channel is absent are left out; callers decide whether that is an error.
        """
        out: dict[str, int] = {}
        for i, ch in enumerate(channel_names):
            if "nuclear" not in out and self.is_nuclear_stain(ch):
                out["nuclear"] = i
                continue
            for m in self.markers:
                if m.name not in out and m.matches(ch):
                    out[m.name] = i
                    break
        return out


def _m(name: str, compartment: Compartment, *aliases: str, description: str = "") -> Marker:
    return Marker(name, compartment, tuple(aliases), description)


BUILTIN_STAGES: tuple[StageProfile, ...] = (
    StageProfile(
        name="ipsc",
        aliases=("S0", "iPSC", "pluripotent"),
        order=0,
        markers=(
            _m("OCT4", "nuclear", "POU5F1", "OCT3/4", description="pluripotency"),
            _m("SOX2", "nuclear", description="pluripotency"),
            _m("NANOG", "nuclear", description="pluripotency"),
        ),
        cluster_kind="colony",
        nucleus_diameter_um=(5.0, 16.0),
        min_cluster_diameter_um=50.0,
        double_positives=("OCT4+SOX2",),
        qc_targets=(QCTarget("OCT4", minimum=0.90, description="undifferentiated culture"),),
        description="Induced pluripotent stem cells growing as compact colonies.",
    ),
    StageProfile(
        name="definitive-endoderm",
        aliases=("S1", "DE"),
        order=1,
        markers=(
            _m("SOX17", "nuclear", description="definitive endoderm"),
            _m("FOXA2", "nuclear", "HNF3B", description="endoderm"),
        ),
        cluster_kind="monolayer-patch",
        nucleus_diameter_um=(5.0, 16.0),
        min_cluster_diameter_um=30.0,
        double_positives=("SOX17+FOXA2",),
        qc_targets=(
            QCTarget("SOX17", minimum=0.80, description="efficient endoderm induction"),
            QCTarget("FOXA2", minimum=0.80),
        ),
        description="Definitive endoderm: a dense monolayer, SOX17+ FOXA2+.",
    ),
    StageProfile(
        name="endoderm-stem-cell",
        aliases=("eESC", "DE-SC", "EnSC"),
        order=1,
        markers=(
            _m("SOX17", "nuclear", description="endoderm identity"),
            _m("FOXA2", "nuclear", "HNF3B", description="endoderm identity"),
            _m("CXCR4", "cytoplasmic", "CD184", description="endoderm surface marker"),
        ),
        cluster_kind="colony",
        nucleus_diameter_um=(5.0, 16.0),
        min_cluster_diameter_um=40.0,
        double_positives=("SOX17+FOXA2",),
        qc_targets=(QCTarget("SOX17", minimum=0.80, description="endoderm identity kept"),),
        description="Expandable endoderm stem cells, passaged as colonies.",
    ),
    StageProfile(
        name="primitive-gut-tube",
        aliases=("S2", "PGT", "gut-tube"),
        order=2,
        markers=(
            _m("FOXA2", "nuclear", "HNF3B", description="endoderm"),
            _m("HNF1B", "nuclear", description="primitive gut tube"),
            _m("HNF4A", "nuclear", description="primitive gut tube"),
        ),
        cluster_kind="monolayer-patch",
        nucleus_diameter_um=(5.0, 16.0),
        min_cluster_diameter_um=30.0,
        double_positives=("FOXA2+HNF1B",),
        qc_targets=(QCTarget("HNF1B", minimum=0.70),),
        description="Primitive gut tube: monolayer, FOXA2+ HNF1B+ HNF4A+.",
    ),
    StageProfile(
        name="posterior-foregut",
        aliases=("S3", "PFG"),
        order=3,
        markers=(
            _m("PDX1", "nuclear", description="pancreatic/duodenal specification"),
            _m("FOXA2", "nuclear", "HNF3B", description="endoderm"),
            _m("SOX2", "nuclear", description="anterior (off-target) foregut"),
        ),
        cluster_kind="monolayer-patch",
        nucleus_diameter_um=(5.0, 16.0),
        min_cluster_diameter_um=30.0,
        double_positives=("PDX1+FOXA2",),
        qc_targets=(
            QCTarget("PDX1", minimum=0.60, description="posterior foregut specification"),
            QCTarget("SOX2", maximum=0.20, description="little anterior foregut"),
        ),
        description="Posterior foregut: PDX1 switches on.",
    ),
    StageProfile(
        name="pancreatic-progenitor",
        aliases=("S4", "PP"),
        order=4,
        markers=(
            _m("PDX1", "nuclear", description="pancreatic progenitor"),
            _m(
                "NKX6.1", "nuclear", "NKX6-1", "NKX61", description="beta-cell competent progenitor"
            ),
            _m("SOX9", "nuclear", description="multipotent progenitor"),
        ),
        cluster_kind="aggregate",
        nucleus_diameter_um=(4.5, 15.0),
        min_cluster_diameter_um=25.0,
        double_positives=("PDX1+NKX6.1",),
        qc_targets=(
            QCTarget("PDX1+NKX6.1", minimum=0.50, description="beta-cell competent progenitors"),
            QCTarget("PDX1", minimum=0.80),
        ),
        description="Pancreatic progenitors: PDX1+ NKX6.1+ clusters.",
    ),
    StageProfile(
        name="endocrine-progenitor",
        aliases=("S5", "EP"),
        order=5,
        markers=(
            _m("NKX2.2", "nuclear", "NKX2-2", "NKX22", description="endocrine progenitor"),
            _m("NEUROD1", "nuclear", description="endocrine commitment"),
            _m("NKX6.1", "nuclear", "NKX6-1", "NKX61", description="beta lineage"),
            _m("CHGA", "cytoplasmic", "chromogranin A", description="endocrine granules"),
        ),
        cluster_kind="aggregate",
        cluster_input="sum",
        nucleus_diameter_um=(4.5, 14.0),
        min_cluster_diameter_um=25.0,
        double_positives=("NKX2.2+NKX6.1", "NEUROD1+NKX6.1"),
        qc_targets=(
            QCTarget("NKX2.2", minimum=0.40, description="endocrine induction"),
            QCTarget("NKX2.2+NKX6.1", minimum=0.25),
        ),
        description="Endocrine progenitors: NKX2.2+ NEUROD1+ aggregates.",
    ),
    StageProfile(
        name="sc-islet",
        aliases=("S6", "SC-islet", "islet"),
        order=6,
        markers=(
            _m("INS", "cytoplasmic", "C-peptide", "CPEP", "insulin", description="beta cells"),
            _m("NKX6.1", "nuclear", "NKX6-1", "NKX61", description="beta-cell identity"),
            _m("GCG", "cytoplasmic", "glucagon", description="alpha cells / polyhormonal"),
        ),
        cluster_kind="aggregate",
        cluster_input="sum",
        nucleus_diameter_um=(4.0, 14.0),
        min_cluster_diameter_um=25.0,
        double_positives=("INS+NKX6.1", "INS+GCG"),
        qc_targets=(
            QCTarget("INS", minimum=0.30, maximum=0.60, description="C-peptide+ beta-like cells"),
            QCTarget("INS+NKX6.1", minimum=0.20, description="mature-like beta cells"),
            QCTarget("GCG", maximum=0.25, description="few alpha / polyhormonal cells"),
        ),
        description="SC-islets: 3D aggregates of INS+ NKX6.1+ beta-like cells and GCG+ alpha-like cells.",
    ),
)


@dataclass(frozen=True)
class StageRegistry:
    """A set of stage profiles looked up by name or alias (case-, space- and dash-insensitive)."""

    profiles: tuple[StageProfile, ...] = BUILTIN_STAGES

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for p in self.profiles:
            for key in (p.name, *p.aliases):
                k = _norm(key)
                if k in seen and seen[k] != p.name:
                    raise StageError(
                        f"stage name or alias {key!r} is used by both {seen[k]!r} and {p.name!r}"
                    )
                seen[k] = p.name

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.profiles)

    def get(self, name: str | StageProfile) -> StageProfile:
        """The profile called ``name`` or with that alias.

        Raises
        ------
        StageError
            For an unknown name; the message lists the known stages and their aliases.
        """
        if isinstance(name, StageProfile):
            return name
        key = _norm(name)
        for p in self.profiles:
            if key == _norm(p.name) or any(key == _norm(a) for a in p.aliases):
                return p
        known = ", ".join(f"{p.name} ({'/'.join(p.aliases)})" for p in self.profiles)
        raise StageError(
            f"unknown stage {name!r}; known stages: {known}. Add your own with a TOML file (--stages)"
        )

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.profiles)

    def __len__(self) -> int:
        return len(self.profiles)


def _marker_from_toml(d: Any, where: str) -> Marker:
    if not isinstance(d, Mapping) or "name" not in d or "compartment" not in d:
        raise StageError(
            f"{where}: each marker needs 'name' and 'compartment' (nuclear or cytoplasmic)"
        )
    return Marker(
        str(d["name"]), d["compartment"], tuple(d.get("aliases", ())), str(d.get("description", ""))
    )


def _qc_from_toml(d: Any, where: str) -> QCTarget:
    if not isinstance(d, Mapping) or "population" not in d:
        raise StageError(f"{where}: each qc target needs 'population' and 'min' and/or 'max'")
    return QCTarget(str(d["population"]), d.get("min"), d.get("max"), str(d.get("description", "")))


_TOML_KEYS = {f.name for f in fields(StageProfile)} | {"qc"}


def _profile_from_toml(
    name: str, table: Mapping[str, Any], base: StageProfile | None, where: str
) -> StageProfile:
    unknown = set(table) - _TOML_KEYS - {"extends"}
    if unknown:
        raise StageError(
            f"{where}: unknown keys {sorted(unknown)} in stage {name!r}; allowed: {sorted(_TOML_KEYS)}"
        )
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key == "markers":
            values["markers"] = tuple(
                _marker_from_toml(m, f"{where} stage {name!r}") for m in value
            )
        elif key == "qc":
            values["qc_targets"] = tuple(_qc_from_toml(q, f"{where} stage {name!r}") for q in value)
        elif key in ("aliases", "double_positives", "nucleus_diameter_um"):
            values[key] = tuple(value)
        elif key != "extends":
            values[key] = value
    if base is not None:
        return (
            replace(base, **{"name": name, **values})
            if base.name != name
            else replace(base, **values)
        )
    missing = {"markers", "cluster_kind"} - set(values)
    if missing:
        raise StageError(
            f"{where}: new stage {name!r} needs {sorted(missing)} (or 'extends' = a known stage)"
        )
    values.setdefault("aliases", ())
    values.setdefault("order", 99)
    return StageProfile(name=name, **values)


def load_stages(
    path: str | Path | None = None, *, base: StageRegistry | None = None
) -> StageRegistry:
    """Built-in stage profiles, plus those of a user's TOML file.

    A table ``[stages.<name>]`` whose name (or alias) is a known stage overrides the keys it gives;
    a new name adds a stage (it needs ``markers`` and ``cluster_kind``, or ``extends = "<stage>"``
    to start from another). Example::

        [stages.sc-islet]
        qc = [{population = "INS", min = 0.4, max = 0.7}]

        [stages.my-beta]
        extends = "sc-islet"
        aliases = ["S7"]
        markers = [{name = "INS", compartment = "cytoplasmic"},
                   {name = "MAFA", compartment = "nuclear"}]
        double_positives = ["INS+MAFA"]
        qc = [{population = "INS+MAFA", min = 0.1}]
    """
    registry = base if base is not None else StageRegistry()
    if path is None:
        return registry
    path = Path(path)
    if not path.is_file():
        raise StageError("stage profile file not found; give the path of a TOML file", path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise StageError(f"not a valid TOML file ({exc}); check its syntax", path) from exc
    tables = doc.get("stages")
    if not isinstance(tables, Mapping) or not tables:
        raise StageError("no [stages.<name>] tables found; see `islet-imaging stages --help`", path)
    profiles = list(registry.profiles)
    where = str(path)
    for name, table in tables.items():
        if not isinstance(table, Mapping):
            raise StageError(f"[stages.{name}] must be a table", path)
        try:
            existing = registry.get(name)
        except StageError:
            existing = None
        try:
            if existing is not None:
                new = _profile_from_toml(existing.name, table, existing, where)
                profiles[profiles.index(existing)] = new
            else:
                parent = registry.get(table["extends"]) if "extends" in table else None
                if parent is not None:
                    table = {"aliases": (), **table}
                new = _profile_from_toml(str(name), table, parent, where)
                profiles.append(new)
        except StageError as exc:
            raise StageError(exc.reason, path) from exc
        except (TypeError, ValueError) as exc:
            raise StageError(f"stage {name!r}: {exc}", path) from exc
    return StageRegistry(tuple(profiles))


_DEFAULT = StageRegistry()


def get_stage(name: str | StageProfile, *, stages_file: str | Path | None = None) -> StageProfile:
    """Look up a stage profile by name or alias among the built-ins (and a TOML file's)."""
    registry = _DEFAULT if stages_file is None else load_stages(stages_file)
    return registry.get(name)


def list_stages(stages_file: str | Path | None = None) -> tuple[StageProfile, ...]:
    """All known stage profiles in differentiation order."""
    registry = _DEFAULT if stages_file is None else load_stages(stages_file)
    return tuple(sorted(registry.profiles, key=lambda p: p.order))


def iter_populations(profile: StageProfile) -> Iterable[str]:
    """Each single marker, then each double-positive population of a stage."""
    yield from profile.marker_names
    yield from profile.double_positives
