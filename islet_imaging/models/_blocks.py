"""Block-wise segmentation: a large field segmented window by window, labels stitched across blocks.

A field larger than one block is cut into a grid of **cores** (each about ``block`` pixels a
side) that cover it exactly once. Each core is segmented inside a **window**: the core grown by
a ``halo`` on every side that is not the image border, so that objects near the core's edge
are seen whole, with their surroundings. Each window's labels are cropped to its core and
written with ids unique to the window. Then labels of neighbouring windows (side by side or
one above the other; across a corner the links follow through the halos) are **linked** where
they describe the same object. Inside the band where both windows see well (their overlap, less
half a halo at each window edge inside the image), two labels are one object when their
intersection over union there is at least 0.5, or when they share at least half of the smaller
one (counted where its own window sees well): a piece that one window sees cut off from a large
object, whose connection lies outside that window. Linked ids are merged (union-find) and all
ids renumbered 1..N.

An object that crosses a core edge therefore keeps one label, however large: a monolayer
sheet spanning the whole well is linked window to window. Two objects that touch across a core
edge stay apart, since their labels do not overlap in either window, and a one-pixel
disagreement about where their boundary lies does not join them. When the two windows disagree
more (one splits near the core edge what the other keeps whole), each core keeps its own
window's objects and only the piece that matches is joined.

Memory: one window's segmentation, the bands of the windows still waiting for a later
neighbour (about one row of windows × the halo), and the output labels. It does not grow with
the number of blocks beyond those.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["BLOCK_HALO_UM", "BLOCK_PX", "Block", "plan_blocks", "stitch_blocks"]

#: Fields with more pixels than this along y or x are segmented block by block
#: (``segment_cnn(block=)``): beyond the field and its labels, memory then stays that of a
#: field this size.
BLOCK_PX = 4096
#: Context around each block (µm). Held-out synthetic 2048² fields of all 8 stages (clusters up
#: to 300 µm across) cut into 1024 px blocks gave the whole field's labels with halos of 160,
#: 200 and 320 µm (``benchmarks/blocks.py``); the time grows with the halo.
BLOCK_HALO_UM = 200.0

#: Two labels of neighbouring windows are one object when their intersection over union in the
#: band both windows share is at least this.
LINK_IOU = 0.5


@dataclass(frozen=True)
class Block:
    """One block of a grid: where its labels are kept (``core``) and what is segmented
    (``window``), as ``(y, x)`` slices of the whole image.

    Parameters
    ----------
    index : (int, int)
        Row and column in the grid.
    core : (slice, slice)
        Kept part; the cores of a grid tile the image exactly.
    window : (slice, slice)
        The core with its halo, clipped to the image.
    """

    index: tuple[int, int]
    core: tuple[slice, slice]
    window: tuple[slice, slice]

    @property
    def core_in_window(self) -> tuple[slice, slice]:
        """``core`` in the window's own coordinates."""
        return self.in_window(self.core)

    def in_window(self, region: tuple[slice, slice]) -> tuple[slice, slice]:
        """A ``(y, x)`` region of the image in the window's own coordinates."""
        return tuple(  # type: ignore[return-value]
            slice(r.start - w.start, r.stop - w.start)
            for r, w in zip(region, self.window, strict=True)
        )


def _cuts(length: int, block: int) -> list[int]:
    """Core edges along one axis: as few cores of at most ``block`` as cover it, equal sizes."""
    n = max(1, math.ceil(length / block))
    return [round(i * length / n) for i in range(n + 1)]


