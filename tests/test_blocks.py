"""Block-wise segmentation: the grid covers the image once, and stitched labels equal whole ones."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import disk, line
from skimage.measure import label

from islet_imaging.models._blocks import Block, plan_blocks, stitch_blocks


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two label images are equal up to renumbering."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return pairs.shape[1] == np.unique(a[a > 0]).size == np.unique(b[b > 0]).size


@pytest.mark.parametrize(
    ("shape", "block", "halo", "align"),
    [((100, 73), 30, 7, 1), ((40, 40), 40, 5, 1), ((100, 73), 30, 7, 8)],
)
def test_cores_tile_the_image_once(
    shape: tuple[int, int], block: int, halo: int, align: int
) -> None:
    blocks = plan_blocks(shape, block, halo, align=align)
    hits = np.zeros(shape, int)
    for b in blocks:
        hits[b.core] += 1
        assert all(c.stop - c.start <= block for c in b.core)
        for c, w, n in zip(b.core, b.window, shape, strict=True):
            assert w.stop == min(n, c.stop + halo)
            assert w.start % align == 0 and c.start - halo - align < w.start
            assert w.start <= max(0, c.start - halo)
    assert (hits == 1).all()
    assert [b.index for b in blocks] == sorted(b.index for b in blocks)


def _scene(rng: np.random.Generator) -> np.ndarray:
    """A mask: a snake across the whole image, discs on block edges and corners, a checkerboard
    of touching squares."""
    mask = np.zeros((120, 150), bool)
    for (y0, x0), (y1, x1) in [((5, 2), (110, 145)), ((110, 145), (100, 3)), ((100, 3), (60, 80))]:
        rr, cc = line(y0, x0, y1, x1)
        mask[rr, cc] = True
        mask[np.clip(rr + 1, 0, 119), cc] = True
    for _ in range(25):
        rr, cc = disk(tuple(rng.integers(0, (120, 150))), rng.integers(2, 6), shape=mask.shape)
        mask[rr, cc] = True
    return mask


def _touching_labels() -> np.ndarray:
    """Squares that touch edge to edge, several across block edges: distinct objects."""
    lab = np.zeros((120, 150), np.int32)
    n = 0
    for y in range(34, 86, 13):
        for x in range(30, 130, 13):
            n += 1
            lab[y : y + 13, x : x + 13] = n
    return lab


@pytest.mark.parametrize("block", [25, 40, 64])
def test_connected_components_stitch_exactly(block: int) -> None:
    mask = _scene(np.random.default_rng(block))
    truth = label(mask, connectivity=2)
    halo = 6

    def segment(b: Block) -> list[np.ndarray]:
        return [label(mask[b.window], connectivity=2)[np.newaxis]]

    (stitched,) = stitch_blocks(
        (1, *mask.shape), plan_blocks(mask.shape, block, halo), segment, halo=halo
    )
    assert stitched.dtype == np.int32 and stitched.shape == (1, *mask.shape)
    assert same_partition(stitched[0], truth)
    assert stitched.max() == truth.max()  # renumbered 1..N
    assert set(np.unique(stitched)) == set(range(truth.max() + 1))


def test_touching_objects_stay_apart_and_windows_may_number_freely() -> None:
    truth = _touching_labels()
    rng = np.random.default_rng(1)
    halo = 8

    def segment(b: Block) -> list[np.ndarray]:
        crop = truth[b.window]
        perm = np.concatenate([[0], rng.permutation(truth.max()) + 1]).astype(np.int32)
        nuclei = perm[crop][np.newaxis]
        clusters = (crop > 0).astype(np.int32)[np.newaxis]  # one cluster of all squares
        return [np.concatenate([nuclei, nuclei]), np.concatenate([clusters, clusters])]

    nuclei, clusters = stitch_blocks(
        (2, *truth.shape), plan_blocks(truth.shape, 33, halo), segment, halo=halo
    )
    for z in range(2):
        assert same_partition(nuclei[z], truth)
        assert same_partition(clusters[z], (truth > 0).astype(np.int32))
    assert nuclei.max() == truth.max() and clusters.max() == 1


def test_disagreeing_windows_join_only_the_matching_piece() -> None:
    """Near the seam one window splits a bar the other keeps whole: the cores keep their own
    window's objects; the piece that matches across the seam is joined."""
    bar = np.zeros((20, 60), np.int32)
    bar[8:12, 5:55] = 1

    def segment(b: Block) -> list[np.ndarray]:
        crop = bar[b.window].copy()
        if b.index == (0, 1):  # this window cuts the bar in two at x = 34, near its core's edge
            crop[:, 34 - b.window[1].start :] *= 2
        return [crop[np.newaxis]]

    (out,) = stitch_blocks((1, 20, 60), plan_blocks((20, 60), 30, 12), segment, halo=12)
    expected = bar.copy()
    expected[:, 34:] *= 2
    assert same_partition(out[0], expected)


