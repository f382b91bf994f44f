"""Stage profiles: what each differentiation stage looks like and what it is judged by.

A :class:`StageProfile` names a stage's markers (with their compartment), the nuclear stain, what a
"cluster" is at that stage, the sizes that are plausible there, the double-positive populations that
matter and the QC targets a good differentiation reaches. Built-in profiles cover every stage from iPSC
to SC-islet; users add or override profiles with a TOML file (see :func:`load_stages`), and
``islet-imaging stages NAME --toml`` prints any profile as a TOML file to start from.

The QC targets are floors and ranges a *good* run reaches, taken from the protocols they cite
(Pagliuca 2014, Rezania 2014, Velazco-Cruz 2019, Hogrebe 2020, Balboa 2022; D'Amour 2005 for
definitive endoderm). Most published figures are flow cytometry; imaging counts on the same culture
can differ by several percent, so treat the bounds as flags for a look, not as release criteria.

Examples
--------
>>> from islet_imaging.stages import get_stage
>>> p = get_stage("S6")
>>> p.name, [m.name for m in p.markers]
('sc-islet', ['INS', 'NKX6.1', 'GCG'])
>>> p.marker("C-peptide").name
'INS'
>>> p.match_channels(["Hoechst", "C-peptide", "NKX6-1"])
{'nuclear': 0, 'INS': 1, 'NKX6.1': 2}
"""

from __future__ import annotations

import difflib
import json
import math
import numbers
import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from islet_imaging.errors import InputError, StageError

__all__ = [
    "BUILTIN_STAGES",
    "CLUSTER_INPUTS",
    "CLUSTER_KINDS",
    "COMPARTMENTS",
    "NUCLEAR_STAIN_ALIASES",
    "Marker",
    "QCTarget",
    "StageProfile",
    "StageRegistry",
    "get_stage",
    "iter_populations",
    "list_stages",
    "load_stages",
    "profile_to_toml",
]

Compartment = Literal["nuclear", "cytoplasmic"]
ClusterKind = Literal["colony", "monolayer-patch", "aggregate"]
ClusterInput = Literal["nuclear", "sum"]

COMPARTMENTS: tuple[str, ...] = ("nuclear", "cytoplasmic")
CLUSTER_KINDS: tuple[str, ...] = ("colony", "monolayer-patch", "aggregate")
CLUSTER_INPUTS: tuple[str, ...] = ("nuclear", "sum")

#: Names under which the nuclear stain is found in files, matched like stage names (case, spaces,
#: '-', '_' and '.' ignored).
NUCLEAR_STAIN_ALIASES: tuple[str, ...] = (
    "DAPI",
    "Hoechst",
    "Hoechst33342",
    "Hoechst33258",
    "NucBlue",
    "DNA",
    "nuclei",
    "nuclear",
    "DRAQ5",
    "TO-PRO-3",
)


def _norm(name: str) -> str:
    """Normalise a channel or stage name for matching: case, spaces, '-', '_' and '.' ignored."""
    return "".join(ch for ch in str(name).casefold() if ch.isalnum())


def _str_tuple(value: Any, what: str) -> tuple[str, ...]:
    """``value`` as a tuple of strings; a lone string or a non-list is an error, not split."""
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise StageError(f'{what} must be a list of strings, e.g. ["a", "b"]; got {value!r}')
    out = tuple(value)
    for v in out:
        if not isinstance(v, str):
            raise StageError(f"{what} must be a list of strings; {v!r} is not a string")
    return out


def _number(value: Any, what: str) -> float:
    """``value`` as a finite float; bools, strings and NaN are errors."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise StageError(f"{what} must be a number; got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise StageError(f"{what} must be a finite number; got {value!r}")
    return out


def _check_str(value: Any, what: str, *, empty_ok: bool = True) -> str:
    if not isinstance(value, str):
        raise StageError(f"{what} must be a string; got {value!r}")
    if not empty_ok and not value.strip():
        raise StageError(f"{what} must not be empty")
    return value


@dataclass(frozen=True)
class Marker:
    """A stained marker.

    Parameters
    ----------
    name : str
        Canonical channel name, e.g. ``"INS"``; tables use it (``fraction_positive_INS``).
        It may not contain ``"+"``, which joins markers into populations.
    compartment : {"nuclear", "cytoplasmic"}
        Where the marker is measured: inside the nucleus, or in a cytoplasm region around it
        (membrane markers such as CXCR4 are measured there too).
    aliases : tuple of str
        Other channel names that mean this marker (``"C-peptide"`` for ``"INS"``), matched
        case-insensitively ignoring spaces, ``-``, ``_`` and ``.``.
    description : str
        What the marker shows at this stage.
    """

    name: str
    compartment: Compartment
    aliases: tuple[str, ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        _check_str(self.name, "a marker name", empty_ok=False)
        if not _norm(self.name):
            raise StageError(f"marker name {self.name!r} needs at least one letter or digit")
        if "+" in self.name:
            raise StageError(
                f"marker name {self.name!r} contains '+', which joins markers into populations; "
                "rename the marker"
            )
        if self.compartment not in COMPARTMENTS:
            raise StageError(
                f"marker {self.name!r}: compartment {self.compartment!r} is not one of "
                f"{list(COMPARTMENTS)}; use 'nuclear' for transcription factors, 'cytoplasmic' "
                "for hormones, granule and membrane markers"
            )
        object.__setattr__(
            self, "aliases", _str_tuple(self.aliases, f"marker {self.name!r} aliases")
        )
        _check_str(self.description, f"marker {self.name!r} description")

    @property
    def match_keys(self) -> frozenset[str]:
        """Normalised name and aliases, as matched against channel names."""
        return frozenset(_norm(n) for n in (self.name, *self.aliases))

    def matches(self, channel_name: str) -> bool:
        """True if ``channel_name`` is this marker's name or one of its aliases."""
        return _norm(channel_name) in self.match_keys


