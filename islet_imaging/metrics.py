"""Evaluation against truth: object matching (AP, F1, panoptic quality) and measurement errors.

Pure numpy/scipy, no torch. Label images are compared through a sparse contingency table of their
overlaps, so images of thousands of objects (or 3D stacks) are cheap; objects are then paired
one-to-one at each score threshold, maximising first the number of pairs and then the sum of their
scores (the StarDist definition).

Definitions (per threshold, ``tp`` = matched pairs, ``fp`` = unmatched predictions,
``fn`` = unmatched true objects, ``S`` = sum of the matched pairs' scores):

- precision = tp / (tp + fp), recall = tp / (tp + fn), f1 = 2 tp / (2 tp + fp + fn)
- accuracy = tp / (tp + fp + fn): the "average precision" of the DSB 2018 / StarDist papers
  (``Matching.ap`` is an alias)
- mean_true_score = S / n_true, mean_matched_score = S / tp
- panoptic_quality = S / (tp + fp / 2 + fn / 2)

Convention for empty images: when there is no true and no predicted object, every ratio above is
1.0 (a perfect answer to an empty image). Any other ratio with a zero denominator is 0.0 (as in
StarDist), e.g. recall when there is no truth but there are predictions.

Examples
--------
>>> import numpy as np
>>> truth = np.zeros((20, 30), np.int32); truth[0:10, 0:10] = 1
>>> pred = np.zeros_like(truth); pred[0:10, 5:15] = 7
>>> [round(m.ap, 2) for m in match(truth, pred, thresholds=(0.3, 0.4))]
[1.0, 0.0]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import connected_components

from islet_imaging.errors import InputError

__all__ = [
    "DEFAULT_THRESHOLDS",
    "Matching",
    "count_error",
    "diameter_errors",
    "error_kinds",
    "iou_matrix",
    "match",
    "match_dataset",
    "match_objects_table",
    "matching_table",
    "measurement_errors",
    "percentage_point_error",
    "pool_error_kinds",
    "pool_matchings",
    "relative_error",
    "size_bias",
]

Criterion = Literal["iou", "iot", "iop"]
CRITERIA: tuple[str, ...] = ("iou", "iot", "iop")

#: IoU thresholds 0.5, 0.55, ..., 0.9 (the DSB 2018 / COCO-style sweep).
DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(9))

# Above this many pixels per possible (true, pred) pair the contingency uses np.bincount on pair
# codes; otherwise (very many objects) it sorts the overlapping pixels with np.unique.
_DENSE_PAIRS_PER_PIXEL = 4


# -- overlaps -------------------------------------------------------------------------------------
def _check_labels(truth: Any, pred: Any) -> tuple[np.ndarray, np.ndarray]:
    truth = np.asarray(truth)
    pred = np.asarray(pred)
    for name, arr in (("truth", truth), ("pred", pred)):
        if arr.dtype == bool or arr.dtype.kind not in "iu":
            raise InputError(
                f"{name} label image has dtype {arr.dtype}; labels must be integers "
                "(0 = background). For a binary mask use skimage.measure.label(mask)"
            )
        if arr.ndim not in (2, 3):
            raise InputError(
                f"{name} label image must be (Y, X) or (Z, Y, X), got shape {arr.shape}"
            )
    if truth.shape != pred.shape and truth.ndim != pred.ndim:
        # a 2D image against a single-plane (1, Y, X) stack (e.g. Labels.nuclei) is fine
        if truth.ndim == 3 and truth.shape[0] == 1:
            truth = truth[0]
        if pred.ndim == 3 and pred.shape[0] == 1:
            pred = pred[0]
    if truth.shape != pred.shape:
        raise InputError(
            f"truth labels {truth.shape} and predicted labels {pred.shape} differ in shape; "
            "compare label images of the same field"
        )
    return truth, pred


def _compact(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map labels to 0..n (0 kept as background). Returns (flat compact labels, original ids)."""
    flat = labels.ravel()
    if flat.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if flat.dtype.kind == "i" and flat.min() < 0:
        raise InputError(
            f"label image has negative values (min {flat.min()}); labels must be >= 0 "
            "with 0 as background"
        )
    top = int(flat.max())
    if top <= max(2 * flat.size, 1 << 16):
        flat = flat.astype(np.intp, copy=False)
        present = np.bincount(flat, minlength=top + 1) > 0
        present[0] = False
        ids = np.flatnonzero(present)
        lut = np.zeros(top + 1, np.int64)
        lut[ids] = np.arange(1, ids.size + 1)
        return lut[flat], ids.astype(np.int64)
    uniq, inverse = np.unique(flat, return_inverse=True)
    if uniq[0] != 0:
        return inverse.astype(np.int64) + 1, uniq.astype(np.int64)
    return inverse.astype(np.int64), uniq[1:].astype(np.int64)


