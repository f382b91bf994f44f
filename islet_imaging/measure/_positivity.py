"""Marker-positive calls: one intensity threshold per marker, chosen and recorded.

Methods (``method`` of :func:`find_threshold` / ``--threshold-method``):

``"otsu"``
    Otsu's threshold on the log-transformed per-cell intensities.
``"gmm"``
    A two-component Gaussian mixture fitted (EM, numpy) to the log-transformed intensities; the
    threshold is where the two weighted components are equally likely.
``"fixed"``
    A value given by the user, on the background-corrected intensity scale.
``"control"``
    The 99th percentile of the cells of the negative-control wells of the plate map.

"Log" is the arcsinh transform ``asinh(v / c)``, which equals ``log(2v / c)`` for ``v ≫ c`` but is
defined for the zero and negative background-corrected values of negative cells; the cofactor ``c``
is the spread of the dim cells (``p25 − p5`` of the values, see :func:`log_transform`).

Unimodal data (all cells negative, as in a negative control, or all positive) have no natural
threshold: Otsu and the mixture would split noise. Every automatic threshold therefore reports the
separation of a two-component mixture fit on the transformed values, Ashman's
``D = √2 |μ₁ − μ₂| / √(σ₁² + σ₂²)``; below ``min_separation`` the threshold is flagged ``unimodal``
and a warning is logged. The default bar is D ≥ 3, stricter than the textbook D > 2, because the
arcsinh compression of a single noise mode alone gives D ≈ 2.0–2.8 (simulated negative controls,
Gaussian or gamma noise), while a positive population a few noise widths above the negatives
gives D ≥ 5.

What happens to unimodal data is ``on_unimodal``: ``"sbr"`` (default) switches to a
fold-over-background rule: a cell is positive when its raw compartment mean is at least 3 × its
local background, i.e. the threshold on the background-corrected value is ``2 × median
background``. An all-negative control then comes out (almost) all negative, an all-positive well
all positive, and a few negatives in a mostly positive well are still found. ``"keep"`` keeps the
automatic split; ``"nan"`` leaves the calls missing. Under ``"sbr"``, data with D below the bar
whose two mixture components lie on either side of the fold-over-background level (one looks
negative, the other positive) are taken as two weakly separated populations and keep the automatic
split (``unimodal`` False, explained in ``note``). The factor 3 lies above the median
signal-to-background ratio of negative cells (≤ 2.5) and below that of positive cells (≥ 5.2) in
synthetic tuning fields (seeds < 9000) of every stage, nearer the negatives because dim positive
populations (membrane CXCR4) reach down to ~3; check it on your stains, or use a control or fixed
threshold.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from skimage.filters import threshold_otsu

from islet_imaging.errors import InputError

__all__ = [
    "GaussianMixture1D",
    "Threshold",
    "ThresholdSpec",
    "call_positive",
    "control_threshold",
    "find_threshold",
    "fit_gmm_1d",
    "log_transform",
    "parse_threshold_method",
    "population_names",
    "thresholds_table",
]

log = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("otsu", "gmm", "fixed", "control")

#: Fewest cells an automatic threshold is estimated from.
MIN_CELLS = 20
#: Ashman's D below which intensities are called unimodal (see the module docstring).
MIN_SEPARATION = 3.0
#: Signal-to-background ratio (raw mean / local background) a cell of unimodal data needs to be
#: positive.
UNIMODAL_SBR = 3.0
UNIMODAL_POLICIES: tuple[str, ...] = ("sbr", "keep", "nan")


@dataclass(frozen=True)
class Threshold:
    """The threshold used for one marker, and how it was found.

    Parameters
    ----------
    marker : str
    value : float
        Threshold on the background-corrected ``statistic`` (a cell is positive if above it);
        NaN when it could not be determined (then calls are missing, not negative).
    method : str
        ``"otsu"``, ``"gmm"``, ``"fixed"`` or ``"control"``.
    statistic : str
        The per-cell column it applies to: ``"mean"`` → ``mean_<MARKER>``.
    scope : str
        What cells it was computed over (``"plate"``, a stage, an image name).
    n_cells : int
        Cells it was computed from.
    separation : float
        Ashman's D of a two-component mixture on the log intensities (NaN when not computed).
    unimodal : bool
        True when ``separation`` < ``min_separation``: the automatic split is not trustworthy.
    note : str
        Anything a user should know (fallbacks, too few cells).
    """

    marker: str
    value: float
    method: str
    statistic: str = "mean"
    scope: str = ""
    n_cells: int = 0
    separation: float = math.nan
    unimodal: bool = False
    note: str = ""

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class ThresholdSpec:
    """A parsed ``--threshold-method``: the method and any fixed values per marker."""

    method: str = "gmm"
    fixed: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"threshold method {self.method!r} is not one of {', '.join(METHODS)}")


def parse_threshold_method(text: str) -> ThresholdSpec:
    """Parse ``otsu``, ``gmm``, ``control`` or ``fixed:INS=200[,GCG=150]``.

    Markers without a fixed value fall back to the mixture (recorded in the thresholds table).

    Raises
    ------
    InputError
        For an unknown method or a malformed fixed value.
    """
    text = str(text).strip()
    head, _, rest = text.partition(":")
    head = head.strip().lower()
    if head != "fixed":
        if rest:
            raise InputError(f"threshold method {text!r}: only 'fixed' takes values after ':'")
        return ThresholdSpec(head)
    values: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in re.split(r"[,;]", rest))):
        name, eq, val = part.partition("=")
        try:
            number = float(val)
        except ValueError:
            number = math.nan
        if not eq or not name.strip() or not math.isfinite(number):
            raise InputError(
                f"threshold method {text!r}: write fixed values as fixed:<MARKER>=<value>, "
                "e.g. fixed:INS=200,GCG=150"
            )
        values[name.strip()] = number
    if not values:
        raise InputError(f"threshold method {text!r}: give at least one fixed:<MARKER>=<value>")
    return ThresholdSpec("fixed", values)


def log_transform(values: np.ndarray, cofactor: float | None = None) -> tuple[np.ndarray, float]:
    """``asinh(v / c)``, a log transform defined for zero and negative values.

    Parameters
    ----------
    values : (N,) ndarray
        Background-corrected intensities.
    cofactor : float, optional
        ``c``; default ``p25 − p5`` of the values (the spread of the dimmest cells, which are
        negative unless nearly all cells are positive), at least ``1e-6 × max|v|``.

    Returns
    -------
    transformed : (N,) ndarray
    cofactor : float
    """
    v = np.asarray(values, dtype=np.float64)
    if cofactor is None:
        finite = v[np.isfinite(v)]
        if finite.size == 0:
            return v.copy(), 1.0
        p5, p25 = np.percentile(finite, [5, 25])
        scale = float(np.max(np.abs(finite)))
        cofactor = max(float(p25 - p5), 1e-6 * scale, 1e-12)
    return np.arcsinh(v / cofactor), float(cofactor)


@dataclass(frozen=True)
class GaussianMixture1D:
    """A fitted two-component 1-D Gaussian mixture (component 0 has the lower mean)."""

    weights: tuple[float, float]
    means: tuple[float, float]
    sds: tuple[float, float]
    log_likelihood: float
    converged: bool

    @property
    def ashman_d(self) -> float:
        """Ashman's D separation of the two components."""
        return float(
            math.sqrt(2.0)
            * abs(self.means[1] - self.means[0])
            / math.sqrt(self.sds[0] ** 2 + self.sds[1] ** 2)
        )

    def crossing(self) -> float:
        """The point between the means where both weighted densities are equal (NaN if none)."""
        lo, hi = self.means
        grid = np.linspace(lo, hi, 2001)
        dens = [
            w * np.exp(-0.5 * ((grid - m) / s) ** 2) / s
            for w, m, s in zip(self.weights, self.means, self.sds, strict=True)
        ]
        diff = dens[1] - dens[0]
        sign = np.flatnonzero(np.diff(np.sign(diff)) != 0)
        if sign.size == 0:
            return math.nan
        i = int(sign[0])
        x0, x1, d0, d1 = grid[i], grid[i + 1], diff[i], diff[i + 1]
        return float(x0 - d0 * (x1 - x0) / (d1 - d0)) if d1 != d0 else float(x0)