@dataclass(frozen=True)
class QCTarget:
    """A target fraction of cells positive for one marker, or for a combination (``"PDX1+NKX6.1"``).

    A well passes when ``minimum <= fraction <= maximum`` (either bound may be absent; the bounds
    themselves pass).

    Parameters
    ----------
    population : str
        A marker name, or marker names joined by ``"+"`` for cells positive for all of them.
    minimum, maximum : float or None
        Bounds on the positive fraction, in [0, 1] (80 % is ``0.8``).
    description : str
        What meeting the target means.
    source : str
        Where the number comes from (publication or lab convention).
    """

    population: str
    minimum: float | None = None
    maximum: float | None = None
    description: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        _check_str(self.population, "a QC target population", empty_ok=False)
        parts = [m.strip() for m in self.population.split("+")]
        if not all(parts):
            raise StageError(
                f"QC target population {self.population!r} has an empty marker name; write "
                "markers joined by '+', e.g. 'PDX1+NKX6.1'"
            )
        object.__setattr__(self, "population", "+".join(parts))
        if self.minimum is None and self.maximum is None:
            raise StageError(f"QC target {self.population!r} needs a minimum or a maximum")
        for attr, word in (("minimum", "min"), ("maximum", "max")):
            bound = getattr(self, attr)
            if bound is None:
                continue
            value = _number(bound, f"QC target {self.population!r} {word}")
            if not 0.0 <= value <= 1.0:
                raise StageError(
                    f"QC target {self.population!r}: {word} = {bound} is not a fraction in [0, 1]; "
                    "write 80 % as 0.8"
                )
            object.__setattr__(self, attr, value)
        if self.minimum is not None and self.maximum is not None and self.minimum > self.maximum:
            raise StageError(
                f"QC target {self.population!r}: min {self.minimum} > max {self.maximum}; swap them"
            )
        _check_str(self.description, f"QC target {self.population!r} description")
        _check_str(self.source, f"QC target {self.population!r} source")

    @property
    def markers(self) -> tuple[str, ...]:
        """The marker names the population combines: ``"PDX1+NKX6.1"`` → ``("PDX1", "NKX6.1")``."""
        return tuple(self.population.split("+"))

    def passes(self, fraction: float | None) -> bool | None:
        """Whether ``fraction`` meets the target; ``None`` when it is missing or NaN."""
        if fraction is None:
            return None
        fraction = float(fraction)
        if math.isnan(fraction):
            return None
        if self.minimum is not None and fraction < self.minimum:
            return False
        return not (self.maximum is not None and fraction > self.maximum)

    def describe(self) -> str:
        """The target in words: ``"INS+ 30%–60%"``, ``"SOX17+ ≥ 80%"``."""
        if self.minimum is not None and self.maximum is not None:
            return f"{self.population}+ {self.minimum:.0%}–{self.maximum:.0%}"
        if self.minimum is not None:
            return f"{self.population}+ ≥ {self.minimum:.0%}"
        return f"{self.population}+ ≤ {self.maximum:.0%}"