@dataclass(frozen=True, eq=False)
class _Overlap:
    """Sparse contingency of two label images: areas and pairwise intersections (in pixels)."""

    true_ids: np.ndarray  # (n_true,)
    pred_ids: np.ndarray  # (n_pred,)
    true_area: np.ndarray  # (n_true,)
    pred_area: np.ndarray  # (n_pred,)
    rows: np.ndarray  # (K,) index into true_ids
    cols: np.ndarray  # (K,) index into pred_ids
    intersection: np.ndarray  # (K,)

    def scores(self, criterion: str) -> np.ndarray:
        """Score of each overlapping pair, ``(K,)`` float64."""
        inter = self.intersection.astype(np.float64)
        if criterion == "iou":
            denom = self.true_area[self.rows] + self.pred_area[self.cols] - self.intersection
        elif criterion == "iot":
            denom = self.true_area[self.rows]
        else:
            denom = self.pred_area[self.cols]
        return inter / denom


def _overlap(truth: np.ndarray, pred: np.ndarray) -> _Overlap:
    t, true_ids = _compact(truth)
    p, pred_ids = _compact(pred)
    nt, npred = true_ids.size, pred_ids.size
    true_area = np.bincount(t, minlength=nt + 1)[1:]
    pred_area = np.bincount(p, minlength=npred + 1)[1:]
    both = (t > 0) & (p > 0)
    tb, pb = t[both] - 1, p[both] - 1
    n_pairs = nt * npred
    if n_pairs == 0 or tb.size == 0:
        rows = cols = inter = np.zeros(0, np.int64)
    else:
        codes = tb * npred + pb
        if n_pairs <= _DENSE_PAIRS_PER_PIXEL * max(t.size, 1):
            counts = np.bincount(codes, minlength=n_pairs)
            nz = np.flatnonzero(counts)
            inter = counts[nz]
        else:
            nz, inter = np.unique(codes, return_counts=True)
        rows, cols = np.divmod(nz, npred)
    return _Overlap(true_ids, pred_ids, true_area, pred_area, rows, cols, inter.astype(np.int64))


def _check_criterion(criterion: str) -> None:
    if criterion not in CRITERIA:
        raise InputError(f"criterion {criterion!r} is not one of {CRITERIA}")


def iou_matrix(
    truth: np.ndarray, pred: np.ndarray, *, criterion: Criterion = "iou"
) -> tuple[sparse.csr_array, np.ndarray, np.ndarray]:
    """Pairwise overlap scores of two label images, as a sparse matrix.

    Parameters
    ----------
    truth, pred : (Y, X) or (Z, Y, X) ndarray of int
        Instance labels, 0 = background. Ids need not be consecutive.
    criterion : {"iou", "iot", "iop"}
        Intersection over union, over the true object's area, or over the predicted object's.

    Returns
    -------
    scores : (n_true, n_pred) scipy.sparse.csr_array of float64
        ``scores[i, j]`` is the score of true object ``true_ids[i]`` and predicted ``pred_ids[j]``;
        pairs that do not overlap are absent (0).
    true_ids : (n_true,) ndarray of int64
        The true label values, ascending.
    pred_ids : (n_pred,) ndarray of int64
        The predicted label values, ascending.

    Examples
    --------
    >>> a = np.array([[1, 1, 0, 0]]); b = np.array([[0, 5, 5, 0]])
    >>> m, t, p = iou_matrix(a, b)
    >>> float(m[0, 0]), t.tolist(), p.tolist()
    (0.3333333333333333, [1], [5])
    """
    _check_criterion(criterion)
    truth, pred = _check_labels(truth, pred)
    ov = _overlap(truth, pred)
    m = sparse.csr_array(
        (ov.scores(criterion), (ov.rows, ov.cols)), shape=(ov.true_ids.size, ov.pred_ids.size)
    )
    return m, ov.true_ids, ov.pred_ids