def fit_gmm_1d(x: np.ndarray, *, max_iter: int = 300, tol: float = 1e-8) -> GaussianMixture1D:
    """Fit a two-component Gaussian mixture to 1-D data by EM, started from Otsu's split.

    Parameters
    ----------
    x : (N,) ndarray
        At least 2 distinct finite values.
    max_iter : int
    tol : float
        Stop when the mean log-likelihood improves by less than this.
    """
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size < 2 or np.ptp(x) == 0:
        raise InputError("a mixture needs at least two distinct values")
    var_floor = max((np.ptp(x) / 1000.0) ** 2, 1e-12)
    t = threshold_otsu(x)
    lo_mask = x <= t
    if lo_mask.all() or not lo_mask.any():
        lo_mask = x <= np.median(x)
    w = np.array([lo_mask.mean(), 1 - lo_mask.mean()])
    m = np.array([x[lo_mask].mean(), x[~lo_mask].mean()])
    v = np.array([max(x[lo_mask].var(), var_floor), max(x[~lo_mask].var(), var_floor)])
    prev = -np.inf
    converged = False
    ll = -np.inf
    for _ in range(max_iter):
        logp = (
            np.log(np.maximum(w, 1e-300))[None, :]
            - 0.5 * np.log(2 * np.pi * v)[None, :]
            - 0.5 * (x[:, None] - m[None, :]) ** 2 / v[None, :]
        )
        top = logp.max(1, keepdims=True)
        norm = top[:, 0] + np.log(np.exp(logp - top).sum(1))
        resp = np.exp(logp - norm[:, None])
        ll = float(norm.mean())
        nk = resp.sum(0) + 1e-12
        w = nk / nk.sum()
        m = (resp * x[:, None]).sum(0) / nk
        v = np.maximum((resp * (x[:, None] - m[None, :]) ** 2).sum(0) / nk, var_floor)
        if abs(ll - prev) < tol:
            converged = True
            break
        prev = ll
    order = np.argsort(m)
    return GaussianMixture1D(
        weights=(float(w[order[0]]), float(w[order[1]])),
        means=(float(m[order[0]]), float(m[order[1]])),
        sds=(float(np.sqrt(v[order[0]])), float(np.sqrt(v[order[1]]))),
        log_likelihood=ll,
        converged=converged,
    )


