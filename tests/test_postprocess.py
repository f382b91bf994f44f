"""Targets ↔ post-processing: the contract between training and inference.

``maps_to_instances(make_targets(labels))`` must give the labels back, in 2D and in 3D with
anisotropic spacing. Truth is made by hand: touching disks / ellipsoids split along the line where
their normalised distances are equal.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.segmentation import relabel_sequential

from islet_imaging.errors import InputError, ModelError
from islet_imaging.metrics import match
from islet_imaging.models._config import Thresholds
from islet_imaging.models._postprocess import (
    border_labels,
    instances_from_maps,
    maps_to_instances,
    object_size_range,
)
from islet_imaging.models._targets import distance_map, make_targets, target_names


def blobs(
    shape: tuple[int, ...],
    centres: list[tuple[float, ...]],
    radii: list[float],
    spacing: tuple[float, ...],
) -> np.ndarray:
    """Touching balls (µm coordinates): each pixel goes to the ball it is deepest inside."""
    grids = np.meshgrid(
        *[np.arange(n) * s for n, s in zip(shape, spacing, strict=True)], indexing="ij"
    )
    best = np.full(shape, np.inf)
    lab = np.zeros(shape, np.int32)
    for i, (c, r) in enumerate(zip(centres, radii, strict=True), start=1):
        d = np.sqrt(sum((g - ci) ** 2 for g, ci in zip(grids, c, strict=True))) / r
        take = (d < 1) & (d < best)
        lab[take] = i
        best[take] = d[take]
    return relabel_sequential(lab)[0].astype(np.int32)


def pixel_mismatch(truth: np.ndarray, pred: np.ndarray) -> float:
    """Fraction of pixels whose label disagrees after mapping truth ids to matched predictions."""
    m = match(truth, pred, thresholds=0.5)[0]
    remap = np.zeros(int(truth.max()) + 1, np.int64)
    for t, p, _ in m.pairs:
        remap[t] = p
    return float(np.mean(remap[truth] != pred))


@pytest.fixture
def scene_2d() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    centres = [(rng.uniform(10, 150), rng.uniform(10, 190)) for _ in range(40)]
    nuclei = blobs((160, 200), centres, list(rng.uniform(6, 11, 40)), (1.0, 1.0))
    clusters = blobs((160, 200), [(40, 50), (40, 110), (120, 100)], [35, 30, 45], (1.0, 1.0))
    return nuclei, clusters


# -- targets ------------------------------------------------------------------------------------
def test_distance_map_per_object_normalised_peaks_at_one() -> None:
    lab = np.zeros((9, 20), np.int32)
    lab[1:8, 1:8] = 1  # 7×7 square: centre distance 4
    lab[1:8, 8:19] = 2  # touching 7×11 rectangle
    d = distance_map(lab)
    assert d[0].max() == 0 and d[:, 0].max() == 0
    assert d[4, 4] == pytest.approx(1.0)
    assert d[lab == 2].max() == pytest.approx(1.0)
    # touching objects: the pixels on each side of the contact are on the boundary (distance 1)
    assert d[4, 7] == pytest.approx(1 / 4) and d[4, 8] == pytest.approx(1 / 4)
    assert (d[lab > 0] > 0).all()


def test_distance_map_capped_is_local() -> None:
    lab = np.zeros((40, 40), np.int32)
    lab[:, :] = 1
    d = distance_map(lab[np.newaxis], cap=4.0)[0]
    assert d[0, 0] == pytest.approx(0.25)
    assert d[20, 20] == pytest.approx(1.0)
    assert d[1, 20] == pytest.approx(0.5)


def test_make_targets_keys_and_missing_clusters() -> None:
    lab = np.zeros((12, 12), np.int32)
    lab[2:6, 2:6] = 3
    t = make_targets(lab)
    assert set(t) == set(target_names())
    assert all(v.dtype == np.float32 and v.shape == lab.shape for v in t.values())
    assert t["nuclei_weight"].min() == 1.0
    assert t["clusters_weight"].max() == 0.0  # no cluster annotation → cluster heads not trained
    assert t["nuclei_foreground"].sum() == 16


@pytest.mark.parametrize(
    ("nuclei", "clusters", "match_"),
    [
        (np.zeros((4, 4), float), None, "integers"),
        (np.zeros((4, 4), np.int32), np.zeros((5, 4), np.int32), "differ in shape"),
        (np.zeros(4, np.int32), None, r"\(Y, X\) or \(Z, Y, X\)"),
    ],
)
def test_make_targets_bad_labels(
    nuclei: np.ndarray, clusters: np.ndarray | None, match_: str
) -> None:
    with pytest.raises(InputError, match=match_):
        make_targets(nuclei, clusters)


# -- round trip (the key test of the contract) --------------------------------------------------
def test_round_trip_2d(scene_2d: tuple[np.ndarray, np.ndarray]) -> None:
    nuclei, clusters = scene_2d
    assert nuclei.max() == 40 and clusters.max() == 3
    nuc, clu = maps_to_instances(make_targets(nuclei, clusters))
    assert nuc.max() == nuclei.max() and clu.max() == clusters.max()
    assert match(nuclei, nuc, thresholds=0.5)[0].ap == 1.0
    assert match(nuclei, nuc, thresholds=0.8)[0].ap >= 0.95
    assert match(clusters, clu, thresholds=0.95)[0].ap == 1.0
    assert pixel_mismatch(nuclei, nuc) < 0.005
    assert pixel_mismatch(clusters, clu) < 0.005
    assert nuc.dtype == np.int32 and np.array_equal(np.unique(nuc), np.arange(41))


def test_round_trip_3d_anisotropic() -> None:
    rng = np.random.default_rng(2)
    spacing = (2.0, 0.5, 0.5)  # z-step 4× the pixel size
    shape = (12, 100, 120)
    # touching nuclei side by side in one layer, and a second layer above (not touching in z)
    centres = [(8.0, rng.uniform(5, 45), rng.uniform(5, 55)) for _ in range(12)]
    centres += [(17.0, rng.uniform(5, 45), rng.uniform(5, 55)) for _ in range(6)]
    radii = list(rng.uniform(3.5, 4.0, 18))
    nuclei = blobs(shape, centres, radii, spacing)
    n_true = int(nuclei.max())
    clusters = (nuclei > 0).astype(np.int32)
    targets = make_targets(nuclei, clusters)
    assert targets["nuclei_distance"].shape == shape
    nuc, clu = maps_to_instances(
        targets,
        spacing=spacing,
        nucleus_diameter_um=(2.0, 12.0),
        cluster_diameter_um=(5.0, None),
    )
    assert nuc.shape == shape
    assert nuc.max() == n_true
    assert match(nuclei, nuc, thresholds=0.7)[0].ap == 1.0
    assert pixel_mismatch(nuclei, nuc) < 0.01
    # clusters are 3D objects and contain their nuclei
    assert clu.max() >= 1
    assert np.all(clu[nuc > 0] > 0)


def test_size_filters_in_um() -> None:
    lab = np.zeros((60, 60), np.int32)
    lab[5:9, 5:9] = 1  # 16 px = 4 µm² at 0.5 µm: d ≈ 2.3 µm
    lab[20:40, 20:40] = 2  # 400 px = 100 µm²: d ≈ 11.3 µm
    nuc, _ = maps_to_instances(
        make_targets(lab), spacing=(0.5, 0.5), nucleus_diameter_um=(5.0, 18.0)
    )
    assert nuc.max() == 1 and nuc[30, 30] == 1 and nuc[6, 6] == 0
    nuc, _ = maps_to_instances(
        make_targets(lab), spacing=(0.5, 0.5), nucleus_diameter_um=(1.0, 8.0)
    )
    assert nuc.max() == 1 and nuc[6, 6] == 1 and nuc[30, 30] == 0


def test_object_size_range() -> None:
    lo, hi = object_size_range((2.0, None), (0.5, 0.5))
    assert lo == pytest.approx(math.pi / 4 * 2.0**2 / 0.25) and hi == math.inf
    lo3, _ = object_size_range((2.0, 4.0), (1.0, 0.5, 0.5))
    assert lo3 == pytest.approx(math.pi / 6 * 8 / 0.25)
    # a stack at least as thick as the smallest object: the whole sphere
    assert object_size_range((2.0, 4.0), (1.0, 0.5, 0.5), planes=2)[0] == pytest.approx(lo3)
    # a thinner stack sees a slab of it: pi (r^2 T - T^3 / 12) for T = 1 plane x 0.5 µm
    lo_thin, hi_thin = object_size_range((2.0, 4.0), (0.5, 0.5, 0.5), planes=1)
    assert lo_thin == pytest.approx(math.pi * (1.0 * 0.5 - 0.5**3 / 12) / 0.125)
    assert hi_thin == pytest.approx(math.pi / 6 * 64 / 0.125)  # the largest: whole, as before
    # one very thin plane: the 2D floor (the smallest disc)
    lo_flat, _ = object_size_range((2.0, None), (1e-4, 0.5, 0.5), planes=1)
    assert lo_flat == pytest.approx(math.pi / 4 * 2.0**2 / 0.25, rel=1e-6)


def test_clusters_of_a_stack_thinner_than_them_are_kept() -> None:
    # three planes 1 µm apart through two 40 µm discs; the smallest cluster is 30 µm across: a
    # 30 µm sphere holds 14137 µm³, the stack sees 3 x 1257 µm² = 3770 µm³ of each disc
    yy, xx = np.mgrid[:120, :120]
    disc = ((yy - 40) ** 2 + (xx - 40) ** 2 < 20**2) | ((yy - 80) ** 2 + (xx - 85) ** 2 < 20**2)
    fg = np.repeat(disc[None], 3, axis=0).astype(np.float32)
    maps = {"nuclei_foreground": np.zeros_like(fg), "clusters_foreground": fg}
    kw = {"spacing": (1.0, 1.0, 1.0), "cluster_diameter_um": (30.0, None), "cluster_split": "none"}
    _, clu = maps_to_instances(maps, **kw)
    assert clu.max() == 2 and clu[1, 40, 40] != clu[1, 80, 85]
    # a 2 µm fleck through the same stack is still too small
    fleck = fg.copy()
    fleck[:, 105:107, 10:12] = 1.0
    _, clu = maps_to_instances({**maps, "clusters_foreground": fleck}, **kw)
    assert clu.max() == 2 and clu[1, 105, 10] == 0


def test_nuclei_attach_to_cluster_they_mostly_lie_in() -> None:
    fg_n = np.zeros((40, 40), np.float32)
    fg_n[10:20, 10:20] = 1
    fg_c = np.zeros_like(fg_n)
    fg_c[5:16, 5:30] = 1  # covers 60 % of the nucleus
    maps = {
        "nuclei_foreground": fg_n,
        "clusters_foreground": fg_c,
    }
    nuc, clu = maps_to_instances(maps)
    assert nuc.max() == 1 and clu.max() == 1
    assert np.all(clu[nuc == 1] == 1)  # the cluster grew over the whole nucleus


def test_foreground_only_and_empty_maps() -> None:
    fg = np.zeros((30, 30), np.float32)
    assert instances_from_maps(fg, None).max() == 0
    fg[5:10, 5:10] = 0.9
    fg[15:20, 15:20] = 0.9
    lab = instances_from_maps(fg, None)
    assert lab.max() == 2
    # a component without any seed is still one object
    dist = np.zeros_like(fg)
    lab = instances_from_maps(fg, dist, seed_threshold=0.5)
    assert lab.max() == 2


def test_thresholds_matter() -> None:
    lab = np.zeros((30, 60), np.int32)
    lab[5:25, 5:30] = 1
    lab[5:25, 30:55] = 2
    t = make_targets(lab)
    # with a seed level above every value there are no seeds: one merged object
    high = Thresholds(nuclei_seed=1.0)
    nuc, _ = maps_to_instances(t, thresholds=high)
    assert nuc.max() == 1
    nuc, _ = maps_to_instances(t, thresholds={"nuclei_seed": 0.5})
    assert nuc.max() == 2


def test_maps_to_instances_bad_input() -> None:
    with pytest.raises(InputError, match="nuclei_foreground"):
        maps_to_instances({"clusters_foreground": np.zeros((4, 4))})
    with pytest.raises(InputError, match="shape"):
        maps_to_instances(
            {"nuclei_foreground": np.zeros((4, 4)), "nuclei_distance": np.zeros((4, 5))}
        )
    with pytest.raises(InputError, match="spacing"):
        maps_to_instances({"nuclei_foreground": np.zeros((4, 4))}, spacing=(1, 1, 1))
    with pytest.raises(ModelError, match="unknown threshold"):
        maps_to_instances({"nuclei_foreground": np.zeros((4, 4))}, thresholds={"nucle_seed": 1})


def test_border_labels() -> None:
    lab = np.zeros((2, 10, 10), np.int32)
    lab[:, 0:3, 4:6] = 1
    lab[0, 4:6, 4:6] = 2  # touches the top z-plane only: not a cut
    lab[1, 8:10, 8:10] = 3
    assert border_labels(lab) == {1, 3}
    assert border_labels(lab, axes=(0, 1, 2)) == {1, 2, 3}


def test_cluster_neck_is_not_a_contact() -> None:
    """A dumbbell (two lobes joined by a 14 px neck) stays one cluster; two touching disks are two."""
    yy, xx = np.mgrid[:80, :160]
    lobes = ((yy - 40) ** 2 + (xx - 40) ** 2 < 30**2) | ((yy - 40) ** 2 + (xx - 120) ** 2 < 30**2)
    neck = (abs(yy - 40) < 7) & (xx > 40) & (xx < 120)
    dumbbell = (lobes | neck).astype(np.int32)
    touching = blobs((80, 160), [(40, 45), (40, 110)], [33, 33], (1.0, 1.0))
    assert touching.max() == 2
    for truth, n_expected in ((dumbbell, 1), (touching, 2)):
        t = make_targets(truth, truth)
        _, clu = maps_to_instances(t)
        assert clu.max() == n_expected
        # without merging, the capped distance splits the dumbbell at its neck
        _, split = maps_to_instances(t, thresholds=Thresholds(clusters_merge=1.0))
        assert split.max() == 2


def test_nuclei_stacked_in_z_are_split() -> None:
    """Two nuclei on top of each other: plane-wise maps cannot see the contact, the seed chain's
    area dip does."""
    spacing = (1.0, 0.5, 0.5)
    nuclei = blobs((22, 40, 40), [(6.0, 10.0, 10.0), (13.5, 10.5, 10.0)], [4.0, 4.0], spacing)
    assert nuclei.max() == 2
    # the two touch: some voxel of one is a face neighbour of the other
    assert np.any((nuclei[:-1] == 1) & (nuclei[1:] == 2))
    nuc, _ = maps_to_instances(make_targets(nuclei), spacing=spacing)
    assert nuc.max() == 2
    assert match(nuclei, nuc, thresholds=0.7)[0].ap == 1.0


def test_shape_split_of_touching_round_clusters() -> None:
    """Two round aggregates (r = 20 µm) fused over a short contact are two; an ellipse is one."""
    yy, xx = np.mgrid[:100, :180] * 0.5  # µm
    pair = ((yy - 25) ** 2 + (xx - 25) ** 2 < 20**2) | ((yy - 25) ** 2 + (xx - 62) ** 2 < 20**2)
    ellipse = ((yy - 25) / 18) ** 2 + ((xx - 45) / 40) ** 2 < 1
    for fg, n_shape in ((pair, 2), (ellipse, 1)):
        maps = {
            "nuclei_foreground": np.zeros(fg.shape, np.float32),
            "clusters_foreground": fg.astype(np.float32),
        }
        kw = {"spacing": (0.5, 0.5), "cluster_diameter_um": (25.0, None)}
        _, clu = maps_to_instances(maps, cluster_split="shape", **kw)
        assert clu.max() == n_shape
        _, clu = maps_to_instances(maps, cluster_split="none", **kw)
        assert clu.max() == 1
    truth = blobs((100, 180), [(25.0, 25.0), (25.0, 62.0)], [20.0, 20.0], (0.5, 0.5))
    _, clu = maps_to_instances(
        {"nuclei_foreground": np.zeros(pair.shape), "clusters_foreground": (truth > 0) * 1.0},
        cluster_split="shape",
        spacing=(0.5, 0.5),
        cluster_diameter_um=(25.0, None),
    )
    assert match(truth, clu, thresholds=0.9)[0].ap == 1.0
    with pytest.raises(InputError, match="cluster_split"):
        maps_to_instances({"nuclei_foreground": np.zeros((4, 4))}, cluster_split="watershed")


# -- combined split: saddles of the shape or of the predicted distance -------------------------
def cluster_maps(truth: np.ndarray, cap_px: float) -> dict[str, np.ndarray]:
    """Perfect cluster maps of ``truth`` (capped distance, as the default model is trained)."""
    t = make_targets(truth, truth, distance_cap_px={"nuclei": None, "clusters": cap_px})
    return {
        "nuclei_foreground": np.zeros(truth.shape, np.float32),
        "clusters_foreground": t["clusters_foreground"],
        "clusters_distance": t["clusters_distance"],
    }


def combined(maps: dict[str, np.ndarray], spacing: tuple[float, ...], cap_um: float | None):
    return maps_to_instances(
        maps,
        spacing=spacing,
        cluster_diameter_um=(25.0, None),
        cluster_split="combined",
        cluster_distance_cap_um=cap_um,
    )[1]


@pytest.mark.parametrize("px", [0.5, 0.8])
def test_combined_split_two_touching_discs_of_different_size(px: float) -> None:
    """Discs of r = 24 and 15 µm, centres 33 µm apart (fused over a wide contact): exactly two
    clusters, whatever the pixel size; an ellipse of the same extent is one."""
    shape = (int(70 / px), int(110 / px))
    truth = blobs(shape, [(35.0, 35.0), (35.0, 68.0)], [24.0, 15.0], (px, px))
    assert truth.max() == 2
    cap_px = 26.0 / px  # the default model's 40 px × 0.65 µm
    clu = combined(cluster_maps(truth, cap_px), (px, px), 26.0)
    assert clu.max() == 2
    assert match(truth, clu, thresholds=0.9)[0].ap == 1.0
    yy, xx = np.mgrid[: shape[0], : shape[1]] * px
    ellipse = (((yy - 35) / 22) ** 2 + ((xx - 52) / 42) ** 2 < 1).astype(np.int32)
    assert combined(cluster_maps(ellipse, cap_px), (px, px), 26.0).max() == 1


def test_combined_split_keeps_a_lobed_cluster_whole() -> None:
    """A round cluster with two overlapping lobes (as synthetic aggregates have) is one."""
    px = 0.65
    yy, xx = np.mgrid[:160, :180] * px
    body = (yy - 52) ** 2 + (xx - 55) ** 2 < 30**2
    lobe1 = (yy - 52) ** 2 + (xx - 80) ** 2 < 14**2  # centre 0.83 r out, radius 0.47 r
    lobe2 = (yy - 30) ** 2 + (xx - 45) ** 2 < 12**2
    truth = (body | lobe1 | lobe2).astype(np.int32)
    clu = combined(cluster_maps(truth, 40.0), (px, px), 26.0)
    assert clu.max() == 1
    assert match(truth, clu, thresholds=0.95)[0].ap == 1.0


def test_combined_split_sees_contacts_without_a_neck() -> None:
    """Two squares side by side make a rectangle: no neck, one object by shape; the predicted
    distance has a valley along the contact, so the combined split finds both."""
    px = 1.0
    truth = np.zeros((60, 120), np.int32)
    truth[5:55, 5:60] = 1
    truth[5:55, 60:115] = 2
    maps = cluster_maps(truth, 26.0)
    clu = combined(maps, (px, px), 26.0)
    assert clu.max() == 2
    assert match(truth, clu, thresholds=0.9)[0].ap == 1.0
    # without the distance map (or its scale) only the shape counts: one rectangle
    assert combined(maps, (px, px), None).max() == 1
    no_distance = {k: v for k, v in maps.items() if k != "clusters_distance"}
    assert combined(no_distance, (px, px), 26.0).max() == 1
    # a saddle-depth threshold above every contact merges them again
    _, clu = maps_to_instances(
        maps,
        thresholds=Thresholds(clusters_saddle=1.0),
        spacing=(px, px),
        cluster_diameter_um=(25.0, None),
        cluster_split="combined",
        cluster_distance_cap_um=26.0,
    )
    assert clu.max() == 1


def test_combined_split_in_3d_anisotropic() -> None:
    spacing = (2.0, 0.8, 0.8)
    truth = blobs((12, 70, 110), [(10.0, 28.0, 28.0), (10.0, 28.0, 62.0)], [20.0, 18.0], spacing)
    assert truth.max() == 2
    clu = combined(cluster_maps(truth, 26.0 / 0.8), spacing, 26.0)
    assert clu.shape == truth.shape and clu.max() == 2
    assert match(truth, clu, thresholds=0.8)[0].ap == 1.0


def test_merge_shallow_saddles_by_relative_depth_and_size() -> None:
    """Regions 1-2 meet at a shallow saddle (peaks 10 and 9, saddle 8: depth 0.11) and merge;
    2-3 at a deep one (9 and 4 over 1: depth 0.75) and stay apart; region 4 (3 px) is smaller
    than ``min_region`` and joins its neighbour however deep its saddle."""
    from islet_imaging.models._postprocess import _merge_shallow_saddles

    ws = np.array([[1] * 5 + [2] * 5 + [3] * 5 + [4] * 3])
    depth = np.array([[6, 8, 10, 9, 8, 8, 9, 9, 8, 1, 1, 3, 4, 3, 2, 0.5, 1, 0.5]], float)
    out = _merge_shallow_saddles(ws, depth, min_depth=0.2, min_region=4, floor=1e-3)
    assert out[0, 0] == out[0, 5] and out[0, 5] != out[0, 10] and out[0, 10] == out[0, 15]
    assert len(np.unique(out)) == 2
    # all kept apart when nothing counts as shallow and no region is small
    out = _merge_shallow_saddles(ws, depth, min_depth=0.0, min_region=0, floor=1e-3)
    assert len(np.unique(out)) == 4


def test_combined_split_bad_cap() -> None:
    from islet_imaging.models._postprocess import combined_split_instances

    fg = np.ones((20, 20), np.float32)
    with pytest.raises(InputError, match="distance_cap_um"):
        combined_split_instances(fg, fg, distance_cap_um=None)
    with pytest.raises(InputError, match="distance_cap_um"):
        combined_split_instances(fg, fg, distance_cap_um=-1.0)


def test_nuclei_seed_3d_applies_to_z_stacks_only() -> None:
    """Two nuclei joined by a neck whose distance is 0.6: one core at seed 0.5, two at 0.7."""
    dist = np.zeros((24, 40), np.float32)
    yy, xx = np.mgrid[:24, :40]
    for cx in (10, 30):
        dist = np.maximum(dist, 1.0 - np.hypot(yy - 12, xx - cx) / 9.0)
    dist[10:15, 10:31] = np.maximum(dist[10:15, 10:31], 0.6)  # the neck
    fg = (dist > 0).astype(np.float32)
    th = Thresholds(nuclei_seed=0.5, nuclei_seed_3d=0.7)
    assert th.for_class("nuclei")["seed"] == 0.5
    assert th.for_class("nuclei", z_stack=True)["seed"] == 0.7
    assert Thresholds(nuclei_seed=0.5).for_class("nuclei", z_stack=True)["seed"] == 0.5
    maps = {"nuclei_foreground": fg, "nuclei_distance": dist}
    nuc2d, _ = maps_to_instances(maps, thresholds=th)
    assert nuc2d.max() == 1
    stack = {k: np.repeat(v[np.newaxis], 3, axis=0) for k, v in maps.items()}
    nuc3d, _ = maps_to_instances(stack, thresholds=th, spacing=(1.0, 1.0, 1.0))
    assert nuc3d.max() == 2
    # a single plane is 2D data: the 2D level
    one, _ = maps_to_instances({k: v[:1] for k, v in stack.items()}, thresholds=th)
    assert one.max() == 1


def test_nuclei_foreground_3d_applies_to_z_stacks_only() -> None:
    """A nucleus whose out-of-focus planes have probability 0.35: part of it at a 2D level of
    0.3, not at a z-stack level of 0.5."""
    fg = np.zeros((5, 20, 20), np.float32)
    fg[1:4, 5:15, 5:15] = 0.35
    fg[2, 5:15, 5:15] = 0.9
    th = Thresholds(nuclei_foreground=0.3, nuclei_foreground_3d=0.5)
    assert th.for_class("nuclei", z_stack=True)["foreground"] == 0.5
    assert th.for_class("clusters", z_stack=True) == th.for_class("clusters")
    nuc, _ = maps_to_instances({"nuclei_foreground": fg}, thresholds=th, spacing=(1, 1, 1))
    assert nuc.max() == 1
    assert np.flatnonzero(nuc.any(axis=(1, 2))).tolist() == [2]
    nuc2d, _ = maps_to_instances({"nuclei_foreground": fg[1]}, thresholds=th)
    assert nuc2d.max() == 1


@pytest.mark.parametrize("name", ["nuclei_foreground_3d", "nuclei_seed_3d"])
def test_z_stack_levels_are_optional_and_checked(name: str) -> None:
    assert getattr(Thresholds.from_dict({name: None}), name) is None
    assert Thresholds.from_dict({name: 0.7}).to_dict()[name] == 0.7
    with pytest.raises(ModelError, match=name):
        Thresholds(**{name: 1.5})
    with pytest.raises(ModelError, match=name.removesuffix("_3d") + "="):  # the 2D one is not
        Thresholds(**{name.removesuffix("_3d"): None})


def test_trim_end_planes_drops_small_tails_only() -> None:
    """Two objects by hand: end planes below 25 % of the largest plane go, one after the other
    from each end; a narrow plane between two wide ones (a waist) stays, and so does 2D."""
    from islet_imaging.models._postprocess import trim_end_planes

    lab = np.zeros((7, 12, 24), np.int32)
    lab[0, 5, 5] = 1  # bottom tail: 1 px, then 2 px
    lab[1, 5, 5:7] = 1
    lab[2:5, 2:10, 2:10] = 1  # 64 px planes
    lab[5, 4:7, 4:7] = 1  # top tail: 9 px (below 16), then 4 px
    lab[6, 4:6, 4:6] = 1
    lab[1:6, 2:10, 14:22] = 2
    lab[3, 2:10, 14:22] = 0
    lab[3, 5:7, 17:19] = 2  # a 4 px waist between two 64 px planes: not an end
    out = trim_end_planes(lab.copy(), 0.25)
    assert (out == 1).sum(axis=(1, 2)).tolist() == [0, 0, 64, 64, 64, 0, 0]
    assert ((out == 2) == (lab == 2)).all()
    assert (trim_end_planes(lab.copy(), 0.0) == lab).all()
    flat = lab[2:3].copy()
    assert (trim_end_planes(flat, 0.9) == lab[2:3]).all()


def test_nuclei_end_plane_3d_trims_z_stacks_through_the_thresholds() -> None:
    """A nucleus over 3 planes with a faint 1-plane tail of 4 px: kept at 0, gone at 0.2;
    older thresholds files without the key keep every plane."""
    fg = np.zeros((5, 20, 20), np.float32)
    fg[1:4, 5:15, 5:15] = 0.9
    fg[4, 9:11, 9:11] = 0.9
    maps = {"nuclei_foreground": fg}
    assert Thresholds.from_dict({}).nuclei_end_plane_3d == 0.0
    for level, planes in ((0.0, [1, 2, 3, 4]), (0.2, [1, 2, 3])):
        th = Thresholds(nuclei_end_plane_3d=level)
        nuc, _ = maps_to_instances(maps, thresholds=th, spacing=(1, 1, 1))
        assert nuc.max() == 1
        assert np.flatnonzero(nuc.any(axis=(1, 2))).tolist() == planes
    with pytest.raises(ModelError, match="nuclei_end_plane_3d"):
        Thresholds(nuclei_end_plane_3d=-0.1)


@pytest.mark.parametrize(
    ("stage", "z_stack", "section", "kept_um"),
    [
        ("S6", False, 0.6, (3.4, 8.0)),  # a 2D section through aggregates: floor 0.6 × 4 µm
        ("S6", False, 1.0, (8.0,)),  # the stage's floor (4 µm)
        ("S6", True, 0.6, (8.0,)),  # z-stacks join nuclei in 3D: the stage's floor
        ("S1", False, 0.6, (8.0,)),  # monolayers show nuclei whole: the stage's floor (5 µm)
    ],
)
def test_nucleus_floor_of_sections_through_aggregates(
    stage: str, z_stack: bool, section: float, kept_um: tuple[float, ...]
) -> None:
    from islet_imaging.models._config import ModelConfig
    from islet_imaging.models.inference import stage_instances
    from islet_imaging.stages import get_stage

    diameters = (2.0, 3.4, 8.0)  # µm; the stage floors are 4 µm (S6) and 5 µm (S1)
    spacing = (0.5, 0.25, 0.25) if z_stack else (0.25, 0.25)
    shape = (40, 80, 160) if z_stack else (80, 160)
    centres = [((10.0,) if z_stack else ()) + (10.0, 6.0 + 12.0 * i) for i in range(3)]
    truth = blobs(shape, centres, [d / 2 for d in diameters], spacing)
    assert truth.max() == 3
    th = Thresholds(nuclei_min_section=section)
    nuc, _ = stage_instances(make_targets(truth), spacing, get_stage(stage), ModelConfig(), th)
    found = {d for d, c in zip(diameters, centres, strict=True) if nuc[_index(c, spacing)] > 0}
    assert found == set(kept_um)
    assert nuc.max() == len(kept_um)


def _index(centre: tuple[float, ...], spacing: tuple[float, ...]) -> tuple[int, ...]:
    return tuple(round(c / s) for c, s in zip(centre, spacing, strict=True))


def test_thresholds_of() -> None:
    th = Thresholds(nuclei_min_section=0.5)
    assert Thresholds.of(th) is th
    assert Thresholds.of(None) == Thresholds()
    assert Thresholds.of(None, th) is th
    assert Thresholds.of({"nuclei_min_section": 0.5}) == th
    with pytest.raises(ModelError, match="nuclei_min_section"):
        Thresholds.of({"nuclei_min_section": 1.5})


def test_absorb_enclosed_pieces() -> None:
    from islet_imaging.models._postprocess import _absorb_enclosed_pieces

    ws = np.zeros((50, 60), np.int32)
    ws[5:45, 5:45] = 1  # a large region, 1600 px
    ws[5:11, 20:26] = 2  # a 6×6 bite at its top edge: 18 of its 24 outline faces on region 1
    ws[20:26, 45:51] = 3  # a 6×6 square beside it: 6 of 24 faces shared
    ws[30:45, 5:20] = 4  # a 15×15 corner of region 1 (225 px): 30 of 60 faces shared
    out = _absorb_enclosed_pieces(ws, max_ratio=0.1, min_contact=0.4)
    assert np.all(out[ws == 2] == 1)  # enclosed and small: joins
    assert np.all(out[ws == 3] == 3)  # small but touching along one side only: its own object
    assert np.all(out[ws == 4] == 4)  # enclosed enough but too large: its own object
    assert np.all(out[ws == 1] == 1) and np.all(out[ws == 0] == 0)
    # a larger size ratio takes the corner too; a lower contact level takes the square
    assert np.all(_absorb_enclosed_pieces(ws, max_ratio=0.2, min_contact=0.4)[ws == 4] == 1)
    assert np.all(_absorb_enclosed_pieces(ws, max_ratio=0.1, min_contact=0.2)[ws == 3] == 1)
    # the outline counts the box edge: a bite at the array's edge is not "enclosed" by it
    edge = np.zeros((40, 40), np.int32)
    edge[:, :] = 1
    edge[0:6, 10:16] = 2  # 18 of its 24 faces on region 1, 6 on the array's edge
    assert np.all(_absorb_enclosed_pieces(edge, max_ratio=0.1, min_contact=0.8)[edge == 2] == 2)
    assert np.all(_absorb_enclosed_pieces(edge, max_ratio=0.1, min_contact=0.7)[edge == 2] == 1)
    # 3D: a small cube inside a slab's face
    vol = np.zeros((12, 30, 30), np.int32)
    vol[:, 2:28, 2:28] = 1
    vol[4:8, 2:6, 10:14] = 2
    assert np.all(_absorb_enclosed_pieces(vol, max_ratio=0.1, min_contact=0.5)[vol == 2] == 1)


def test_combined_split_rejoins_a_piece_that_a_false_valley_cut_off() -> None:
    from islet_imaging.models._postprocess import combined_split_instances

    yy, xx = np.mgrid[:120, :200]
    big = (yy - 60) ** 2 + (xx - 60) ** 2 < 45**2  # an aggregate, 90 px across
    # a second, touching aggregate of similar size: a true contact
    other = ((yy - 60) ** 2 + (xx - 140) ** 2 < 40**2) & ~big
    truth = big.astype(np.int32) + 2 * other
    fg = (truth > 0).astype(np.float32)
    dist = distance_map(truth, cap=30.0)
    # the network's false valley: a chord across the big one's rim cuts off a small cap
    dist[21:23][big[21:23]] = 0.0
    kw = dict(spacing=(1.0, 1.0), distance_cap_um=30.0, min_saddle_depth=0.2)
    before = combined_split_instances(fg, dist, **kw)
    after = combined_split_instances(fg, dist, absorb_size=0.15, absorb_contact=0.3, **kw)
    assert before.max() == 3  # the cap is an object of its own
    assert after.max() == 2
    assert match(truth, after, thresholds=0.9)[0].ap == 1.0


def test_grow_to_level_reaches_the_lower_outline_without_new_objects() -> None:
    """Three cones of probability: the two near ones, of different widths, are labelled at
    0.65 and grow to 0.4, meeting where the probability is lowest (where the cones cross); the
    far one, with no label, stays 0."""
    from islet_imaging.models._postprocess import grow_to_level

    yy, xx = np.mgrid[:100, :200]
    cones = [
        np.clip(1 - np.hypot(yy - 50, xx - cx) / width, 0, 1)
        for cx, width in ((40, 36), (75, 20), (160, 30))
    ]
    prob = np.max(cones, axis=0).astype(np.float32)
    labels = np.zeros((100, 200), np.int32)
    labels[cones[0] > 0.65] = 1
    labels[cones[1] > 0.65] = 2
    grown = grow_to_level(labels, prob, 0.4, spacing=(0.25, 0.25))  # at most 9 px = 2.25 µm
    nearer = np.where(cones[0] >= cones[1], 1, 2)
    expected = np.where((prob > 0.4) & (xx < 120), nearer, 0)
    assert grown[:, 120:].max() == 0  # no label reaches the third cone: no new object
    assert np.count_nonzero(grown != expected) == 0
    assert np.count_nonzero(grown) > 2.5 * np.count_nonzero(labels)
    assert np.array_equal(grow_to_level(labels, prob, 0.9), labels)  # above the labels: as is
    # at 1 µm per pixel the 9 px exceed the reach: growth stops 5 µm beyond the labels
    capped = grow_to_level(labels, prob, 0.4, spacing=(1.0, 1.0), max_um=5.0)
    reach = ndi.distance_transform_edt(labels == 0)
    assert np.array_equal(capped > 0, (expected > 0) & (reach <= 5.0))


def test_clusters_outline_through_the_thresholds() -> None:
    """A disc of cluster probability falling off at its rim: at ``clusters_outline`` 0.3 the
    cluster is the 0.3 outline, unset (or not below ``clusters_foreground``) the 0.6 one."""
    yy, xx = np.mgrid[:120, :120]
    fg = np.clip(1 - np.hypot(yy - 60, xx - 60) / 50, 0, 1).astype(np.float32)
    maps = {"nuclei_foreground": np.zeros_like(fg), "clusters_foreground": fg}
    areas = {}
    for level in (None, 0.6, 0.3):
        th = Thresholds(clusters_foreground=0.6, clusters_outline=level)
        _, clusters = maps_to_instances(
            maps, thresholds=th, cluster_split="combined", spacing=(0.25, 0.25)
        )
        assert clusters.max() == 1
        areas[level] = np.count_nonzero(clusters)
    assert areas[None] == areas[0.6] == np.count_nonzero(fg > 0.6)
    assert areas[0.3] == np.count_nonzero(fg > 0.3)
    assert Thresholds.from_dict({"clusters_outline": None}).clusters_outline is None
    with pytest.raises(ModelError, match="clusters_outline"):
        Thresholds(clusters_outline=1.5)