# -- matching -------------------------------------------------------------------------------------
def _ratio(num: float, den: float, *, empty: bool) -> float:
    if den > 0:
        return float(num) / float(den)
    return 1.0 if empty else 0.0


@dataclass(frozen=True, eq=False)
class Matching:
    """Result of matching true and predicted objects at one threshold.

    Parameters
    ----------
    threshold : float
        Pairs need a score ``>= threshold``.
    criterion : str
        ``"iou"``, ``"iot"`` or ``"iop"``.
    n_true, n_pred : int
        Number of true and predicted objects.
    tp : int
        Matched pairs.
    sum_matched_score : float
        Sum of the matched pairs' scores.
    true_ids, pred_ids : (tp,) ndarray of int64
        Label values of the matched pairs (empty for a pooled result).
    scores : (tp,) ndarray of float64
        Their scores.
    n_images : int
        Number of images pooled into this result.

    Notes
    -----
    ``fp``, ``fn``, ``precision``, ``recall``, ``f1``, ``accuracy`` (= ``ap``), ``mean_true_score``,
    ``mean_matched_score`` and ``panoptic_quality`` are derived; see the module docstring for the
    formulas and the empty-image convention.
    """

    threshold: float
    criterion: str
    n_true: int
    n_pred: int
    tp: int
    sum_matched_score: float
    true_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    pred_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    n_images: int = 1

    @property
    def fp(self) -> int:
        return self.n_pred - self.tp

    @property
    def fn(self) -> int:
        return self.n_true - self.tp

    @property
    def _empty(self) -> bool:
        return self.n_true == 0 and self.n_pred == 0

    @property
    def precision(self) -> float:
        return _ratio(self.tp, self.tp + self.fp, empty=self._empty)

    @property
    def recall(self) -> float:
        return _ratio(self.tp, self.tp + self.fn, empty=self._empty)

    @property
    def f1(self) -> float:
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn, empty=self._empty)

    @property
    def accuracy(self) -> float:
        """tp / (tp + fp + fn), the DSB 2018 / StarDist "average precision"."""
        return _ratio(self.tp, self.tp + self.fp + self.fn, empty=self._empty)

    @property
    def ap(self) -> float:
        """Alias of :attr:`accuracy`."""
        return self.accuracy

    @property
    def mean_true_score(self) -> float:
        return _ratio(self.sum_matched_score, self.n_true, empty=self._empty)

    @property
    def mean_matched_score(self) -> float:
        return _ratio(self.sum_matched_score, self.tp, empty=self._empty)

    @property
    def panoptic_quality(self) -> float:
        return _ratio(
            self.sum_matched_score, self.tp + 0.5 * self.fp + 0.5 * self.fn, empty=self._empty
        )

    @property
    def pairs(self) -> list[tuple[int, int, float]]:
        """Matched ``(true id, predicted id, score)`` triples."""
        return [
            (int(t), int(p), float(s))
            for t, p, s in zip(self.true_ids, self.pred_ids, self.scores, strict=True)
        ]

    def as_dict(self) -> dict[str, Any]:
        """The counts and scores as a flat dict (one table row)."""
        return {
            "threshold": self.threshold,
            "criterion": self.criterion,
            "n_images": self.n_images,
            "n_true": self.n_true,
            "n_pred": self.n_pred,
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "accuracy": self.accuracy,
            "mean_true_score": self.mean_true_score,
            "mean_matched_score": self.mean_matched_score,
            "panoptic_quality": self.panoptic_quality,
        }


def _check_thresholds(thresholds: float | Iterable[float]) -> tuple[float, ...]:
    if isinstance(thresholds, int | float | np.floating):
        thresholds = (float(thresholds),)
    out = tuple(float(t) for t in thresholds)
    if not out:
        raise InputError("give at least one matching threshold, e.g. thresholds=(0.5,)")
    for t in out:
        if not (0.0 < t <= 1.0) or math.isnan(t):
            raise InputError(f"matching threshold {t} must be in (0, 1]")
    return out