def find_threshold(
    values: np.ndarray,
    *,
    marker: str,
    method: str = "gmm",
    statistic: str = "mean",
    scope: str = "",
    min_cells: int = MIN_CELLS,
    min_separation: float = MIN_SEPARATION,
    background: np.ndarray | None = None,
    on_unimodal: str = "sbr",
    unimodal_sbr: float = UNIMODAL_SBR,
) -> Threshold:
    """An automatic threshold (Otsu or mixture on log intensities) with a unimodality check.

    Parameters
    ----------
    values : (N,) ndarray
        Background-corrected per-cell intensities of one marker (NaN ignored).
    marker : str
    method : {"otsu", "gmm"}
    statistic, scope : str
        Recorded in the result.
    min_cells : int
        Fewer finite values give a NaN threshold (calls missing) with a note.
    min_separation : float
        Ashman's D below which the data are flagged unimodal.
    background : (N,) ndarray, optional
        Per-cell local background (same units as ``values``), for the ``"sbr"`` unimodal policy.
    on_unimodal : {"sbr", "keep", "nan"}
        What to do with unimodal data (see the module docstring). Without a positive
        ``background``, ``"sbr"`` acts as ``"keep"``.
    unimodal_sbr : float
        Signal-to-background ratio a cell needs to be positive under the ``"sbr"`` policy.

    Returns
    -------
    Threshold
        Its ``value`` is on the linear (corrected intensity) scale.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> v = np.concatenate([rng.normal(0, 5, 700), rng.normal(300, 40, 300)])
    >>> t = find_threshold(v, marker="INS")
    >>> 15 < t.value < 250, t.unimodal
    (True, False)
    """
    if method not in ("otsu", "gmm"):
        raise InputError(f"automatic threshold method {method!r} is not 'otsu' or 'gmm'")
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    base = {"marker": marker, "method": method, "statistic": statistic, "scope": scope}
    if v.size < max(min_cells, 2) or np.ptp(v) == 0:
        note = f"only {v.size} cells with a value (need {min_cells}); no threshold"
        if v.size >= 2 and np.ptp(v) == 0:
            note = "all cells have the same value; no threshold"
        log.warning("%s%s: %s", f"{scope}: " if scope else "", marker, note)
        return Threshold(value=math.nan, n_cells=int(v.size), note=note, **base)
    t, cofactor = log_transform(v)
    fit = fit_gmm_1d(t)
    separation = fit.ashman_d
    note = ""
    if method == "otsu":
        cut = float(threshold_otsu(t))
    else:
        cut = fit.crossing()
        if not math.isfinite(cut):
            cut = float(threshold_otsu(t))
            note = "mixture components do not cross; Otsu used"
    if on_unimodal not in UNIMODAL_POLICIES:
        raise InputError(f"on_unimodal={on_unimodal!r} is not one of {UNIMODAL_POLICIES}")
    value = float(np.sinh(cut) * cofactor)
    unimodal = bool(separation < min_separation)
    if unimodal:
        msg = f"intensities look unimodal (Ashman's D = {separation:.2f} < {min_separation})"
        bg_level = None
        if background is not None:
            bg = np.asarray(background, dtype=np.float64)
            bg = bg[np.isfinite(bg)]
            bg_level = float(np.median(bg)) if bg.size else None
        if on_unimodal == "nan":
            value = math.nan
            msg += "; calls left missing"
        elif on_unimodal == "sbr" and bg_level is not None and bg_level > 0:
            fold_cut = (unimodal_sbr - 1.0) * bg_level
            lo_level, hi_level = (float(np.sinh(m) * cofactor) for m in fit.means)
            if lo_level < fold_cut <= hi_level:
                # one component looks negative and the other positive: two real but weakly
                # separated populations; the automatic split stands
                unimodal = False
                msg = (
                    f"weakly separated (Ashman's D = {separation:.2f} < {min_separation}), but the "
                    f"mixture components lie either side of {unimodal_sbr:g} × background; "
                    f"{method} split kept"
                )
            else:
                value = fold_cut
                frac = float(np.mean(v > value))
                msg += (
                    f"; fold-over-background rule used: positive if ≥ {unimodal_sbr:g} × "
                    f"background ({frac:.0%} positive)"
                )
        else:
            msg += "; the automatic split may divide noise — use a control or fixed threshold"
        note = f"{note}; {msg}" if note else msg
        log.warning("%s%s: %s", f"{scope}: " if scope else "", marker, msg)
    return Threshold(
        value=value,
        n_cells=int(v.size),
        separation=float(separation),
        unimodal=unimodal,
        note=note,
        **base,
    )