def test_a_one_pixel_disagreement_does_not_merge_neighbours() -> None:
    truth = _touching_labels()

    def segment(b: Block) -> list[np.ndarray]:
        crop = truth[b.window]
        if sum(b.index) % 2:  # every other window puts each boundary one pixel to the right
            crop = np.where(crop > 0, np.roll(crop, 1, axis=1), 0)
        return [crop[np.newaxis]]

    (out,) = stitch_blocks((1, *truth.shape), plan_blocks(truth.shape, 33, 8), segment, halo=8)
    assert out.max() == truth.max()
    for i in range(1, truth.max() + 1):
        ids, counts = np.unique(out[0][truth == i], return_counts=True)
        assert counts.max() >= 0.9 * counts.sum() and ids[np.argmax(counts)] > 0


def test_junk_at_window_edges_is_ignored() -> None:
    """A window's own edge (away from the image border) may be segmented badly: here everything
    within half a halo of it is one object. Neither the cores nor the links see it."""
    truth = _touching_labels()
    halo = 8

    def segment(b: Block) -> list[np.ndarray]:
        crop = truth[b.window].copy()
        edge = np.zeros(crop.shape, bool)
        for axis, (w, n) in enumerate(zip(b.window, truth.shape, strict=True)):
            idx = [slice(None), slice(None)]
            if w.start > 0:
                idx[axis] = slice(0, halo // 2)
                edge[tuple(idx)] = True
            if w.stop < n:
                idx[axis] = slice(crop.shape[axis] - halo // 2, None)
                edge[tuple(idx)] = True
        crop[edge & (crop > 0)] = truth.max() + 1
        return [crop[np.newaxis]]

    (out,) = stitch_blocks(
        (1, *truth.shape), plan_blocks(truth.shape, 30, halo), segment, halo=halo
    )
    assert same_partition(out[0], truth)


def test_a_piece_cut_off_in_one_window_joins_its_object() -> None:
    """A U whose bottom lies outside the left window: there the thin arm is a piece of its own,
    mostly (with its bulge) near the window's edge; the right window sees the U whole, so the
    piece joins it."""
    u = np.zeros((16, 80), bool)
    u[0:9, 20:76] = True  # thick arm, crosses the seam at x = 40
    u[12:14, 34:76] = True  # thin arm, also crosses it
    u[0:14, 72:76] = True  # the bottom, outside the left window (x < 50)
    u[10:16, 45:50] = True  # a bulge on the thin arm, where the left window sees badly

    def segment(b: Block) -> list[np.ndarray]:
        return [label(u[b.window])[np.newaxis]]

    (out,) = stitch_blocks((1, *u.shape), plan_blocks(u.shape, 40, 10), segment, halo=10)
    assert same_partition(out[0], u.astype(np.int32))


def test_empty_windows_and_an_empty_image() -> None:
    lab = np.zeros((60, 60), np.int32)
    lab[5:15, 5:15] = 7  # one object, in the first block only

    def segment(b: Block) -> list[np.ndarray]:
        return [label(lab[b.window] > 0)[np.newaxis]]

    (out,) = stitch_blocks((1, 60, 60), plan_blocks((60, 60), 20, 4), segment, halo=4)
    assert same_partition(out[0], lab) and out.max() == 1
    (none,) = stitch_blocks(
        (1, 60, 60),
        plan_blocks((60, 60), 20, 4),
        lambda b: [np.zeros((1, *lab[b.window].shape), np.int32)],
        halo=4,
    )
    assert none.dtype == np.int32 and not none.any()