def _assign(
    rows: np.ndarray, cols: np.ndarray, scores: np.ndarray, n_true: int, n_pred: int
) -> np.ndarray:
    """Indices (into rows/cols/scores) of an optimal one-to-one subset of the candidate pairs.

    Maximises the number of pairs, then the sum of their scores. Candidates whose true and
    predicted objects appear in no other candidate are taken directly (always the case for IoU
    > 0.5); the rest is solved per connected component with the Hungarian algorithm.
    """
    if rows.size == 0:
        return np.zeros(0, np.int64)
    row_deg = np.bincount(rows, minlength=n_true)
    col_deg = np.bincount(cols, minlength=n_pred)
    unique = (row_deg[rows] == 1) & (col_deg[cols] == 1)
    chosen = [np.flatnonzero(unique)]
    rest = np.flatnonzero(~unique)
    if rest.size:
        r, c = rows[rest], cols[rest]
        graph = sparse.coo_array(
            (np.ones(rest.size), (r, c + n_true)), shape=(n_true + n_pred, n_true + n_pred)
        )
        _, comp = connected_components(graph, directed=False)
        comp_of = comp[r]
        order = np.argsort(comp_of, kind="stable")
        bounds = np.flatnonzero(np.diff(comp_of[order])) + 1
        for group in np.split(order, bounds):
            idx = rest[group]
            gr, gc, gs = rows[idx], cols[idx], scores[idx]
            ur, ri = np.unique(gr, return_inverse=True)
            uc, ci = np.unique(gc, return_inverse=True)
            k = min(ur.size, uc.size)
            # Each pair costs -1 - score / (2k): more pairs always win, then a higher score sum.
            cost = np.zeros((ur.size, uc.size))
            cost[ri, ci] = -1.0 - gs / (2.0 * k)
            ti, pi = linear_sum_assignment(cost)
            ok = cost[ti, pi] < 0
            lookup = np.full((ur.size, uc.size), -1, np.int64)
            lookup[ri, ci] = idx
            chosen.append(lookup[ti[ok], pi[ok]])
    return np.sort(np.concatenate(chosen))


def _match_overlap(ov: _Overlap, thresholds: tuple[float, ...], criterion: str) -> list[Matching]:
    all_scores = ov.scores(criterion)
    nt, npred = ov.true_ids.size, ov.pred_ids.size
    out = []
    for thr in thresholds:
        keep = np.flatnonzero(all_scores >= thr)
        sel = keep[_assign(ov.rows[keep], ov.cols[keep], all_scores[keep], nt, npred)]
        s = all_scores[sel]
        out.append(
            Matching(
                threshold=thr,
                criterion=criterion,
                n_true=nt,
                n_pred=npred,
                tp=int(sel.size),
                sum_matched_score=float(s.sum()),
                true_ids=ov.true_ids[ov.rows[sel]],
                pred_ids=ov.pred_ids[ov.cols[sel]],
                scores=s,
            )
        )
    return out


def match(
    truth: np.ndarray,
    pred: np.ndarray,
    *,
    thresholds: float | Iterable[float] = DEFAULT_THRESHOLDS,
    criterion: Criterion = "iou",
) -> list[Matching]:
    """Match the objects of two label images one-to-one at several thresholds.

    Parameters
    ----------
    truth, pred : (Y, X) or (Z, Y, X) ndarray of int
        True and predicted instance labels of the same image, 0 = background. Ids need not be
        consecutive and need not correspond. A (Y, X) image may be compared with a (1, Y, X)
        stack.
    thresholds : float or iterable of float
        Minimum score of a matched pair, each in (0, 1]; default 0.5, 0.55, ..., 0.9.
    criterion : {"iou", "iot", "iop"}
        Pair score: intersection over union (default), over the true or over the predicted area.

    Returns
    -------
    list of Matching
        One per threshold, in the order given.

    Raises
    ------
    InputError
        For label images of different shapes, non-integer labels or bad thresholds.

    Examples
    --------
    >>> t = np.zeros((8, 8), np.int32); t[:4, :4] = 1; t[4:, 4:] = 2
    >>> m = match(t, t * 3, thresholds=0.5)[0]
    >>> m.tp, m.fp, m.fn, m.ap
    (2, 0, 0, 1.0)
    """
    _check_criterion(criterion)
    ths = _check_thresholds(thresholds)
    truth, pred = _check_labels(truth, pred)
    return _match_overlap(_overlap(truth, pred), ths, criterion)


