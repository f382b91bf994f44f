"""Tests of islet_imaging.metrics against hand-computed answers."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from islet_imaging.errors import InputError
from islet_imaging.metrics import (
    DEFAULT_THRESHOLDS,
    FN_KINDS,
    FP_KINDS,
    count_error,
    diameter_errors,
    error_kinds,
    iou_matrix,
    match,
    match_dataset,
    match_objects_table,
    matching_table,
    measurement_errors,
    percentage_point_error,
    relative_error,
    size_bias,
)


def _squares() -> np.ndarray:
    """Three 10x10 squares with non-consecutive ids on a 40x40 image."""
    lab = np.zeros((40, 40), np.int32)
    lab[0:10, 0:10] = 3
    lab[20:30, 0:10] = 17
    lab[20:30, 20:30] = 5
    return lab


def test_identical_labels_are_perfect_at_every_threshold() -> None:
    lab = _squares()
    res = match(lab, lab)
    assert [m.threshold for m in res] == list(DEFAULT_THRESHOLDS)
    for m in res:
        assert (m.tp, m.fp, m.fn) == (3, 0, 0)
        assert m.ap == m.precision == m.recall == m.f1 == m.panoptic_quality == 1.0
        assert m.mean_matched_score == m.mean_true_score == 1.0
        assert sorted(m.pairs) == [(3, 3, 1.0), (5, 5, 1.0), (17, 17, 1.0)]


def test_shifted_square_iou_by_hand() -> None:
    truth = np.zeros((20, 30), np.int32)
    pred = np.zeros_like(truth)
    truth[0:10, 0:10] = 1
    pred[0:10, 5:15] = 2  # overlap 50 px, union 150 px -> IoU 1/3
    m, tids, pids = iou_matrix(truth, pred)
    assert tids.tolist() == [1] and pids.tolist() == [2]
    assert m.shape == (1, 1)
    assert m[0, 0] == pytest.approx(50 / 150)
    at03, at04 = match(truth, pred, thresholds=(0.3, 0.4))
    assert (at03.tp, at03.fp, at03.fn) == (1, 0, 0)
    assert at03.ap == 1.0
    assert at03.mean_matched_score == pytest.approx(1 / 3)
    assert at03.panoptic_quality == pytest.approx(1 / 3)
    assert (at04.tp, at04.fp, at04.fn) == (0, 1, 1)
    assert at04.ap == 0.0 and at04.precision == 0.0 and at04.recall == 0.0


def test_iot_and_iop_criteria() -> None:
    truth = np.zeros((10, 10), np.int32)
    pred = np.zeros_like(truth)
    truth[0:4, 0:4] = 1  # 16 px
    pred[0:4, 0:2] = 1  # 8 px inside the true object
    iot = iou_matrix(truth, pred, criterion="iot")[0]
    iop = iou_matrix(truth, pred, criterion="iop")[0]
    assert iot[0, 0] == pytest.approx(0.5)
    assert iop[0, 0] == pytest.approx(1.0)
    assert match(truth, pred, thresholds=0.9, criterion="iop")[0].tp == 1
    assert match(truth, pred, thresholds=0.9, criterion="iou")[0].tp == 0


def test_split_object() -> None:
    truth = np.zeros((10, 20), np.int32)
    truth[0:10, 0:20] = 1  # 200 px
    pred = np.zeros_like(truth)
    pred[:, 0:12] = 1  # IoU 120/200 = 0.6
    pred[:, 12:20] = 2  # IoU 80/200 = 0.4
    m05, m03 = match(truth, pred, thresholds=(0.5, 0.3))
    assert (m05.tp, m05.fp, m05.fn) == (1, 1, 0)
    assert m05.pairs == [(1, 1, pytest.approx(0.6))]
    assert m05.precision == 0.5 and m05.recall == 1.0
    assert m05.ap == pytest.approx(1 / 2)
    # At 0.3 both predictions qualify but only one can be matched: the better one.
    assert (m03.tp, m03.fp, m03.fn) == (1, 1, 0)
    assert m03.pairs[0][1] == 1


def test_merged_objects() -> None:
    truth = np.zeros((10, 20), np.int32)
    truth[:, 0:10] = 1
    truth[:, 10:20] = 2
    pred = (truth > 0).astype(np.int32) * 9  # one object covering both: IoU 0.5 with each
    m05, m06 = match(truth, pred, thresholds=(0.5, 0.6))
    assert (m05.tp, m05.fp, m05.fn) == (1, 0, 1)
    assert m05.ap == pytest.approx(1 / 2)
    assert m05.f1 == pytest.approx(2 / 3)
    assert (m06.tp, m06.fp, m06.fn) == (0, 1, 2)


def _error_scene() -> tuple[np.ndarray, np.ndarray]:
    """One object of every error kind, 10 × 10 px true objects, exact by construction."""
    truth = np.zeros((40, 100), np.int32)
    pred = np.zeros_like(truth)
    truth[0:10, 0:10] = 1
    pred[0:10, 0:10] = 11  # matched exactly
    truth[0:10, 15:25] = 2  # missed: nothing predicted there
    truth[0:10, 30:42] = 3  # split in three thirds (IoU 1/3 each)
    pred[0:10, 30:34], pred[0:10, 34:38], pred[0:10, 38:42] = 31, 32, 33
    truth[0:10, 50:60], truth[0:10, 60:70] = 4, 5  # merged: one 10 × 22 prediction over both
    pred[0:10, 50:72] = 45  # IoU 100/220 with each, so neither matches
    truth[20:30, 4:14] = 6  # outline: inside an 18 × 18 prediction (IoU 100/324)
    pred[16:34, 0:18] = 66
    pred[20:30, 80:90] = 77  # spurious: on background
    truth[20:30, 40:50] = 7  # matched (IoU 0.8) by one prediction; a second one holds the rest
    pred[20:30, 40:48], pred[20:30, 48:50] = 71, 72  # 72: a fragment, though no fifth of it
    return truth, pred


def test_error_kinds_name_each_unmatched_object() -> None:
    truth, pred = _error_scene()
    e = error_kinds(truth, pred, threshold=0.5)
    assert e == {
        "fn_missed": 1, "fn_split": 1, "fn_merged": 2, "fn_outline": 1,
        "fp_spurious": 1, "fp_merged": 1, "fp_fragment": 4, "fp_outline": 1,
    }  # fmt: skip
    (m,) = match(truth, pred, thresholds=0.5)
    assert sum(e[f"fn_{k}"] for k in FN_KINDS) == m.fn == 5
    assert sum(e[f"fp_{k}"] for k in FP_KINDS) == m.fp == 7
    # at IoU 0.3 the outline matches (0.31) and so does each third of the split (0.33)
    e3 = error_kinds(truth, pred, threshold=0.3)
    assert (e3["fn_outline"], e3["fp_outline"], e3["fn_split"], e3["fp_fragment"]) == (0, 0, 0, 3)
    # nothing left unmatched, nothing to explain; ids need not correspond
    assert set(error_kinds(truth, truth * 7).values()) == {0}
    # no overlap at all: every true object missed, every prediction spurious
    empty = np.zeros_like(truth)
    assert error_kinds(truth, empty)["fn_missed"] == 7
    assert error_kinds(empty, pred)["fp_spurious"] == len(np.unique(pred)) - 1
    assert set(error_kinds(empty, empty).values()) == {0}
    with pytest.raises(InputError):
        error_kinds(truth, pred, threshold=0.0)


def test_optimal_assignment_beats_greedy_below_half() -> None:
    # True A overlaps preds x (IoU 10/27) and y (6/20); true B overlaps only x (7/30).
    # Greedy by score would take A-x and leave B unmatched; the optimum matches A-y and B-x.
    truth = np.zeros((1, 200), np.int32)
    pred = np.zeros_like(truth)
    truth[0, 0:20] = 1  # A
    truth[0, 100:120] = 2  # B
    pred[0, 0:10] = 10  # x: 10 px inside A
    pred[0, 100:107] = 10  # x also 7 px inside B (non-contiguous object)
    pred[0, 10:16] = 11  # y: 6 px inside A
    m, _, _ = iou_matrix(truth, pred)
    dense = m.toarray()
    np.testing.assert_allclose(dense, [[10 / 27, 6 / 20], [7 / 30, 0.0]])
    res = match(truth, pred, thresholds=0.2)[0]
    assert res.tp == 2
    assert sorted((t, p) for t, p, _ in res.pairs) == [(1, 11), (2, 10)]


def test_permuted_ids_give_same_scores() -> None:
    rng = np.random.default_rng(0)
    truth = _squares()
    pred = np.zeros_like(truth)
    pred[1:11, 0:10] = 1
    pred[20:30, 2:12] = 2
    pred[25:35, 20:30] = 3
    pred[35:40, 35:40] = 4
    base = [m.as_dict() for m in match(truth, pred)]
    ids = rng.permutation(np.arange(1, 5)) * 1000 + 7
    lut = np.concatenate([[0], ids])
    permuted = [m.as_dict() for m in match(truth, lut[pred])]
    assert base == permuted
    swapped = [m.as_dict() for m in match(lut[pred], truth)]
    for a, b in zip(base, swapped, strict=True):
        assert (a["tp"], a["fp"], a["fn"]) == (b["tp"], b["fn"], b["fp"])


def test_single_plane_stack_matches_2d() -> None:
    lab = _squares()
    res = match(lab, lab[np.newaxis], thresholds=0.5)[0]
    assert (res.tp, res.fp, res.fn) == (3, 0, 0)
    with pytest.raises(InputError, match="differ in shape"):
        match(lab, np.stack([lab, lab]))


def test_3d_labels() -> None:
    truth = np.zeros((6, 10, 10), np.uint16)
    truth[0:4, 0:5, 0:5] = 1  # 100 voxels
    truth[0:6, 6:10, 6:10] = 2  # 96 voxels
    pred = np.zeros_like(truth)
    pred[1:5, 0:5, 0:5] = 4  # overlap 75 -> IoU 75/125 = 0.6
    m = match(truth, pred, thresholds=(0.55, 0.65))
    assert (m[0].tp, m[0].fp, m[0].fn) == (1, 0, 1)
    assert m[0].scores[0] == pytest.approx(0.6)
    assert m[1].tp == 0


def test_panoptic_quality_by_hand() -> None:
    truth = np.zeros((30, 30), np.int32)
    pred = np.zeros_like(truth)
    truth[0:10, 0:10] = 1
    pred[0:10, 0:10] = 1  # IoU 1
    truth[15:25, 0:10] = 2
    pred[15:25, 0:8] = 2  # IoU 0.8
    truth[0:5, 20:25] = 3  # missed
    pred[20:25, 20:25] = 3  # false positive
    m = match(truth, pred, thresholds=0.5)[0]
    assert (m.tp, m.fp, m.fn) == (2, 1, 1)
    assert m.panoptic_quality == pytest.approx((1.0 + 0.8) / (2 + 0.5 + 0.5))
    assert m.mean_true_score == pytest.approx(1.8 / 3)
    assert m.mean_matched_score == pytest.approx(0.9)


def test_pooled_vs_per_image() -> None:
    a = _squares()
    b = np.zeros_like(a)
    b[0:10, 0:10] = 1  # one of three found
    c = np.zeros((16, 16), np.int32)
    c[2:6, 2:6] = 1
    d = np.zeros_like(c)
    d[2:6, 2:6] = 5
    d[10:14, 10:14] = 6  # one extra
    per = match_dataset([(a, b), (c, d)], thresholds=(0.5, 0.9), by_image=True)
    pooled = match_dataset([(a, b), (c, d)], thresholds=(0.5, 0.9))
    assert len(per) == 2 and len(per[0]) == 2
    for k in range(2):
        assert pooled[k].tp == per[0][k].tp + per[1][k].tp == 2
        assert pooled[k].fp == per[0][k].fp + per[1][k].fp == 1
        assert pooled[k].fn == per[0][k].fn + per[1][k].fn == 2
        assert pooled[k].n_images == 2
        assert pooled[k].ap == pytest.approx(2 / 5)
        assert pooled[k].panoptic_quality == pytest.approx(2 / (2 + 1.5))
    table = matching_table(per, names=["a", "c"])
    assert list(table["image"]) == ["a", "a", "c", "c"]
    assert table.loc[table["image"] == "c", "fp"].tolist() == [1, 1]
    pooled_table = matching_table(pooled)
    assert len(pooled_table) == 2 and "image" not in pooled_table
    assert pooled_table["tp"].tolist() == [2, 2]


def test_empty_images() -> None:
    empty = np.zeros((8, 8), np.int32)
    one = empty.copy()
    one[2:4, 2:4] = 1
    both = match(empty, empty, thresholds=0.5)[0]
    assert (both.tp, both.fp, both.fn) == (0, 0, 0)
    assert both.ap == both.precision == both.recall == both.f1 == both.panoptic_quality == 1.0
    no_pred = match(one, empty, thresholds=0.5)[0]
    assert (no_pred.fn, no_pred.ap, no_pred.recall, no_pred.precision) == (1, 0.0, 0.0, 0.0)
    no_truth = match(empty, one, thresholds=0.5)[0]
    assert (no_truth.fp, no_truth.ap, no_truth.precision) == (1, 0.0, 0.0)
    m, t, p = iou_matrix(empty, empty)
    assert m.shape == (0, 0) and t.size == 0 and p.size == 0


@pytest.mark.parametrize(
    ("truth", "pred", "message"),
    [
        (np.zeros((4, 4), np.int32), np.zeros((4, 5), np.int32), "differ in shape"),
        (np.zeros((4, 4), np.float32), np.zeros((4, 4), np.int32), "skimage.measure.label"),
        (np.zeros((4, 4), bool), np.zeros((4, 4), np.int32), "skimage.measure.label"),
        (np.zeros(4, np.int32), np.zeros(4, np.int32), r"\(Y, X\) or \(Z, Y, X\)"),
        (np.full((4, 4), -1, np.int32), np.zeros((4, 4), np.int32), "negative"),
    ],
)
def test_bad_labels(truth: np.ndarray, pred: np.ndarray, message: str) -> None:
    with pytest.raises(InputError, match=message):
        match(truth, pred)


def test_bad_thresholds_and_criterion() -> None:
    lab = _squares()
    with pytest.raises(InputError, match=r"\(0, 1\]"):
        match(lab, lab, thresholds=(0.0,))
    with pytest.raises(InputError, match="criterion"):
        match(lab, lab, criterion="dice")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="no image pairs"):
        match_dataset([])


def test_huge_label_values() -> None:
    truth = np.zeros((5, 5), np.uint64)
    truth[0:2, 0:2] = 2**60
    truth[3:5, 3:5] = 5
    pred = np.zeros((5, 5), np.int64)
    pred[0:2, 0:2] = 1
    m = match(truth, pred, thresholds=0.5)[0]
    assert m.pairs == [(2**60, 1, 1.0)]
    assert m.fn == 1


def test_large_image_is_fast() -> None:
    # ~4000 objects on 1024 x 1024: the contingency must stay sparse and quick.
    lab = np.zeros((1024, 1024), np.int32)
    k = 0
    for y in range(0, 1024, 16):
        for x in range(0, 1024, 16):
            k += 1
            lab[y : y + 12, x : x + 12] = k
    shifted = np.roll(lab, 1, axis=1)
    start = time.perf_counter()
    res = match(lab, shifted, thresholds=(0.1, 0.5, 0.9))
    elapsed = time.perf_counter() - start
    assert res[1].tp == k and res[1].n_true == k
    assert res[2].tp == 0
    assert elapsed < 5.0


def test_match_objects_table_joins_measurements() -> None:
    truth = _squares()
    pred = np.zeros_like(truth)
    pred[0:10, 0:10] = 8
    pred[20:30, 22:32] = 9  # IoU 80/120 with true 5
    tm = pd.DataFrame({"label": [3, 5, 17], "diameter": [11.0, 12.0, 13.0]})
    pm = pd.DataFrame({"label": [8, 9], "diameter": [11.5, 10.0]})
    table = match_objects_table(truth, pred, true_measurements=tm, pred_measurements=pm)
    assert table["true_id"].tolist() == [3, 5]
    assert table["pred_id"].tolist() == [8, 9]
    assert table["iou"].tolist() == pytest.approx([1.0, 80 / 120])
    assert table["diameter_true"].tolist() == [11.0, 12.0]
    assert table["diameter_pred"].tolist() == [11.5, 10.0]
    with pytest.raises(InputError, match="no 'label' column"):
        match_objects_table(truth, pred, true_measurements=tm.rename(columns={"label": "id"}))


def test_measurement_errors() -> None:
    assert count_error(10, 12) == 2.0
    assert count_error([1, 2], [1, 4]).tolist() == [0.0, 2.0]
    assert relative_error(50.0, 45.0) == pytest.approx(-0.1)
    assert relative_error(0.0, 0.0) == 0.0
    assert np.isnan(relative_error(0.0, 1.0))
    assert percentage_point_error(0.40, 0.43) == pytest.approx(3.0)
    with pytest.raises(InputError, match="percentages"):
        percentage_point_error(40.0, 43.0)
    with pytest.raises(InputError, match="differ in shape"):
        count_error([1, 2], [1, 2, 3])
    table = measurement_errors(
        {"n_cells": 100, "fraction_positive_INS": 0.5, "mean_diameter_um": 80.0},
        {"n_cells": 90, "fraction_positive_INS": 0.45, "mean_diameter_um": 88.0},
    )
    rows = table.set_index("quantity")
    assert rows.loc["n_cells", "error"] == -10.0
    assert rows.loc["n_cells", "relative_error"] == pytest.approx(-0.1)
    assert rows.loc["fraction_positive_INS", "percentage_points"] == pytest.approx(-5.0)
    assert np.isnan(rows.loc["mean_diameter_um", "percentage_points"])
    assert rows.loc["mean_diameter_um", "abs_error"] == 8.0
    with pytest.raises(InputError, match="only in one"):
        measurement_errors({"a": 1.0}, {"b": 1.0})


def test_diameter_errors_of_matched_objects_away_from_the_edge() -> None:
    """2D: a 20 px square predicted as 16 × 20 (diameter ×√0.8), one at the edge predicted
    half its size (ignored: cut by the edge), one not predicted (unmatched: ignored). 3D: a
    cube predicted with 8 of its 10 planes (diameter ×∛0.8)."""
    truth = np.zeros((60, 80), np.int32)
    pred = np.zeros_like(truth)
    truth[10:30, 10:30] = 1
    pred[12:28, 10:30] = 5
    truth[0:20, 50:70] = 2  # at the edge
    pred[0:10, 50:70] = 6
    truth[40:55, 40:55] = 3  # missed
    np.testing.assert_allclose(diameter_errors(truth, pred), [np.sqrt(0.8) - 1])
    np.testing.assert_allclose(diameter_errors(truth[None], pred[None]), [np.sqrt(0.8) - 1])
    cube = np.zeros((12, 30, 30), np.int32)
    cube[1:11, 5:25, 5:25] = 1
    shorter = np.where(np.arange(12)[:, None, None] < 9, cube, 0)
    np.testing.assert_allclose(diameter_errors(cube, shorter), [np.cbrt(0.8) - 1])
    assert diameter_errors(truth, np.zeros_like(truth)).size == 0


def test_size_bias_is_the_mean_absolute_bias_of_the_groups() -> None:
    assert size_bias({"S4": [0.02, 0.04], "S6": [-0.01, -0.03], "S5": []}) == pytest.approx(0.025)
    assert np.isnan(size_bias({"S4": []}))