@dataclass(frozen=True)
class StageProfile:
    """One differentiation stage.

    Parameters
    ----------
    name : str
        Canonical name, e.g. ``"pancreatic-progenitor"``.
    aliases : tuple of str
        Short names (``"S4"``, ``"PP"``), matched case-insensitively ignoring spaces, ``-``, ``_``
        and ``.``.
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

    Notes
    -----
    Marker names in ``double_positives`` and QC populations may be given by alias; they are
    stored under the markers' canonical names (``"C-peptide+NKX6-1"`` → ``"INS+NKX6.1"``).
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
        _check_str(self.name, "a stage name", empty_ok=False)
        if not _norm(self.name):
            raise StageError(f"stage name {self.name!r} needs at least one letter or digit")
        where = f"stage {self.name!r}: "
        try:
            self._validate()
        except StageError as exc:
            if exc.reason.startswith(where):
                raise
            raise StageError(where + exc.reason) from None

    def _validate(self) -> None:
        object.__setattr__(self, "aliases", _str_tuple(self.aliases, "aliases"))
        if isinstance(self.order, bool) or not isinstance(self.order, int):
            raise StageError(f"order must be an integer (0 = iPSC); got {self.order!r}")
        if self.cluster_kind not in CLUSTER_KINDS:
            raise StageError(
                f"cluster_kind {self.cluster_kind!r} is not one of {list(CLUSTER_KINDS)}"
            )
        if self.cluster_input not in CLUSTER_INPUTS:
            raise StageError(
                f"cluster_input {self.cluster_input!r} is not one of {list(CLUSTER_INPUTS)}"
            )
        _check_str(self.nuclear_stain, "nuclear_stain", empty_ok=False)
        _check_str(self.description, "description")

        if isinstance(self.markers, Marker | str | Mapping) or not isinstance(
            self.markers, Iterable
        ):
            raise StageError("markers must be a list of markers")
        markers = tuple(self.markers)
        for m in markers:
            if not isinstance(m, Marker):
                raise StageError(f"markers must be Marker objects; got {m!r}")
        object.__setattr__(self, "markers", markers)
        stain_keys = {_norm(self.nuclear_stain)} | {_norm(a) for a in NUCLEAR_STAIN_ALIASES}
        owner: dict[str, str] = {}
        for m in markers:
            for key in m.match_keys:
                if key in stain_keys:
                    raise StageError(
                        f"marker {m.name!r} (or one of its aliases) is also a nuclear stain name; "
                        "rename it"
                    )
                if key in owner and owner[key] != m.name:
                    raise StageError(
                        f"markers {owner[key]!r} and {m.name!r} share the name or alias {key!r}; "
                        "give each marker its own names"
                    )
                owner[key] = m.name

        lohi = self.nucleus_diameter_um
        if isinstance(lohi, str) or not isinstance(lohi, Sequence) or len(lohi) != 2:
            raise StageError(
                f"nucleus_diameter_um must be [min, max] in µm; got {self.nucleus_diameter_um!r}"
            )
        lo = _number(lohi[0], "nucleus_diameter_um min")
        hi = _number(lohi[1], "nucleus_diameter_um max")
        if not 0 < lo < hi:
            raise StageError(f"nucleus_diameter_um {list(lohi)} must be 0 < min < max (µm)")
        object.__setattr__(self, "nucleus_diameter_um", (lo, hi))
        d = _number(self.min_cluster_diameter_um, "min_cluster_diameter_um")
        if d <= 0:
            raise StageError(f"min_cluster_diameter_um must be positive (µm); got {d}")
        object.__setattr__(self, "min_cluster_diameter_um", d)

        doubles = tuple(
            self._canonical_population(p, "double_positives")
            for p in _str_tuple(self.double_positives, "double_positives")
        )
        for p in doubles:
            if "+" not in p:
                raise StageError(
                    f"double_positives entry {p!r} names a single marker; write populations "
                    "of several markers joined by '+', e.g. 'INS+NKX6.1'"
                )
        if len(set(doubles)) != len(doubles):
            raise StageError(f"double_positives {list(doubles)} repeat a population")
        object.__setattr__(self, "double_positives", doubles)

        if isinstance(self.qc_targets, QCTarget) or not isinstance(self.qc_targets, Iterable):
            raise StageError("qc_targets must be a list of QC targets")
        targets = []
        for t in self.qc_targets:
            if not isinstance(t, QCTarget):
                raise StageError(f"qc_targets must be QCTarget objects; got {t!r}")
            pop = self._canonical_population(t.population, "QC target")
            targets.append(t if pop == t.population else replace(t, population=pop))
        pops = [t.population for t in targets]
        if len(set(pops)) != len(pops):
            raise StageError(
                f"QC targets {pops} repeat a population; give min and max in one target"
            )
        object.__setattr__(self, "qc_targets", tuple(targets))

    def _canonical_population(self, population: str, what: str) -> str:
        parts = [m.strip() for m in population.split("+")]
        if not all(parts):
            raise StageError(f"{what} population {population!r} has an empty marker name")
        names = []
        for part in parts:
            found = [m.name for m in self.markers if m.matches(part)]
            if not found:
                raise StageError(
                    f"{what} population {population!r} names marker {part!r}, which is not one "
                    f"of this stage's markers {list(self.marker_names)}; add the marker or fix "
                    "the population"
                )
            names.append(found[0])
        if len(set(names)) != len(names):
            raise StageError(f"{what} population {population!r} names a marker twice")
        return "+".join(names)

    @property
    def marker_names(self) -> tuple[str, ...]:
        """Canonical names of the markers, in channel order."""
        return tuple(m.name for m in self.markers)

    @property
    def short_name(self) -> str:
        """The first alias (``"S4"``), or the name."""
        return self.aliases[0] if self.aliases else self.name

    def marker(self, name: str) -> Marker:
        """The marker called ``name`` or one of its aliases.

        Raises
        ------
        StageError
            If no marker of this stage has that name or alias.
        """
        for m in self.markers:
            if m.matches(name):
                return m
        raise StageError(
            f"marker {name!r} is not part of stage {self.name!r}; its markers are "
            f"{list(self.marker_names)}"
        )

    def is_nuclear_stain(self, channel_name: str) -> bool:
        """True if ``channel_name`` is the nuclear stain or a common name for one (``"Hoechst"``)."""
        key = _norm(channel_name)
        return key == _norm(self.nuclear_stain) or key in {_norm(a) for a in NUCLEAR_STAIN_ALIASES}

    def match_channels(self, channel_names: Sequence[str]) -> dict[str, int]:
        """Map the nuclear stain and each marker present to its channel index.

        Parameters
        ----------
        channel_names : sequence of str
            The field's channel names, in channel order.

        Returns
        -------
        dict of str to int
            ``{canonical name: index}``; the nuclear stain is under ``"nuclear"``. The first
            matching channel wins. Markers whose channel is absent are left out; callers decide
            whether that is an error. An image of one unnamed channel (``C0``, as the readers
            call it: a nuclear stain saved without its name) is the nuclear stain.
        """
        out: dict[str, int] = {}
        for i, ch in enumerate(channel_names):
            if self.is_nuclear_stain(ch):
                out.setdefault("nuclear", i)
                continue
            for m in self.markers:
                if m.matches(ch):
                    out.setdefault(m.name, i)
                    break
        if len(channel_names) == 1 and not out and re.fullmatch(r"C\d+", channel_names[0]):
            out["nuclear"] = 0  # one unnamed channel (the readers call it C0)
        return out

    def nuclear_channel(self, channel_names: Sequence[str], where: str | Path | None = None) -> int:
        """Index of the nuclear stain channel (:meth:`match_channels`).

        Raises
        ------
        InputError
            Naming ``where`` (the image) when no channel is the nuclear stain.
        """
        matched = self.match_channels(channel_names)
        if "nuclear" not in matched:
            raise InputError(
                f"no nuclear stain channel among {list(channel_names)}; name it "
                f"{self.nuclear_stain!r} or one of {list(NUCLEAR_STAIN_ALIASES)} with "
                "--channel-names (e.g. DAPI,INS)",
                where,
            )
        return matched["nuclear"]


def _m(name: str, compartment: Compartment, *aliases: str, description: str = "") -> Marker:
    return Marker(name, compartment, tuple(aliases), description)


_NKX61 = ("NKX6-1", "NKX61")
_FOXA2 = ("HNF3B", "HNF-3beta")

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
        double_positives=("OCT4+SOX2", "OCT4+NANOG"),
        qc_targets=(
            QCTarget(
                "OCT4",
                minimum=0.90,
                description="undifferentiated culture before differentiation starts",
                source="common hPSC acceptance criterion (>= 90 % OCT4+); lab convention",
            ),
        ),
        description="Induced pluripotent stem cells growing as compact colonies.",
    ),
    StageProfile(
        name="definitive-endoderm",
        aliases=("S1", "DE"),
        order=1,
        markers=(
            _m("SOX17", "nuclear", description="definitive endoderm"),
            _m("FOXA2", "nuclear", *_FOXA2, description="endoderm"),
            _m(
                "CXCR4",
                "cytoplasmic",
                "CD184",
                description="DE surface receptor (membrane; measured around the nucleus)",
            ),
        ),
        cluster_kind="monolayer-patch",
        nucleus_diameter_um=(5.0, 16.0),
        min_cluster_diameter_um=30.0,
        double_positives=("SOX17+FOXA2", "SOX17+CXCR4"),
        qc_targets=(
            QCTarget(
                "SOX17",
                minimum=0.80,
                description="efficient endoderm induction",
                source="D'Amour 2005 (up to ~80 % DE); Rezania 2014 and Pagliuca 2014 exceed it",
            ),
            QCTarget(
                "FOXA2",
                minimum=0.80,
                description="endoderm identity",
                source="D'Amour 2005 (FOXA2 co-expressed with SOX17 in DE)",
            ),
            QCTarget(
                "CXCR4",
                minimum=0.80,
                description="DE surface marker",
                source="D'Amour 2005; Rezania 2014 (CXCR4/CD184 by flow; imaging of a "
                "membrane marker is less precise)",
            ),
        ),
        description="Definitive endoderm: a dense monolayer, SOX17+ FOXA2+ CXCR4+.",
    ),
    StageProfile(
        name="endoderm-stem-cell",
        aliases=("eESC", "DE-SC", "EnSC"),
        order=1,
        markers=(
            _m("SOX17", "nuclear", description="endoderm identity"),
            _m("FOXA2", "nuclear", *_FOXA2, description="endoderm identity"),
            _m(
                "CXCR4",
                "cytoplasmic",
                "CD184",
                description="endoderm surface receptor (membrane; measured around the nucleus)",
            ),
        ),
        cluster_kind="colony",
        nucleus_diameter_um=(5.0, 16.0),
        min_cluster_diameter_um=40.0,
        double_positives=("SOX17+FOXA2",),
        qc_targets=(
            QCTarget(
                "SOX17",
                minimum=0.80,
                description="endoderm identity kept on passaging",
                source="same floor as definitive endoderm (D'Amour 2005); lab convention",
            ),
        ),
        description="Expandable endoderm stem cells, passaged as colonies.",
    ),
    StageProfile(
        name="primitive-gut-tube",
        aliases=("S2", "PGT", "gut-tube"),
        order=2,
        markers=(
            _m("FOXA2", "nuclear", *_FOXA2, description="endoderm"),
            _m("HNF1B", "nuclear", "TCF2", description="primitive gut tube"),
            _m("HNF4A", "nuclear", description="primitive gut tube"),
        ),
        cluster_kind="monolayer-patch",
        nucleus_diameter_um=(5.0, 16.0),
        min_cluster_diameter_um=30.0,
        double_positives=("FOXA2+HNF1B", "HNF1B+HNF4A"),
        qc_targets=(
            QCTarget(
                "HNF1B",
                minimum=0.70,
                description="gut tube specification",
                source="Pagliuca 2014; Rezania 2014 (S2 cells HNF1B+ HNF4A+); floor is a lab "
                "convention",
            ),
            QCTarget(
                "FOXA2",
                minimum=0.80,
                description="endoderm identity kept",
                source="Rezania 2014 (FOXA2 stays high from S1 to S4)",
            ),
        ),
        description="Primitive gut tube: monolayer, FOXA2+ HNF1B+ HNF4A+.",
    ),
    StageProfile(
        name="posterior-foregut",
        aliases=("S3", "PFG"),
        order=3,
        markers=(
            _m("PDX1", "nuclear", "IPF1", description="pancreatic/duodenal specification"),
            _m("FOXA2", "nuclear", *_FOXA2, description="endoderm"),
            _m(
                "SOX2",
                "nuclear",
                description="foregut; may overlap PDX1 at S3, should be off by S4 "
                "(persisting SOX2 = gastric/anterior off-target)",
            ),
        ),
        cluster_kind="monolayer-patch",
        nucleus_diameter_um=(5.0, 16.0),
        min_cluster_diameter_um=30.0,
        double_positives=("PDX1+FOXA2", "PDX1+SOX2"),
        qc_targets=(
            QCTarget(
                "PDX1",
                minimum=0.60,
                description="posterior foregut specification",
                source="Rezania 2014; Hogrebe 2020 (most cells PDX1+ by the end of S3); "
                "60 % is a lenient imaging floor",
            ),
        ),
        description="Posterior foregut: PDX1 switches on.",
    ),
    StageProfile(
        name="pancreatic-progenitor",
        aliases=("S4", "PP"),
        order=4,
        markers=(
            _m("PDX1", "nuclear", "IPF1", description="pancreatic progenitor"),
            _m("NKX6.1", "nuclear", *_NKX61, description="beta-cell competent progenitor"),
            _m("SOX9", "nuclear", description="multipotent progenitor"),
        ),
        cluster_kind="aggregate",
        nucleus_diameter_um=(4.5, 15.0),
        min_cluster_diameter_um=25.0,
        double_positives=("PDX1+NKX6.1",),
        qc_targets=(
            QCTarget(
                "PDX1+NKX6.1",
                minimum=0.50,
                description="beta-cell competent progenitors",
                source="Rezania 2014; Velazco-Cruz 2019; Hogrebe 2020 (PDX1+NKX6.1+ commonly "
                ">= 50 % at the end of S4)",
            ),
            QCTarget(
                "PDX1",
                minimum=0.80,
                description="pancreatic identity",
                source="Rezania 2014; Pagliuca 2014 (most S4 cells PDX1+)",
            ),
        ),
        description="Pancreatic progenitors: PDX1+ NKX6.1+ clusters.",
    ),
    StageProfile(
        name="endocrine-progenitor",
        aliases=("S5", "EP"),
        order=5,
        markers=(
            _m("NKX2.2", "nuclear", "NKX2-2", "NKX22", description="endocrine progenitor"),
            _m("NEUROD1", "nuclear", "NeuroD", "BETA2", description="endocrine commitment"),
            _m("NKX6.1", "nuclear", *_NKX61, description="beta lineage"),
            _m("CHGA", "cytoplasmic", "chromogranin A", "CgA", description="endocrine granules"),
        ),
        cluster_kind="aggregate",
        cluster_input="sum",
        nucleus_diameter_um=(4.5, 14.0),
        min_cluster_diameter_um=25.0,
        double_positives=("NKX2.2+NKX6.1", "NEUROD1+NKX6.1"),
        qc_targets=(
            QCTarget(
                "NKX2.2",
                minimum=0.40,
                description="endocrine induction",
                source="lab convention; no single published criterion at S5",
            ),
            QCTarget(
                "NKX2.2+NKX6.1",
                minimum=0.25,
                description="beta-lineage endocrine progenitors",
                source="lab convention; no single published criterion at S5",
            ),
        ),
        description="Endocrine progenitors: NKX2.2+ NEUROD1+ aggregates.",
    ),
    StageProfile(
        name="sc-islet",
        aliases=("S6", "SC-islet", "islet"),
        order=6,
        markers=(
            _m("INS", "cytoplasmic", "C-peptide", "CPEP", "insulin", description="beta cells"),
            _m("NKX6.1", "nuclear", *_NKX61, description="beta-cell identity"),
            _m("GCG", "cytoplasmic", "glucagon", description="alpha cells / polyhormonal"),
        ),
        cluster_kind="aggregate",
        cluster_input="sum",
        nucleus_diameter_um=(4.0, 14.0),
        min_cluster_diameter_um=25.0,
        double_positives=("INS+NKX6.1", "INS+GCG"),
        qc_targets=(
            QCTarget(
                "INS",
                minimum=0.30,
                maximum=0.60,
                description="C-peptide+ beta-like cells",
                source="Pagliuca 2014; Velazco-Cruz 2019; Hogrebe 2020; Balboa 2022 "
                "(C-peptide+ typically 30-60 % of cells)",
            ),
            QCTarget(
                "INS+NKX6.1",
                minimum=0.20,
                description="beta-like cells with beta identity",
                source="Pagliuca 2014 (~33 % C-peptide+NKX6.1+); later protocols higher",
            ),
            QCTarget(
                "GCG",
                maximum=0.25,
                description="few alpha-like / polyhormonal cells",
                source="Velazco-Cruz 2019; Hogrebe 2020 (GCG+ cells a minority)",
            ),
            QCTarget(
                "INS+GCG",
                maximum=0.10,
                description="few polyhormonal cells",
                source="Pagliuca 2014; Rezania 2014 (functional SC-beta are monohormonal; "
                "INS+GCG+ a small minority)",
            ),
        ),
        description=(
            "SC-islets: 3D aggregates of INS+ NKX6.1+ beta-like cells and GCG+ alpha-like cells."
        ),
    ),
)


def _find_profile(profiles: Iterable[StageProfile], name: str) -> StageProfile | None:
    key = _norm(name)
    for p in profiles:
        if key == _norm(p.name) or any(key == _norm(a) for a in p.aliases):
            return p
    return None


def _unknown_stage(profiles: Sequence[StageProfile], name: str) -> StageError:
    """The error for an unknown stage name: the known stages, and the closest one."""
    known = ", ".join(
        f"{p.name} ({'/'.join(p.aliases)})" if p.aliases else p.name for p in profiles
    )
    keys: dict[str, str] = {}
    for p in profiles:
        for k in (p.name, *p.aliases):
            keys.setdefault(_norm(k), k)
    close = difflib.get_close_matches(_norm(name), list(keys), n=1)
    hint = f"did you mean {keys[close[0]]!r}? " if close else ""
    return StageError(
        f"unknown stage {name!r}; {hint}known stages: {known}. "
        "Add your own with a TOML file (--stages)"
    )


@dataclass(frozen=True)
class StageRegistry:
    """A set of stage profiles looked up by name or alias (case-, space- and dash-insensitive).

    Raises
    ------
    StageError
        If two profiles share a name or alias.
    """

    profiles: tuple[StageProfile, ...] = BUILTIN_STAGES

    def __post_init__(self) -> None:
        object.__setattr__(self, "profiles", tuple(self.profiles))
        seen: dict[str, str] = {}
        for p in self.profiles:
            if not isinstance(p, StageProfile):
                raise StageError(f"a stage registry holds StageProfile objects; got {p!r}")
            for key in (p.name, *p.aliases):
                k = _norm(key)
                if k in seen and seen[k] != p.name:
                    raise StageError(
                        f"stage name or alias {key!r} is used by both {seen[k]!r} and "
                        f"{p.name!r}; give each stage its own name and aliases"
                    )
                seen[k] = p.name

    @property
    def names(self) -> tuple[str, ...]:
        """Canonical names of the profiles, in registry order."""
        return tuple(p.name for p in self.profiles)

    def find(self, name: str) -> StageProfile | None:
        """The profile called ``name`` or with that alias, or ``None``."""
        return _find_profile(self.profiles, name)

    def get(self, name: str | StageProfile) -> StageProfile:
        """The profile called ``name`` or with that alias.

        Raises
        ------
        StageError
            For an unknown name; the message lists the known stages and their aliases.
        """
        if isinstance(name, StageProfile):
            return name
        found = self.find(name)
        if found is None:
            raise _unknown_stage(self.profiles, name)
        return found

    def __contains__(self, name: object) -> bool:
        if isinstance(name, StageProfile):
            return name in self.profiles
        return isinstance(name, str) and self.find(name) is not None

    def __iter__(self) -> Iterator[StageProfile]:
        return iter(self.profiles)

    def __len__(self) -> int:
        return len(self.profiles)


# --------------------------------------------------------------------------------------- TOML

#: Keys of a ``[stages.<name>]`` table (``qc`` holds the QC targets).
_PROFILE_KEYS: tuple[str, ...] = (
    "aliases",
    "order",
    "description",
    "cluster_kind",
    "cluster_input",
    "nuclear_stain",
    "nucleus_diameter_um",
    "min_cluster_diameter_um",
    "double_positives",
    "markers",
    "qc",
)
_MARKER_KEYS: tuple[str, ...] = ("name", "compartment", "aliases", "description")
_QC_KEYS: tuple[str, ...] = ("population", "min", "max", "description", "source")


#: Likely misnamed keys (the dataclass field names) → the TOML key.
_KEY_HINTS: dict[str, str] = {
    "qc_targets": "qc",
    "qc_target": "qc",
    "targets": "qc",
    "minimum": "min",
    "maximum": "max",
    "extend": "extends",
}


def _check_keys(table: Mapping[str, Any], allowed: Iterable[str], what: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        hints = []
        for k in unknown:
            close = [_KEY_HINTS[k]] if _KEY_HINTS.get(k) in allowed else []
            close = close or difflib.get_close_matches(k, list(allowed), n=1)
            hints.append(f"{k!r} (did you mean {close[0]!r}?)" if close else repr(k))
        raise StageError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(hints)} in {what}; "
            f"allowed: {', '.join(allowed)}"
        )


def _table_list(value: Any, what: str) -> list[Mapping[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
        raise StageError(
            f'{what} must be a list of tables, e.g. [{{name = "INS", compartment = '
            f'"cytoplasmic"}}] or [[stages.<name>.{what}]] tables'
        )
    return value


def _marker_from_toml(d: Mapping[str, Any], i: int) -> Marker:
    what = f"markers[{i}]"
    _check_keys(d, _MARKER_KEYS, what)
    if "name" not in d or "compartment" not in d:
        raise StageError(f"{what} needs 'name' and 'compartment' (\"nuclear\" or \"cytoplasmic\")")
    return Marker(d["name"], d["compartment"], d.get("aliases", ()), d.get("description", ""))


def _qc_from_toml(d: Mapping[str, Any], i: int) -> QCTarget:
    what = f"qc[{i}]"
    _check_keys(d, _QC_KEYS, what)
    if "population" not in d:
        raise StageError(f"{what} needs 'population' and 'min' and/or 'max'")
    return QCTarget(
        d["population"], d.get("min"), d.get("max"), d.get("description", ""), d.get("source", "")
    )


def _values_from_toml(table: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor keyword arguments from the keys of one ``[stages.<name>]`` table."""
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key == "markers":
            values["markers"] = tuple(
                _marker_from_toml(m, i) for i, m in enumerate(_table_list(value, "markers"))
            )
        elif key == "qc":
            values["qc_targets"] = tuple(
                _qc_from_toml(q, i) for i, q in enumerate(_table_list(value, "qc"))
            )
        elif key == "nucleus_diameter_um" and isinstance(value, list):
            values[key] = tuple(value)
        elif key != "extends":
            values[key] = value
    return values