def diameter_errors(truth: np.ndarray, pred: np.ndarray, *, threshold: float = 0.5) -> np.ndarray:
    """Relative error ``d_pred / d_true − 1`` of the equivalent diameter of each matched object.

    Objects: every true object that does not touch the image's Y/X edge (a cut object's size is
    not its own) and that a predicted object matches at IoU ≥ ``threshold``. Equivalent diameter:
    of a circle in 2D (a (1, Y, X) image too), of a sphere in 3D, so the error does not depend
    on the pixel size.

    Examples
    --------
    >>> t = np.zeros((20, 20), np.int32); t[5:15, 5:15] = 1
    >>> p = np.zeros_like(t); p[6:15, 5:14] = 1
    >>> diameter_errors(t, p).round(3).tolist()
    [-0.1]
    """
    m = match(truth, pred, thresholds=threshold)[0]
    truth, pred = _check_labels(truth, pred)
    flat = truth.ndim == 2 or truth.shape[0] == 1
    rims = (truth[..., 0, :], truth[..., -1, :], truth[..., :, 0], truth[..., :, -1])
    edge = np.unique(np.concatenate([rim.ravel() for rim in rims]))
    keep = ~np.isin(m.true_ids, edge)
    true_size = np.bincount(truth.ravel())[m.true_ids[keep]]
    pred_size = np.bincount(pred.ravel())[m.pred_ids[keep]]
    return (pred_size / true_size) ** (0.5 if flat else 1 / 3) - 1.0


def size_bias(errors: Mapping[str, Sequence[float]]) -> float:
    """How far sizes are off on average: the mean over groups (e.g. stages) of the absolute mean
    of each group's :func:`diameter_errors`; NaN when no group has any."""
    means = [abs(float(np.mean(v))) for v in errors.values() if len(v)]
    return float(np.mean(means)) if means else float("nan")


def pool_matchings(results: Sequence[Matching]) -> Matching:
    """Results at one threshold (e.g. of several images) summed into one: pooled counts."""
    first = results[0]
    return Matching(
        threshold=first.threshold,
        criterion=first.criterion,
        n_true=sum(m.n_true for m in results),
        n_pred=sum(m.n_pred for m in results),
        tp=sum(m.tp for m in results),
        sum_matched_score=float(sum(m.sum_matched_score for m in results)),
        n_images=sum(m.n_images for m in results),
    )


#: Kinds of unmatched true objects (false negatives) and of unmatched predictions (false
#: positives) that :func:`error_kinds` tells apart, in the order they are tested.
FN_KINDS: tuple[str, ...] = ("missed", "split", "merged", "outline")
FP_KINDS: tuple[str, ...] = ("spurious", "merged", "fragment", "outline")
#: An object "mostly" covered has at least this fraction of its area on objects of the other image.
MOSTLY = 0.5
#: A "substantial part" of an object is at least this fraction of its area.
PART = 0.2


