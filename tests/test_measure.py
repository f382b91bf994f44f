"""Per-object measurements on small hand-built arrays with known answers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from islet_imaging.errors import InputError
from islet_imaging.measure import (
    RICORDI_CLASSES,
    Threshold,
    background_levels,
    call_positive,
    cell_cluster_ids,
    cluster_composition,
    control_threshold,
    cytoplasm_labels,
    feret_diameters,
    find_threshold,
    fit_gmm_1d,
    ieq_continuous,
    ieq_ricordi,
    measure_cells,
    measure_clusters,
    parse_threshold_method,
    ricordi_class,
)


def disc(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


# -- IEQ ---------------------------------------------------------------------------------------
def test_disc_ieq_matches_its_diameter() -> None:
    lab = np.zeros((1, 240, 240), np.int32)
    lab[0][disc((240, 240), (120, 120), 100)] = 1
    t = measure_clusters(lab, spacing=1.5)
    d = float(t.loc[0, "equivalent_diameter_um"])
    assert d == pytest.approx(300.0, rel=2e-3)
    assert float(t.loc[0, "area_um2"]) == pytest.approx(math.pi * 150.0**2, rel=4e-3)
    assert float(t.loc[0, "ieq"]) == pytest.approx(8.0, rel=6e-3)  # (300 / 150)^3
    assert float(t.loc[0, "ieq_ricordi"]) == 10.352  # 300–350 µm class
    assert t.loc[0, "ricordi_class"] == "300-350"
    assert not bool(t.loc[0, "touches_border"])
    assert math.isnan(float(t.loc[0, "volume_um3"]))


@pytest.mark.parametrize(
    ("diameter", "expected"),
    [
        (0.0, 0.0),
        (49.999, 0.0),
        (50.0, 0.167),
        (99.999, 0.167),
        (100.0, 0.648),
        (149.9, 0.648),
        (150.0, 1.685),
        (200.0, 3.5),
        (250.0, 6.315),
        (300.0, 10.352),
        (349.9, 10.352),
        (350.0, 15.833),
        (1000.0, 15.833),
    ],
)
def test_ricordi_class_boundaries(diameter: float, expected: float) -> None:
    assert ieq_ricordi(diameter) == expected


def test_ricordi_table_and_continuous_ieq() -> None:
    assert [c[2] for c in RICORDI_CLASSES] == [0.167, 0.648, 1.685, 3.5, 6.315, 10.352, 15.833]
    assert ieq_continuous(150.0) == 1.0
    assert ieq_continuous(75.0) == pytest.approx(0.125)
    out = ieq_ricordi(np.array([np.nan, 60.0]))
    assert math.isnan(out[0]) and out[1] == 0.167
    assert ricordi_class([10.0, 120.0, 400.0]).tolist() == ["<50", "100-150", ">=350"]
    with pytest.raises(ValueError, match="non-negative"):
        ieq_continuous(-1.0)


# -- cluster geometry --------------------------------------------------------------------------
def test_feret_of_rectangle_with_anisotropic_pixels() -> None:
    mask = np.zeros((20, 60), bool)
    mask[5:15, 10:50] = True  # 10 rows x 40 columns
    fmax, fmin = feret_diameters(mask, (2.0, 1.0))  # 20 µm x 40 µm
    assert fmin == pytest.approx(20.0, abs=1e-9)
    assert 40.0 <= fmax <= math.hypot(40.0, 20.0)
    fmax1, fmin1 = feret_diameters(np.ones((1, 1), bool), 1.0)
    assert fmax1 == pytest.approx(1.0) and fmin1 == pytest.approx(math.sqrt(0.5))


def test_disc_shape_features() -> None:
    lab = np.zeros((1, 120, 120), np.int32)
    lab[0][disc((120, 120), (60, 60), 40)] = 1
    t = measure_clusters(lab, spacing=0.5)
    assert float(t.loc[0, "feret_max_um"]) == pytest.approx(40.5, abs=0.6)  # (2r + 1) px
    assert float(t.loc[0, "feret_min_um"]) == pytest.approx(40.5, abs=0.8)
    assert float(t.loc[0, "circularity"]) == pytest.approx(1.0, abs=0.03)
    assert float(t.loc[0, "solidity"]) == pytest.approx(1.0, abs=0.02)


def test_square_circularity_and_l_shape_solidity() -> None:
    lab = np.zeros((1, 100, 100), np.int32)
    lab[0, 10:50, 10:50] = 1  # square
    lab[0, 60:90, 60:70] = 2  # L: 30x10 bar + 10x20 foot
    lab[0, 80:90, 70:90] = 2
    t = measure_clusters(lab, spacing=1.0).set_index("cluster_id")
    assert 0.76 < float(t.loc[1, "circularity"]) < 0.84  # π/4 with corners rounded by 1 px
    assert float(t.loc[1, "solidity"]) == pytest.approx(1.0)
    assert float(t.loc[2, "solidity"]) < 0.8


def test_ball_volume_with_anisotropic_spacing() -> None:
    spacing = (2.0, 0.5, 0.5)
    radius_um = 20.0
    zz, yy, xx = np.mgrid[:30, :120, :120]
    zum, yum, xum = (zz - 15) * spacing[0], (yy - 60) * spacing[1], (xx - 60) * spacing[2]
    ball = zum**2 + yum**2 + xum**2 <= radius_um**2
    t = measure_clusters(ball.astype(np.int32), spacing=spacing)
    assert float(t.loc[0, "volume_um3"]) == pytest.approx(4 / 3 * math.pi * radius_um**3, rel=0.02)
    assert float(t.loc[0, "equivalent_diameter_um"]) == pytest.approx(40.0, rel=0.01)
    assert math.isnan(float(t.loc[0, "area_um2"]))
    assert float(t.loc[0, "circularity"]) == pytest.approx(1.0, abs=0.04)  # sphericity
    assert float(t.loc[0, "feret_max_um"]) == pytest.approx(40.5, abs=1.5)
    assert 0.9 < float(t.loc[0, "solidity"]) <= 1.0
    cup = ball.copy()
    cup[:, 60:, 40:80] = False  # cut a deep notch: far from convex
    t2 = measure_clusters(cup.astype(np.int32), spacing=spacing)
    assert float(t2.loc[0, "solidity"]) < 0.85
    assert not bool(t.loc[0, "touches_border"]) and not bool(t.loc[0, "touches_z_border"])


def test_ball_cut_by_the_stack_is_sized_by_its_projection() -> None:
    # a 60 µm ball seen through a 10 µm slab around its equator (5 planes 2 µm apart)
    spacing = (2.0, 0.5, 0.5)
    zz, yy, xx = np.mgrid[:5, :160, :160]
    zum, yum, xum = (zz - 2) * spacing[0], (yy - 80) * spacing[1], (xx - 80) * spacing[2]
    slab = (zum**2 + yum**2 + xum**2 <= 30.0**2).astype(np.int32)
    t = measure_clusters(slab, spacing=spacing)
    assert bool(t.loc[0, "touches_z_border"])
    # the volume is the slab's (a sphere of that volume would be 37 µm across) ...
    slab_volume = math.pi * (30.0**2 * 10.0 - 10.0**3 / 12.0)
    assert float(t.loc[0, "volume_um3"]) == pytest.approx(slab_volume, rel=0.03)
    # ... but the size and IEQ are the ball's: its widest section, seen from above
    assert float(t.loc[0, "equivalent_diameter_um"]) == pytest.approx(60.0, rel=0.01)
    assert float(t.loc[0, "ieq"]) == pytest.approx((60.0 / 150.0) ** 3, rel=0.03)
    # the same ball whole inside a deeper stack is sized by its volume, as before
    zz, yy, xx = np.mgrid[:40, :160, :160]
    zum, yum, xum = (zz - 20) * spacing[0], (yy - 80) * spacing[1], (xx - 80) * spacing[2]
    whole = (zum**2 + yum**2 + xum**2 <= 30.0**2).astype(np.int32)
    t = measure_clusters(whole, spacing=spacing, shape_features=False)
    assert not bool(t.loc[0, "touches_z_border"])
    assert float(t.loc[0, "equivalent_diameter_um"]) == pytest.approx(60.0, rel=0.01)


def test_touches_border_2d_and_3d() -> None:
    lab = np.zeros((1, 50, 50), np.int32)
    lab[0, 0:5, 20:25] = 1  # top edge
    lab[0, 20:25, 45:50] = 2  # right edge
    lab[0, 20:25, 20:25] = 3  # interior
    t = measure_clusters(lab, spacing=1.0).set_index("cluster_id")
    assert t["touches_border"].tolist() == [True, True, False]
    assert t["edge_weight"].tolist()[:2] == [0.0, 0.0]
    assert float(t.loc[3, "edge_weight"]) == pytest.approx(2500 / (45 * 45))
    stack = np.zeros((4, 30, 30), np.int32)
    stack[0:2, 10:15, 10:15] = 1  # first plane, inside in XY
    stack[1:3, 0:5, 10:15] = 2  # XY edge
    t3 = measure_clusters(stack, spacing=(2.0, 1.0, 1.0)).set_index("cluster_id")
    assert t3["touches_border"].tolist() == [False, True]
    assert t3["touches_z_border"].tolist() == [True, False]


def test_extra_cluster_properties() -> None:
    lab = np.zeros((1, 30, 30), np.int32)
    lab[0, 5:10, 5:20] = 4
    t = measure_clusters(lab, spacing=1.0, extra_properties={"height_px": lambda m: m.shape[1]})
    assert t["height_px"].tolist() == [5]


def test_empty_cluster_labels_give_empty_table() -> None:
    t = measure_clusters(np.zeros((1, 10, 10), np.int32), spacing=1.0)
    assert len(t) == 0
    assert {"cluster_id", "equivalent_diameter_um", "ieq", "touches_border"} <= set(t.columns)


# -- cells -------------------------------------------------------------------------------------
def test_cluster_id_by_majority_of_nucleus_pixels() -> None:
    nuc = np.zeros((1, 20, 20), np.int32)
    nuc[0, 5:10, 4:14] = 1  # 50 px: 30 in cluster 2, 20 in cluster 1
    nuc[0, 15:18, 15:18] = 2  # outside clusters
    clu = np.zeros_like(nuc)
    clu[0, :, :8] = 1
    clu[0, :12, 8:14] = 2
    ids = cell_cluster_ids(nuc, clu)
    assert ids.tolist() == [0, 2, 0]


def test_cytoplasm_ring_on_hand_built_cell() -> None:
    nuc = np.zeros((1, 40, 40), np.int32)
    nucleus = disc((40, 40), (20, 20), 5)
    nuc[0][nucleus] = 7
    clu = np.zeros_like(nuc)
    clu[0, :, :23] = 3  # the cluster ends 3 px right of the nucleus centre
    cyto = cytoplasm_labels(nuc, clu, spacing=1.0, cytoplasm_um=3.0)
    yy, xx = np.mgrid[:40, :40]
    dist_ok = (yy - 20) ** 2 + (xx - 20) ** 2 <= 8.5**2  # within ~3 px of the nucleus edge
    assert set(np.unique(cyto)) == {0, 7}
    ring = cyto[0] == 7
    assert not (ring & nucleus).any()  # nucleus removed
    assert not ring[:, 23:].any()  # clipped to the cluster
    assert (ring <= dist_ok).all()
    assert ring[20, 12:15].all() and ring[12:15, 20].all()  # reaches ~3 px out on the left / top
    assert not ring[20, 11]  # but not 4 px


def test_cell_intensities_by_compartment() -> None:
    nuc = np.zeros((1, 40, 40), np.int32)
    nucleus = disc((40, 40), (20, 20), 5)
    nuc[0][nucleus] = 1
    clu = np.zeros_like(nuc)
    clu[0, 8:32, 8:32] = 1
    cyto = cytoplasm_labels(nuc, clu, spacing=1.0, cytoplasm_um=3.0)[0] > 0
    ins = np.where(cyto, 100.0, 0.0)[np.newaxis]  # cytoplasmic marker
    nkx = np.where(nucleus, 50.0, 0.0)[np.newaxis]  # nuclear marker
    t = measure_cells(
        nuc,
        clu,
        {"INS": ins, "NKX6.1": nkx},
        spacing=1.0,
        compartments={"INS": "cytoplasmic", "NKX6.1": "nuclear"},
        cytoplasm_um=3.0,
        background="none",
    )
    row = t.iloc[0]
    assert row["cell_id"] == 1 and row["cluster_id"] == 1
    assert row["mean_INS"] == pytest.approx(100.0) and row["median_INS"] == pytest.approx(100.0)
    assert row["integrated_INS"] == pytest.approx(100.0 * cyto.sum())
    assert row["mean_NKX6.1"] == pytest.approx(50.0)
    assert row["n_voxels"] == nucleus.sum() and row["n_voxels_cytoplasm"] == cyto.sum()
    assert row["area_um2"] == pytest.approx(nucleus.sum())
    assert row["equivalent_diameter_um"] == pytest.approx(2 * math.sqrt(nucleus.sum() / math.pi))


def test_local_background_correction() -> None:
    # two clusters on a background that is 10 on the left half and 40 on the right half
    shape = (1, 80, 160)
    nuc = np.zeros(shape, np.int32)
    clu = np.zeros(shape, np.int32)
    for i, cx in enumerate((40, 120), start=1):
        clu[0][disc(shape[1:], (40, cx), 15)] = i
        nuc[0][disc(shape[1:], (40, cx), 4)] = i
    offset = np.where(np.arange(160) < 80, 10.0, 40.0)[None, None, :] * np.ones(shape)
    img = offset + np.where(clu > 0, 100.0, 0.0)
    levels, field_value = background_levels(img, clu, spacing=1.0, nuclei=nuc)
    assert levels[1] == pytest.approx(10.0) and levels[2] == pytest.approx(40.0)
    assert 10.0 <= field_value <= 40.0 and levels[0] == field_value
    t = measure_cells(
        nuc, clu, {"INS": img}, spacing=1.0, compartments={"INS": "cytoplasmic"}, cytoplasm_um=4.0
    )
    assert t["mean_INS"].tolist() == pytest.approx([100.0, 100.0])
    assert t["background_INS"].tolist() == pytest.approx([10.0, 40.0])
    glob = measure_cells(nuc, clu, {"INS": img}, spacing=1.0, background="global")
    assert glob["mean_INS"].tolist() != pytest.approx([100.0, 100.0])  # one value cannot fit both
    fixed = measure_cells(nuc, clu, {"INS": img}, spacing=1.0, background={"INS": 10.0})
    assert fixed["mean_INS"].tolist() == pytest.approx([100.0, 130.0])


def test_3d_cells_with_anisotropic_spacing() -> None:
    zz, yy, xx = np.mgrid[:10, :40, :40]
    ball = ((zz - 5) * 2.0) ** 2 + ((yy - 20) * 0.5) ** 2 + ((xx - 20) * 0.5) ** 2 <= 4.0**2
    nuc = ball.astype(np.int32)
    clu = np.zeros_like(nuc)
    clu[1:9, 4:36, 4:36] = 1
    img = np.where(clu > 0, 5.0, 1.0)
    t = measure_cells(
        nuc, clu, {"INS": img}, spacing=(2.0, 0.5, 0.5), compartments={"INS": "cytoplasmic"}
    )
    assert float(t.loc[0, "volume_um3"]) == pytest.approx(ball.sum() * 0.5, rel=1e-9)
    assert float(t.loc[0, "equivalent_diameter_um"]) == pytest.approx(8.0, rel=0.05)
    assert math.isnan(float(t.loc[0, "area_um2"]))
    assert float(t.loc[0, "mean_INS"]) == pytest.approx(4.0)  # 5 inside minus background 1


def test_empty_labels_give_empty_cell_table() -> None:
    t = measure_cells(
        np.zeros((1, 30, 30), np.int32),
        np.zeros((1, 30, 30), np.int32),
        {"INS": np.ones((30, 30))},
        spacing=1.0,
        compartments={"INS": "cytoplasmic"},
    )
    assert len(t) == 0 and "mean_INS" in t


@pytest.mark.parametrize(
    ("nuclei", "clusters", "image", "match"),
    [
        (np.zeros((10, 10), float), np.zeros((10, 10), int), np.zeros((10, 10)), "integers"),
        (np.zeros((10, 10), bool), np.zeros((10, 10), int), np.zeros((10, 10)), "boolean"),
        (np.zeros((10, 10), int), np.zeros((10, 12), int), np.zeros((10, 10)), "differ in shape"),
        (np.zeros((10, 10), int), np.zeros((10, 10), int), np.zeros((10, 11)), "shape"),
        (-np.ones((10, 10), int), np.zeros((10, 10), int), np.zeros((10, 10)), "negative"),
    ],
)
def test_bad_inputs_raise_input_error(nuclei, clusters, image, match) -> None:
    with pytest.raises(InputError, match=match):
        measure_cells(nuclei, clusters, {"INS": image}, spacing=1.0)


def test_bad_spacing_and_compartment() -> None:
    lab = np.zeros((10, 10), np.int32)
    with pytest.raises(InputError, match="positive"):
        measure_clusters(lab, spacing=(1.0, 0.0))
    with pytest.raises(InputError, match="no pixel size"):
        measure_clusters(lab, spacing=None)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="compartment"):
        measure_cells(lab, lab, {"INS": lab}, spacing=1.0, compartments={"INS": "membrane"})


# -- positivity --------------------------------------------------------------------------------
def bimodal(rng: np.random.Generator, n_neg: int, n_pos: int) -> np.ndarray:
    return np.concatenate([rng.normal(0.0, 5.0, n_neg), rng.lognormal(np.log(300), 0.3, n_pos)])


@pytest.mark.parametrize("method", ["otsu", "gmm"])
@pytest.mark.parametrize("n_pos", [60, 300, 700])
def test_automatic_thresholds_separate_two_populations(method: str, n_pos: int) -> None:
    rng = np.random.default_rng(1)
    v = bimodal(rng, 1000 - n_pos, n_pos)
    t = find_threshold(v, marker="INS", method=method)
    assert not t.unimodal and t.separation > 4
    called = (v > t.value).sum()
    assert abs(called - n_pos) <= 0.01 * len(v)
    assert t.method == method and t.n_cells == 1000


def test_unimodal_data_are_flagged(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(2)
    v = rng.normal(0.0, 5.0, 800)  # a negative control: noise only
    t = find_threshold(v, marker="INS")
    assert t.unimodal and t.separation < 3
    assert "unimodal" in t.note
    assert any("unimodal" in r.message for r in caplog.records)


@pytest.mark.parametrize(
    ("raw", "policy", "expected"),
    [
        ((150.0, 20.0, 0), "sbr", 0.0),  # negative control: raw ≈ 1.5 × background → none
        ((800.0, 120.0, 0), "sbr", 1.0),  # every cell ≈ 8 × background → all positive
        ((150.0, 20.0, 0), "nan", None),
    ],
)
def test_unimodal_policy(
    raw: tuple[float, float, int], policy: str, expected: float | None
) -> None:
    rng = np.random.default_rng(4)
    mean, sd, n_dim = raw
    background = np.full(400, 100.0)
    v = np.concatenate([rng.normal(mean, sd, 400 - n_dim), rng.normal(150.0, 20.0, n_dim)])
    v = v - background  # background-corrected
    t = find_threshold(v, marker="X", background=background, on_unimodal=policy)
    assert t.unimodal
    if expected is None:
        assert math.isnan(t.value) and "missing" in t.note
    else:
        assert t.value == pytest.approx(200.0)  # (3 - 1) × background
        assert (v > t.value).mean() == pytest.approx(expected)
        assert "fold-over-background" in t.note


def test_too_few_cells_give_no_threshold() -> None:
    t = find_threshold(np.arange(5.0), marker="GCG")
    assert math.isnan(t.value) and "need" in t.note


def test_gmm_recovers_components() -> None:
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(0, 1, 600), rng.normal(6, 0.5, 400)])
    fit = fit_gmm_1d(x)
    assert fit.means == pytest.approx((0, 6), abs=0.15)
    assert fit.weights == pytest.approx((0.6, 0.4), abs=0.03)
    assert fit.ashman_d > 5
    assert 2.0 < fit.crossing() < 5.0


def test_control_threshold_is_99th_percentile() -> None:
    v = np.arange(1.0, 201.0)
    t = control_threshold(v, marker="INS")
    assert t.value == pytest.approx(np.percentile(v, 99)) and t.method == "control"


def test_parse_threshold_method() -> None:
    assert parse_threshold_method("GMM").method == "gmm"
    spec = parse_threshold_method("fixed:INS=200,GCG=150.5")
    assert spec.method == "fixed" and dict(spec.fixed) == {"INS": 200.0, "GCG": 150.5}
    for bad in ("median", "fixed:", "fixed:INS", "fixed:INS=abc", "otsu:3"):
        with pytest.raises(InputError):
            parse_threshold_method(bad)


def test_call_positive_and_double_positives() -> None:
    cells = pd.DataFrame(
        {
            "cell_id": [1, 2, 3, 4],
            "cluster_id": [1, 1, 1, 0],
            "mean_INS": [10.0, 300.0, 250.0, np.nan],
            "mean_NKX6.1": [5.0, 90.0, 1.0, 80.0],
        }
    )
    thr = {
        "INS": Threshold("INS", 100.0, "fixed"),
        "NKX6.1": Threshold("NKX6.1", 50.0, "fixed"),
    }
    out = call_positive(cells, thr, double_positives=["INS+NKX6.1"])
    assert out["positive_INS"].tolist() == [False, True, True, pd.NA]
    assert out["positive_INS+NKX6.1"].tolist() == [False, True, False, pd.NA]
    clusters = pd.DataFrame({"cluster_id": [1, 2]})
    comp = cluster_composition(clusters, out, ["INS", "NKX6.1", "INS+NKX6.1"])
    assert comp["n_cells"].tolist() == [3, 0]
    assert comp["fraction_positive_INS"].iloc[0] == pytest.approx(2 / 3)
    assert math.isnan(comp["fraction_positive_INS"].iloc[1])


def test_measure_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, islet_imaging.measure as m\n"
        "[getattr(m, n) for n in m.__all__]\n"
        "import islet_imaging.aggregate, islet_imaging.score, islet_imaging.measure._cli\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("shape", "spacing", "distance"),
    [((90, 70), (1.0, 1.0), 4.0), ((90, 70), (0.5, 0.7), 3.0), ((3, 80, 40), (2.0, 0.6, 0.6), 5.0)],
)
def test_expand_labels_in_strips_equals_skimage(
    monkeypatch: pytest.MonkeyPatch,
    shape: tuple[int, ...],
    spacing: tuple[float, ...],
    distance: float,
) -> None:
    """Strips of 8 rows give exactly skimage's result, ties between equidistant labels included
    (integer grids are full of them)."""
    from skimage.segmentation import expand_labels as skimage_expand

    from islet_imaging.measure import _cells

    rng = np.random.default_rng(3)
    labels = np.zeros(shape, np.int64)
    flat = labels.reshape(-1)
    flat[rng.choice(flat.size, size=flat.size // 40, replace=False)] = rng.integers(
        1, 30, flat.size // 40
    )
    monkeypatch.setattr(_cells, "_STRIP_ROWS", 8)
    got = _cells.expand_labels(labels, distance=distance, spacing=spacing)
    np.testing.assert_array_equal(got, skimage_expand(labels, distance=distance, spacing=spacing))


# -- block-wise measurement (large fields) --------------------------------------------------------
@pytest.mark.parametrize(
    ("stage", "z", "dtype"), [("S6", 1, np.uint16), ("S0", 1, np.float32), ("S5", 4, np.uint16)]
)
def test_cells_measured_in_blocks_equal_whole_field(stage: str, z: int, dtype: type) -> None:
    """Blocks of 48 px, crossed by nuclei, cytoplasm, clusters and background rings, give the
    table of the field measured whole (up to float rounding of the centroids)."""
    from islet_imaging.stages import get_stage
    from islet_imaging.synth import generate_field

    s = generate_field(stage, seed=5, size=200, z=z, pixel_size_um=1.0)
    images = {n: s.field.data[i].astype(dtype) for i, n in enumerate(s.field.channel_names)}
    compartments = {m.name: m.compartment for m in get_stage(stage).markers}
    kwargs = {"spacing": (2.0, 1.0, 1.0), "compartments": compartments, "cytoplasm_um": 4.0}
    whole = measure_cells(s.nuclei, s.clusters, images, block=None, **kwargs)
    blocks = measure_cells(s.nuclei, s.clusters, images, block=48, **kwargs)
    assert len(whole) > 50 and int(s.clusters.max()) >= 2
    backgrounds = whole.filter(like="background_").to_numpy()
    assert np.unique(backgrounds[:, -1]).size >= 2  # ring backgrounds differ between clusters
    pd.testing.assert_frame_equal(blocks, whole, check_exact=False, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("background", ["ring", "global"])
def test_blocks_of_a_field_covered_by_one_cluster(background: str) -> None:
    """Fewer than 50 background voxels: the fallback percentile of the whole image, block-wise too."""
    rng = np.random.default_rng(4)
    clu = np.ones((1, 120, 130), np.int32)
    nuc = np.zeros_like(clu)
    for i, (cy, cx) in enumerate(rng.integers(8, 112, (30, 2)), start=1):
        nuc[0][disc((120, 130), (cy, cx), 5)] = i
    img = rng.integers(0, 4000, clu.shape).astype(np.uint16)
    kwargs = {"spacing": 0.5, "compartments": {"INS": "cytoplasmic"}, "background": background}
    whole = measure_cells(nuc, clu, {"INS": img}, block=None, **kwargs)
    blocks = measure_cells(nuc, clu, {"INS": img}, block=32, **kwargs)
    assert whole["background_INS"].iloc[0] == pytest.approx(np.percentile(img, 5.0))
    pd.testing.assert_frame_equal(blocks, whole, check_exact=False, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32])
def test_percentiles_gathered_block_by_block(monkeypatch: pytest.MonkeyPatch, dtype: type) -> None:
    """Values added in 13 parts (counts merged every 50 entries) give every label's percentile
    as computed on all values at once; integer images are kept as counts."""
    from islet_imaging.measure import _cells
    from islet_imaging.measure._validate import grouped_percentile

    rng = np.random.default_rng(1)
    values = rng.normal(120.0, 60.0, 4000)
    values = (
        np.clip(values, 0, 255) if dtype is np.uint8 else values * (-3 if dtype is np.int16 else 1)
    )
    values = values.astype(dtype)
    labels = rng.integers(0, 7, values.size)  # label 7: no values
    monkeypatch.setattr(_cells._Values, "_COMPACT", 50)
    gathered = _cells._Values()
    for part in np.array_split(np.arange(values.size), 13):
        gathered.add(labels[part], values[part])
    for q in (5.0, 50.0, 97.5):
        expected = grouped_percentile(values.astype(np.float64), labels, 7, q)
        got = gathered.percentiles(q, 7)
        np.testing.assert_array_equal(got[1:], expected[1:])
        assert got[3] == pytest.approx(np.percentile(values[labels == 3].astype(float), q))
    assert gathered.counts(7).tolist() == np.bincount(labels, minlength=8).tolist()
    if dtype is not np.float32:
        assert sum(k.size for k in gathered._keys) < values.size  # counts, not voxels


@pytest.mark.parametrize("block", [0, -5, 2.5])
def test_bad_block_size(block: object) -> None:
    lab = np.zeros((10, 10), np.int32)
    with pytest.raises(InputError, match="block"):
        measure_cells(lab, lab, {"INS": lab}, spacing=1.0, block=block)  # type: ignore[arg-type]