def _profile_from_toml(
    name: str, table: Mapping[str, Any], existing: StageProfile | None, parent: StageProfile | None
) -> StageProfile:
    """One profile from a ``[stages.<name>]`` table: an override, an extension or a new stage."""
    if "name" in table:
        raise StageError(
            "'name' is not a key: the table header [stages.<name>] names the stage; "
            "remove the 'name' line"
        )
    if existing is not None and "extends" in table:
        raise StageError(
            f"'extends' is only for new stages, and {name!r} is already the stage "
            f"{existing.name!r}; drop 'extends' to override that stage key by key, or give "
            "the table a new name"
        )
    _check_keys(table, (*_PROFILE_KEYS, *(() if existing else ("extends",))), "the table")
    values = _values_from_toml(table)
    if existing is not None:
        return replace(existing, **values)
    if parent is not None:
        return replace(parent, **{"name": name, "aliases": (), **values})
    missing = [k for k in ("markers", "cluster_kind") if k not in values]
    if missing:
        raise StageError(
            f'the new stage {name!r} needs {" and ".join(missing)} (or extends = "<stage>" '
            "to start from a known stage)"
        )
    values.setdefault("aliases", ())
    values.setdefault("order", 99)
    return StageProfile(name=name, **values)


def load_stages(
    path: str | Path | None = None, *, base: StageRegistry | None = None
) -> StageRegistry:
    """Built-in stage profiles, plus those of a user's TOML file.

    Parameters
    ----------
    path : path-like, optional
        A TOML file of ``[stages.<name>]`` tables; ``None`` returns ``base`` unchanged.
    base : StageRegistry, optional
        The profiles to start from (default: the built-ins).

    Returns
    -------
    StageRegistry
        ``base`` with the file's overrides applied and its new stages appended.

    Raises
    ------
    StageError
        For a missing, unreadable or invalid file; the message names the file, the table and
        what to change.

    Notes
    -----
    A table whose name (or alias) is a known stage, built-in or from earlier in the file,
    overrides the keys it gives; each key replaces the whole value (``qc`` replaces all QC
    targets, ``markers`` all markers). A new name adds a stage: it needs ``markers`` and
    ``cluster_kind``, or ``extends = "<stage>"`` to start from another stage (its aliases are not
    inherited; its order is). Keys: ``aliases``, ``order``, ``description``, ``cluster_kind``
    (colony, monolayer-patch, aggregate), ``cluster_input`` (nuclear, sum), ``nuclear_stain``,
    ``nucleus_diameter_um = [min, max]``, ``min_cluster_diameter_um``, ``double_positives``,
    ``markers`` (tables of name, compartment, aliases, description) and ``qc`` (tables of
    population, min, max, description, source). Fractions are in [0, 1].

    Examples
    --------
    A file::

        [stages.sc-islet]
        qc = [{population = "INS", min = 0.4, max = 0.7}]

        [stages.my-beta]
        extends = "sc-islet"
        aliases = ["S7"]
        markers = [{name = "INS", compartment = "cytoplasmic"},
                   {name = "MAFA", compartment = "nuclear"}]
        double_positives = ["INS+MAFA"]
        qc = [{population = "INS+MAFA", min = 0.1}]

    ``islet-imaging stages sc-islet --toml`` prints a complete profile to start from.
    """
    registry = base if base is not None else StageRegistry()
    if path is None:
        return registry
    path = Path(path)
    if not path.exists():
        raise StageError(
            "stage profile file not found; give the path of a TOML file "
            "(`islet-imaging stages NAME --toml` prints one to start from)",
            path,
        )
    if not path.is_file():
        raise StageError("is not a file; give the path of a TOML stage profile file", path)
    try:
        doc = tomllib.loads(path.read_bytes().decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise StageError(f"not a valid TOML file ({exc}); fix its syntax", path) from exc
    except OSError as exc:
        raise StageError(f"cannot read the file ({exc})", path) from exc
    extra = sorted(set(doc) - {"stages"})
    if extra:
        raise StageError(
            f"unexpected top-level key(s) {extra}; stage profiles go in [stages.<name>] tables",
            path,
        )
    tables = doc.get("stages")
    if not isinstance(tables, Mapping) or not tables:
        raise StageError(
            "no [stages.<name>] tables found; see `islet-imaging stages NAME --toml` for an example",
            path,
        )
    profiles = list(registry.profiles)
    for name, table in tables.items():
        loc = f"[stages.{name}]"
        if not isinstance(table, Mapping):
            raise StageError(f"{loc} must be a table of stage keys, not {table!r}", path)
        try:
            existing = _find_profile(profiles, name)
            parent = None
            if existing is None and "extends" in table:
                ext = table["extends"]
                if not isinstance(ext, str):
                    raise StageError(f"extends must be a stage name; got {ext!r}")
                parent = _find_profile(profiles, ext)
                if parent is None:
                    raise _unknown_stage(profiles, ext)
            new = _profile_from_toml(str(name), table, existing, parent)
        except StageError as exc:
            raise StageError(f"{loc}: {exc.reason}", path) from exc
        except (TypeError, ValueError) as exc:  # pragma: no cover - defensive
            raise StageError(f"{loc}: {exc}", path) from exc
        if existing is not None:
            profiles[profiles.index(existing)] = new
        else:
            profiles.append(new)
    try:
        return StageRegistry(tuple(profiles))
    except StageError as exc:
        raise StageError(exc.reason, path) from exc


def _toml_str(value: str) -> str:
    # JSON string escapes (\" \\ \n \uXXXX) are valid TOML basic-string escapes.
    return json.dumps(value, ensure_ascii=False)


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_str(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")  # pragma: no cover


def profile_to_toml(profile: StageProfile) -> str:
    """A stage profile as a complete ``[stages.<name>]`` TOML table.

    Loading the text back with :func:`load_stages` gives an equal profile, so it is the place to
    start a custom profile: edit the values, or rename the table (and its aliases) to add a stage.

    Parameters
    ----------
    profile : StageProfile
        The profile to write.

    Returns
    -------
    str
        TOML text, ending with a newline.
    """
    head = f"stages.{_toml_key(profile.name)}"
    lines = [f"[{head}]"]
    for key in _PROFILE_KEYS:
        if key in ("markers", "qc"):
            continue
        lines.append(f"{key} = {_toml_value(getattr(profile, key))}")
    if not profile.markers:
        lines.append("markers = []")
    if not profile.qc_targets:
        lines.append("qc = []")
    for m in profile.markers:
        lines += ["", f"[[{head}.markers]]", f"name = {_toml_str(m.name)}"]
        lines.append(f"compartment = {_toml_str(m.compartment)}")
        lines.append(f"aliases = {_toml_value(m.aliases)}")
        if m.description:
            lines.append(f"description = {_toml_str(m.description)}")
    for t in profile.qc_targets:
        lines += ["", f"[[{head}.qc]]", f"population = {_toml_str(t.population)}"]
        if t.minimum is not None:
            lines.append(f"min = {t.minimum!r}")
        if t.maximum is not None:
            lines.append(f"max = {t.maximum!r}")
        if t.description:
            lines.append(f"description = {_toml_str(t.description)}")
        if t.source:
            lines.append(f"source = {_toml_str(t.source)}")
    return "\n".join(lines) + "\n"


_DEFAULT = StageRegistry()


def get_stage(name: str | StageProfile, *, stages_file: str | Path | None = None) -> StageProfile:
    """Look up a stage profile by name or alias among the built-ins (and a TOML file's).

    Raises
    ------
    StageError
        For an unknown name (the message lists the known stages) or a bad ``stages_file``.
    """
    registry = _DEFAULT if stages_file is None else load_stages(stages_file)
    return registry.get(name)


def list_stages(stages_file: str | Path | None = None) -> tuple[StageProfile, ...]:
    """All known stage profiles in differentiation order."""
    registry = _DEFAULT if stages_file is None else load_stages(stages_file)
    return tuple(sorted(registry.profiles, key=lambda p: p.order))


def iter_populations(profile: StageProfile) -> Iterator[str]:
    """Each single marker, then each double-positive population of a stage."""
    yield from profile.marker_names
    yield from profile.double_positives