def error_kinds(
    truth: np.ndarray,
    pred: np.ndarray,
    *,
    threshold: float = 0.5,
    criterion: Criterion = "iou",
) -> dict[str, int]:
    """Why objects went unmatched at one threshold: misses, merges, splits, bad outlines.

    Each false negative (true object left unmatched) is, in this order:

    - ``missed``: less than half (:data:`MOSTLY`) of it lies on predicted objects;
    - ``split``: at least two predicted objects each hold a fifth (:data:`PART`) of it or more;
    - ``merged``: the predicted object holding most of it also holds a fifth or more of another
      true object;
    - ``outline``: one predicted object covers it, but too loosely to match.

    Each false positive (unmatched prediction) is, in this order:

    - ``spurious``: less than half of it lies on true objects, and it holds no fifth of any;
    - ``merged``: it holds a fifth or more of each of two true objects or more;
    - ``fragment``: the true object it lies most on is matched to another prediction, or is
      split (two predictions or more each hold a fifth of it);
    - ``outline``: the loose outline of a true object left unmatched.

    Parameters
    ----------
    truth, pred : (Y, X) or (Z, Y, X) ndarray of int
        As in :func:`match`.
    threshold : float
        The matching threshold in (0, 1].
    criterion : {"iou", "iot", "iop"}

    Returns
    -------
    dict of str to int
        ``fn_<kind>`` for each of :data:`FN_KINDS` and ``fp_<kind>`` for each of
        :data:`FP_KINDS`; the ``fn_*`` counts add up to the matching's ``fn``, the ``fp_*`` ones
        to its ``fp``.

    Examples
    --------
    >>> t = np.repeat(np.arange(1, 4), 4)[None].repeat(8, axis=0)  # three 8 × 4 objects
    >>> e = error_kinds(t, np.ones_like(t))  # predicted as one
    >>> e["fn_merged"], e["fp_merged"], e["fn_missed"]
    (3, 1, 0)
    """
    _check_criterion(criterion)
    (thr,) = _check_thresholds(threshold)
    truth, pred = _check_labels(truth, pred)
    ov = _overlap(truth, pred)
    (m,) = _match_overlap(ov, (thr,), criterion)
    nt, npred = ov.true_ids.size, ov.pred_ids.size
    t_matched = np.isin(ov.true_ids, m.true_ids)
    p_matched = np.isin(ov.pred_ids, m.pred_ids)
    inter = ov.intersection.astype(np.float64)
    t_frac = inter / ov.true_area[ov.rows]  # share of the true object in this pair
    p_frac = inter / ov.pred_area[ov.cols]
    t_cover = np.bincount(ov.rows, t_frac, minlength=nt)
    p_cover = np.bincount(ov.cols, p_frac, minlength=npred)
    big_t = t_frac >= PART  # the pair holds a substantial part of the true object
    t_parts = np.bincount(ov.rows[big_t], minlength=nt)  # predictions holding a part of it
    p_parts = np.bincount(ov.cols[big_t], minlength=npred)  # true objects it holds a part of

    def main_partner(own: np.ndarray, other: np.ndarray, n: int) -> np.ndarray:
        # per object, the object of the other image it overlaps most (-1: none)
        best = np.full(n, -1, np.int64)
        order = np.lexsort((inter, own))  # by object, then by intersection ascending
        own_s, other_s = own[order], other[order]
        last = np.append(own_s[1:] != own_s[:-1], True)[: own_s.size]  # each one's largest
        best[own_s[last]] = other_s[last]
        return best

    t_main = main_partner(ov.rows, ov.cols, nt)
    p_main = main_partner(ov.cols, ov.rows, npred)
    out = {f"fn_{k}": 0 for k in FN_KINDS} | {f"fp_{k}": 0 for k in FP_KINDS}
    for i in np.flatnonzero(~t_matched):
        if t_cover[i] < MOSTLY:
            kind = "missed"
        elif t_parts[i] >= 2:
            kind = "split"
        elif p_parts[t_main[i]] >= 2:
            kind = "merged"
        else:
            kind = "outline"
        out[f"fn_{kind}"] += 1
    for j in np.flatnonzero(~p_matched):
        if p_cover[j] < MOSTLY and p_parts[j] == 0:
            kind = "spurious"
        elif p_parts[j] >= 2:
            kind = "merged"
        elif t_matched[p_main[j]] or t_parts[p_main[j]] >= 2:
            kind = "fragment"
        else:
            kind = "outline"
        out[f"fp_{kind}"] += 1
    return out