def plan_blocks(shape: Sequence[int], block: int, halo: int, *, align: int = 1) -> list[Block]:
    """The grid of blocks of an image, in row-major order.

    Parameters
    ----------
    shape : (int, int)
        ``(Y, X)`` of the image.
    block : int
        Largest core side in pixels; an axis of at most ``block`` pixels is not cut.
    halo : int
        Context added around each core, in pixels.
    align : int
        Window starts are multiples of this (the halo grows by up to ``align - 1`` pixels): a
        network whose pooling grid starts at the window's corner then sees the pixels on the
        same grid as in the whole image.

    Examples
    --------
    >>> [(b.index, b.core, b.window) for b in plan_blocks((10, 4), 6, 2)]  # doctest: +NORMALIZE_WHITESPACE
    [((0, 0), (slice(0, 5, None), slice(0, 4, None)), (slice(0, 7, None), slice(0, 4, None))),
     ((1, 0), (slice(5, 10, None), slice(0, 4, None)), (slice(3, 10, None), slice(0, 4, None)))]
    """
    if block < 1 or halo < 0 or align < 1:
        raise ValueError(
            f"block ({block}) and align ({align}) must be positive, halo ({halo}) not negative"
        )
    h, w = (int(s) for s in shape)
    ys, xs = _cuts(h, block), _cuts(w, block)
    blocks = []
    for r in range(len(ys) - 1):
        for c in range(len(xs) - 1):
            core = (slice(ys[r], ys[r + 1]), slice(xs[c], xs[c + 1]))
            window = (
                slice(max(0, (ys[r] - halo) // align * align), min(h, ys[r + 1] + halo)),
                slice(max(0, (xs[c] - halo) // align * align), min(w, xs[c + 1] + halo)),
            )
            blocks.append(Block((r, c), core, window))
    return blocks


def _trusted(blk: Block, halo: int, shape: Sequence[int]) -> tuple[slice, slice]:
    """Where a window sees well: all of it but half a halo at each edge inside the image."""
    trim = halo // 2
    return tuple(  # type: ignore[return-value]
        slice(w.start + (trim if w.start > 0 else 0), w.stop - (trim if w.stop < n else 0))
        for w, n in zip(blk.window, shape, strict=True)
    )


def _band(a: Block, b: Block, halo: int, shape: Sequence[int]) -> tuple[slice, slice] | None:
    """Where both windows see well."""
    ta, tb = _trusted(a, halo, shape), _trusted(b, halo, shape)
    band = tuple(
        slice(max(p.start, q.start), min(p.stop, q.stop)) for p, q in zip(ta, tb, strict=True)
    )
    return None if any(sl.stop <= sl.start for sl in band) else band  # type: ignore[return-value]


class _UnionFind:
    """Disjoint sets of label ids (only linked ids are stored); the root is the smallest id."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, i: int) -> int:
        root = i
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while i != root:  # path compression
            i, self.parent[i] = self.parent[i], root
        return root

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            lo, hi = min(ri, rj), max(ri, rj)
            self.parent[hi] = lo
            self.parent.setdefault(lo, lo)


def _links(a: np.ndarray, b: np.ndarray, sizes: np.ndarray) -> Iterator[tuple[int, int]]:
    """Pairs of ids of two label crops of the same pixels that describe one object.

    Linked: an intersection over union in the crops of at least :data:`LINK_IOU`, or an
    intersection of at least half the smaller label, counted where its window sees well
    (``sizes``, by id): a piece that one window sees cut off from the rest of a large object
    (the link between them lies outside that window), inside what the other window sees whole.
    """
    both = (a > 0) & (b > 0)
    if not both.any():
        return
    pairs = (a[both].astype(np.int64) << 32) | b[both].astype(np.int64)
    keys, counts = np.unique(pairs, return_counts=True)
    ids_a, size_a = np.unique(a[a > 0], return_counts=True)
    ids_b, size_b = np.unique(b[b > 0], return_counts=True)
    la, lb = keys >> 32, keys & 0xFFFFFFFF
    union = size_a[np.searchsorted(ids_a, la)] + size_b[np.searchsorted(ids_b, lb)] - counts
    keep = (counts >= LINK_IOU * union) | (2 * counts >= np.minimum(sizes[la], sizes[lb]))
    for i, j in zip(la[keep], lb[keep], strict=True):
        yield int(i), int(j)


def stitch_blocks(
    shape: Sequence[int],
    blocks: Sequence[Block],
    segment: Callable[[Block], Sequence[np.ndarray]],
    *,
    halo: int,
) -> list[np.ndarray]:
    """Segment an image block by block and stitch the labels (see the module notes).

    Parameters
    ----------
    shape : (Z, Y, X)
        Of the whole image.
    blocks : sequence of Block
        From :func:`plan_blocks` (row-major order).
    segment : callable
        ``segment(block)`` → label images ``(Z, wy, wx)`` of the block's window, one per kind of
        object (e.g. nuclei and clusters), labels unique within the window.
    halo : int
        The halo the blocks were planned with.

    Returns
    -------
    list of (Z, Y, X) ndarray of int32
        One per kind, labels 1..N.
    """
    shape = tuple(int(s) for s in shape)
    plane = shape[1:]
    by_index = {b.index: b for b in blocks}
    outputs: list[np.ndarray] = []
    sets: list[_UnionFind] = []
    present: list[list[np.ndarray]] = []
    next_id: list[int] = []
    sizes: list[np.ndarray] = []  # per kind: pixels of each id where its window sees well
    # bands this block left for later neighbours: index → [(band, [crop per kind])]
    pending: dict[tuple[int, int], list[tuple[tuple[slice, slice], list[np.ndarray]]]] = {}
    for blk in blocks:
        labels = [np.asarray(lab) for lab in segment(blk)]
        if not labels:
            raise ValueError("segment() returned no label images")
        if not outputs:
            outputs = [np.zeros(shape, np.int32) for _ in labels]
            sets = [_UnionFind() for _ in labels]
            present = [[] for _ in labels]
            next_id = [0 for _ in labels]
            sizes = [np.zeros(1, np.int64) for _ in labels]
        trusted = (slice(None), *blk.in_window(_trusted(blk, halo, plane)))
        ids = []
        for k in range(len(labels)):
            lab, labels[k] = labels[k], None  # type: ignore[call-overload]
            n = int(lab.max(initial=0))
            if n + next_id[k] >= np.iinfo(np.int32).max:
                raise OverflowError("more than 2**31 labels")
            core = (slice(None), *blk.core_in_window)
            in_core = np.bincount(lab[core].reshape(-1), minlength=n + 1)
            present[k].append(np.flatnonzero(in_core[1:]) + 1 + next_id[k])
            seen = np.bincount(lab[trusted].reshape(-1), minlength=n + 1)[1:]
            sizes[k] = np.concatenate([sizes[k], seen])
            # ids unique over all windows (a copy: the caller's arrays are left alone)
            glob = lab.astype(np.int32)
            del lab
            glob[glob > 0] += np.int32(next_id[k])
            outputs[k][(slice(None), *blk.core)] = glob[core]
            next_id[k] += n
            ids.append(glob)
            del glob
        for band, crops in pending.pop(blk.index, []):
            for k, crop in enumerate(crops):
                for i, j in _links(crop, ids[k][(slice(None), *blk.in_window(band))], sizes[k]):
                    sets[k].union(i, j)
        r, c = blk.index
        for later in ((r, c + 1), (r + 1, c)):  # diagonal links follow through these
            other = by_index.get(later)
            band = None if other is None else _band(blk, other, halo, plane)
            if band is None:
                continue
            crops = [g[(slice(None), *blk.in_window(band))].copy() for g in ids]
            pending.setdefault(later, []).append((band, crops))
        del labels, ids
    for k, out in enumerate(outputs):
        _renumber(out, sets[k], present[k], next_id[k])
    return outputs


def _renumber(out: np.ndarray, sets: _UnionFind, present: list[np.ndarray], n_ids: int) -> None:
    """Map every id to its set's root and the roots to 1..N in order, in place, in chunks."""
    lut = np.arange(n_ids + 1, dtype=np.int64)
    for i in list(sets.parent):
        lut[i] = sets.find(i)
    used = np.concatenate(present) if present else np.zeros(0, np.int64)
    roots = np.unique(lut[used])
    final = np.zeros(n_ids + 1, np.int32)
    final[roots] = np.arange(1, roots.size + 1, dtype=np.int32)
    lut = final[lut]
    flat = out.reshape(-1)
    step = 1 << 22
    for s in range(0, flat.size, step):
        flat[s : s + step] = lut[flat[s : s + step]]