def control_threshold(
    values: np.ndarray,
    *,
    marker: str,
    percentile: float = 99.0,
    statistic: str = "mean",
    scope: str = "",
    min_cells: int = MIN_CELLS,
) -> Threshold:
    """The ``percentile`` of negative-control cells' intensities (about 1 % false positives)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    base = {"marker": marker, "method": "control", "statistic": statistic, "scope": scope}
    if v.size < min_cells:
        note = f"only {v.size} negative-control cells (need {min_cells}); no threshold"
        log.warning("%s: %s", marker, note)
        return Threshold(value=math.nan, n_cells=int(v.size), note=note, **base)
    return Threshold(
        value=float(np.percentile(v, percentile)),
        n_cells=int(v.size),
        note=f"{percentile:g}th percentile of negative-control cells",
        **base,
    )


def population_names(markers: Sequence[str], double_positives: Sequence[str] = ()) -> list[str]:
    """Single markers then double-positive populations, e.g. ``["INS", "GCG", "INS+GCG"]``."""
    return [*markers, *(p for p in double_positives if p not in markers)]


def call_positive(
    cells: pd.DataFrame,
    thresholds: Mapping[str, Threshold],
    *,
    double_positives: Sequence[str] = (),
) -> pd.DataFrame:
    """Add ``positive_<MARKER>`` and ``positive_<A>+<B>`` columns to a cell table.

    A cell is positive for a marker when its ``<statistic>_<MARKER>`` exceeds the threshold; calls
    are missing (``<NA>``, pandas ``boolean`` dtype) where the value or the threshold is NaN. A
    double positive ``"A+B"`` is positive for every marker it names.

    Parameters
    ----------
    cells : pandas.DataFrame
        From :func:`measure_cells`.
    thresholds : dict of str to Threshold
        One per marker.
    double_positives : sequence of str
        Populations like ``"INS+NKX6.1"``.

    Returns
    -------
    pandas.DataFrame
        A copy with the positivity columns.
    """
    out = cells.copy()
    for marker, thr in thresholds.items():
        col = f"{thr.statistic}_{marker}"
        if col not in out:
            raise InputError(f"cell table has no column {col!r} to threshold marker {marker!r}")
        values = out[col].to_numpy(dtype=np.float64)
        call = pd.array(values > thr.value, dtype="boolean")
        missing = ~np.isfinite(values) | (not math.isfinite(thr.value))
        call[missing] = pd.NA
        out[f"positive_{marker}"] = call
    for pop in double_positives:
        parts = [m for m in pop.split("+") if m]
        cols = [f"positive_{m}" for m in parts]
        if not all(c in out for c in cols):
            continue
        combined = out[cols[0]].copy()
        for c in cols[1:]:
            combined = combined & out[c]
        out[f"positive_{pop}"] = combined.astype("boolean")
    return out


def thresholds_table(thresholds: Sequence[Threshold]) -> pd.DataFrame:
    """The thresholds as a table (one row each) for the output folder."""
    columns = list(Threshold.__dataclass_fields__)
    return pd.DataFrame([t.as_dict() for t in thresholds], columns=columns)