def pool_error_kinds(counts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """:func:`error_kinds` results (e.g. of several images) added up, kind by kind.

    Examples
    --------
    >>> pool_error_kinds([{"fn_merged": 1, "fp_spurious": 0}, {"fn_merged": 2, "fp_spurious": 1}])
    {'fn_merged': 3, 'fp_spurious': 1}
    """
    total: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            total[k] = total.get(k, 0) + int(v)
    return total


def match_dataset(
    pairs: Iterable[tuple[np.ndarray, np.ndarray]],
    *,
    thresholds: float | Iterable[float] = DEFAULT_THRESHOLDS,
    criterion: Criterion = "iou",
    by_image: bool = False,
) -> list[Matching] | list[list[Matching]]:
    """Match many images; pooled over the dataset or per image.

    Parameters
    ----------
    pairs : iterable of (truth, pred)
        Label images of each field (any shapes, each pair the same shape).
    thresholds, criterion
        As in :func:`match`.
    by_image : bool
        If False (default), one pooled :class:`Matching` per threshold: tp, fp, fn, object counts
        and matched-score sums are added over images before the ratios are taken (so large images
        weigh more; panoptic quality is pooled the same way). If True, one list per image.

    Returns
    -------
    list of Matching, or list of list of Matching
        Pooled: ``result[k]`` for threshold ``k``. By image: ``result[i][k]``.
    """
    _check_criterion(criterion)
    ths = _check_thresholds(thresholds)
    per_image = [match(t, p, thresholds=ths, criterion=criterion) for t, p in pairs]
    if by_image:
        return per_image
    if not per_image:
        raise InputError("no image pairs to match; give at least one (truth, pred) pair")
    return [pool_matchings([img[k] for img in per_image]) for k in range(len(ths))]


def matching_table(
    results: Sequence[Matching] | Sequence[Sequence[Matching]],
    *,
    names: Sequence[str] | None = None,
) -> pd.DataFrame:
    """A tidy table of matching results: one row per threshold (and image).

    Parameters
    ----------
    results : list of Matching, or list of list of Matching
        From :func:`match` / pooled :func:`match_dataset`, or per-image ``match_dataset``.
    names : sequence of str, optional
        Image names for per-image results (default ``0, 1, ...``), written in column ``image``.

    Returns
    -------
    pandas.DataFrame
        Columns ``[image,] threshold, criterion, n_images, n_true, n_pred, tp, fp, fn, precision,
        recall, f1, accuracy, mean_true_score, mean_matched_score, panoptic_quality``.
    """
    results = list(results)
    if results and not isinstance(results[0], Matching):
        nested = [list(r) for r in results]
        if names is None:
            names = [str(i) for i in range(len(nested))]
        if len(names) != len(nested):
            raise InputError(f"{len(names)} names for {len(nested)} images")
        rows = [
            {"image": n, **m.as_dict()} for n, img in zip(names, nested, strict=True) for m in img
        ]
        columns = ["image", *Matching(0.5, "iou", 0, 0, 0, 0.0).as_dict()]
    else:
        rows = [m.as_dict() for m in results]
        columns = list(Matching(0.5, "iou", 0, 0, 0, 0.0).as_dict())
    return pd.DataFrame(rows, columns=columns)


def match_objects_table(
    true_labels: np.ndarray,
    pred_labels: np.ndarray,
    *,
    threshold: float = 0.5,
    criterion: Criterion = "iou",
    true_measurements: pd.DataFrame | None = None,
    pred_measurements: pd.DataFrame | None = None,
    on: str = "label",
) -> pd.DataFrame:
    """Matched object pairs, to compare per-object measurements (diameters, intensities, ...).

    Parameters
    ----------
    true_labels, pred_labels : (Y, X) or (Z, Y, X) ndarray of int
        True and predicted instance labels.
    threshold : float
        Minimum score of a pair (default IoU 0.5, where matches are unique).
    criterion : {"iou", "iot", "iop"}
        Pair score.
    true_measurements, pred_measurements : pandas.DataFrame, optional
        Per-object tables keyed by column ``on`` (e.g. from ``measure``); their other columns are
        joined to the pairs with suffixes ``_true`` and ``_pred``.
    on : str
        Label column of the measurement tables.

    Returns
    -------
    pandas.DataFrame
        One row per matched pair: ``true_id``, ``pred_id``, the pair's score in a column named
        after ``criterion`` (``iou``) (+ joined measurements), ordered by ``true_id``.
    """
    m = match(true_labels, pred_labels, thresholds=threshold, criterion=criterion)[0]
    order = np.argsort(m.true_ids, kind="stable")
    table = pd.DataFrame(
        {"true_id": m.true_ids[order], "pred_id": m.pred_ids[order], criterion: m.scores[order]}
    )
    for meas, key, suffix in (
        (true_measurements, "true_id", "_true"),
        (pred_measurements, "pred_id", "_pred"),
    ):
        if meas is None:
            continue
        if on not in meas.columns:
            raise InputError(
                f"measurement table has no {on!r} column; its columns are {list(meas.columns)}"
            )
        extra = meas.rename(columns={c: f"{c}{suffix}" for c in meas.columns if c != on})
        extra = extra.rename(columns={on: key})
        extra[key] = extra[key].astype(np.int64)
        table = table.merge(extra, on=key, how="left")
    return table


# -- measurement errors ---------------------------------------------------------------------------
def count_error(truth: Any, pred: Any) -> Any:
    """Signed count error ``pred - truth`` (scalars or arrays).

    Examples
    --------
    >>> count_error(10, 12)
    2.0
    """
    t = np.asarray(truth, dtype=np.float64)
    p = np.asarray(pred, dtype=np.float64)
    if t.shape != p.shape:
        raise InputError(f"truth {t.shape} and predictions {p.shape} differ in shape")
    out = p - t
    return float(out) if out.ndim == 0 else out


def relative_error(truth: Any, pred: Any) -> Any:
    """Signed relative error ``(pred - truth) / |truth|`` (scalars or arrays).

    Where ``truth`` is 0 the result is 0.0 if ``pred`` is 0 too, NaN otherwise.

    Examples
    --------
    >>> relative_error(50.0, 45.0)
    -0.1
    """
    t = np.asarray(truth, dtype=np.float64)
    p = np.asarray(pred, dtype=np.float64)
    if t.shape != p.shape:
        raise InputError(f"truth {t.shape} and predictions {p.shape} differ in shape")
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (p - t) / np.abs(t)
    out = np.where(t == 0, np.where(p == 0, 0.0, np.nan), out)
    return float(out) if out.ndim == 0 else out


def percentage_point_error(true_fraction: Any, pred_fraction: Any) -> Any:
    """Signed error of a fraction in percentage points: ``100 * (pred - truth)``.

    Parameters
    ----------
    true_fraction, pred_fraction : float or array of float
        Fractions in [0, 1] (NaN allowed, propagated).

    Examples
    --------
    >>> round(percentage_point_error(0.40, 0.43), 6)
    3.0
    """
    t = np.asarray(true_fraction, dtype=np.float64)
    p = np.asarray(pred_fraction, dtype=np.float64)
    if t.shape != p.shape:
        raise InputError(f"truth {t.shape} and predictions {p.shape} differ in shape")
    for name, arr in (("true", t), ("predicted", p)):
        finite = arr[np.isfinite(arr)]
        if finite.size and (finite.min() < 0 or finite.max() > 1):
            raise InputError(
                f"{name} fraction outside [0, 1] (range {finite.min()}..{finite.max()}); "
                "give fractions, not percentages"
            )
    out = 100.0 * (p - t)
    return float(out) if out.ndim == 0 else out


def measurement_errors(
    true_values: Mapping[str, float],
    pred_values: Mapping[str, float],
    *,
    fractions: Iterable[str] | None = None,
) -> pd.DataFrame:
    """Errors of named scalar measurements against truth (counts, mean diameters, fractions...).

    Parameters
    ----------
    true_values, pred_values : mapping of str to float
        The same quantity names in both, e.g. ``{"n_cells": 812, "fraction_positive_INS": 0.41}``.
    fractions : iterable of str, optional
        Names of quantities that are fractions in [0, 1] and get a ``percentage_points`` error;
        default: the names starting with ``"fraction"``.

    Returns
    -------
    pandas.DataFrame
        One row per quantity: ``quantity, true, predicted, error, abs_error, relative_error,
        percentage_points`` (NaN for non-fractions).

    Examples
    --------
    >>> t = measurement_errors({"n": 10, "fraction_INS": 0.5}, {"n": 9, "fraction_INS": 0.45})
    >>> t["error"].round(2).tolist(), t["percentage_points"].round(2).tolist()
    ([-1.0, -0.05], [nan, -5.0])
    """
    missing = sorted(set(true_values) ^ set(pred_values))
    if missing:
        raise InputError(
            f"quantities {missing} are only in one of truth and predictions; give the same names"
        )
    frac = (
        {k for k in true_values if str(k).startswith("fraction")}
        if fractions is None
        else set(fractions)
    )
    rows = []
    for key in true_values:
        t, p = float(true_values[key]), float(pred_values[key])
        rows.append(
            {
                "quantity": key,
                "true": t,
                "predicted": p,
                "error": p - t,
                "abs_error": abs(p - t),
                "relative_error": relative_error(t, p),
                "percentage_points": percentage_point_error(t, p) if key in frac else np.nan,
            }
        )
    columns = [
        "quantity",
        "true",
        "predicted",
        "error",
        "abs_error",
        "relative_error",
        "percentage_points",
    ]
    return pd.DataFrame(rows, columns=columns)
