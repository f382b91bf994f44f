#!/usr/bin/env python
"""Create the default model's training and validation datasets (islet-imaging dataset layout).

Writes, under ``--out`` (default ``runs/data``, git-ignored):

- ``synth_train/``: synthetic fields (written with :func:`islet_imaging.synth.write_synth_field`,
  truth tables included) of every stage (seeds 0–999): ``--n-2d`` 2D fields per stage
  plus ``--n-3d`` z-stacks per aggregate stage (used plane by plane), each at a pixel size drawn
  uniformly from ``--pixel-size-range`` (µm), so the network sees different samplings after
  rescaling to its training scale. ``--train-seeds START STOP`` draws them from another seed
  range (inside 0–999), e.g. a second, disjoint training set. ``--touching P`` makes touching
  clusters more (or less) frequent in the training fields of the colony and aggregate stages: each
  new cluster is placed against an earlier one with probability ``P`` instead of the stage's own
  (0.3–0.5), so the network sees more of the contacts it merges most (validation fields keep the
  stages' own looks).
- ``synth_val/``: the same with seeds 1000–1099 (validation and threshold tuning).
  Seeds ≥ 9000 are the held-out test set (benchmarks/accuracy.py) and are never used here.
- ``dsb_train/`` and ``dsb_val/``: the ``train`` and ``val`` splits of the DSB 2018 fluorescence
  nuclei (``--dsb``), as symbolic links (nothing copied), with a metadata.csv giving each image a
  nominal pixel size chosen so that its median nucleus (equivalent diameter from its own mask) is
  ``--nucleus-diameter-um`` at the model scale. The ``test`` split is never touched.

Usage::

    .venv/bin/python scripts/make_training_data.py --out runs/data
    # a second training set from the unused seeds, written to runs/data2/synth_train only
    .venv/bin/python scripts/make_training_data.py --out runs/data2 --train-only \
        --train-seeds 448 1000 --n-2d 60 --n-3d 8 --workers 2
    # the same with touching clusters in most fields
    .venv/bin/python scripts/make_training_data.py --out runs/data3 --train-only \
        --train-seeds 448 1000 --n-2d 60 --n-3d 8 --workers 2 --touching 0.8
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from islet_imaging.io import read_labels
from islet_imaging.stages import BUILTIN_STAGES, get_stage
from islet_imaging.synth import generate_field
from islet_imaging.synth._dataset import metadata_row, write_metadata, write_synth_field
from islet_imaging.synth._stages import look_for

log = logging.getLogger("make_training_data")

REPO = Path(__file__).resolve().parents[1]
TRAIN_SEEDS = range(0, 1000)
VAL_SEEDS = range(1000, 1100)
#: DSB images get this stage (its cluster input is the nuclear stain; they have no cluster labels).
DSB_STAGE = "definitive-endoderm"


def _write_synth(
    out: Path,
    name: str,
    stage: str,
    seed: int,
    size: int,
    z: int,
    pixel_size: float,
    touching: float | None = None,
) -> dict[str, object]:
    profile = get_stage(stage)
    look = look_for(profile)
    if touching is not None and look.layout != "sheet":  # monolayer sheets have no blobs
        look = dataclasses.replace(look, touching=touching)
    s = generate_field(
        profile, seed=seed, size=size, z=z, pixel_size_um=pixel_size, z_step_um=2.0, look=look
    )
    write_synth_field(out, name, s, overwrite=True)
    row = metadata_row(name, s)
    row["pixel_size_um"] = round(pixel_size, 4)  # as the shipped model's data were written
    return row


def make_synth(
    out: Path,
    seeds: range,
    *,
    n_2d: int,
    n_3d: int,
    size: int,
    z: int,
    pixel_size_range: tuple[float, float],
    workers: int = 1,
    touching: float | None = None,
) -> None:
    """Synthetic fields of every stage into ``out`` (dataset layout + metadata.csv)."""
    jobs = []
    per_stage = n_2d + n_3d
    if per_stage * len(BUILTIN_STAGES) > len(seeds):
        raise SystemExit(
            f"{per_stage} fields x {len(BUILTIN_STAGES)} stages do not fit seeds {seeds}"
        )
    for k, profile in enumerate(BUILTIN_STAGES):
        three_d = profile.cluster_kind == "aggregate"
        for i in range(per_stage):
            seed = seeds.start + k * per_stage + i
            is_3d = i >= n_2d
            if is_3d and not three_d:
                continue
            px = float(np.random.default_rng([seed, 17]).uniform(*pixel_size_range))
            name = f"{profile.short_name}_s{seed:04d}" + ("_3d" if is_3d else "")
            jobs.append((out, name, profile.name, seed, size, z if is_3d else 1, px, touching))
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        rows = list(pool.map(_write_synth, *zip(*jobs, strict=True)))
    log.info("%s: %d fields (%.0f s)", out.name, len(rows), time.perf_counter() - t0)
    write_metadata(out, rows)


def _write_dsb_metadata(out: Path, rows: list[list[str]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "metadata.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["name", "stage", "pixel_size_um", "z_step_um", "channel_names"])
        w.writerows(rows)


def median_diameter_px(labels: np.ndarray) -> float | None:
    """Median equivalent diameter (px) of the objects of a 2D label image."""
    lab = np.asarray(labels).reshape(labels.shape[-2:])
    counts = np.bincount(lab.ravel())[1:]
    counts = counts[counts > 0]
    if counts.size == 0:
        return None
    return float(np.median(np.sqrt(4.0 * counts / math.pi)))


def make_dsb(out: Path, dsb: Path, split: str, *, nucleus_diameter_um: float) -> None:
    """Link one DSB 2018 split into ``out`` with nominal pixel sizes from its own masks."""
    if split == "test":
        raise SystemExit("the DSB test split is for benchmarks only; never train or tune on it")
    with (dsb / "split.csv").open(newline="") as fh:
        ids = [r["id"] for r in csv.DictReader(fh) if r["split"] == split]
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    rows = []
    for image_id in ids:
        d = median_diameter_px(read_labels(dsb / "masks" / f"{image_id}.tif"))
        if d is None:
            log.info("%s: no nuclei in mask; skipped", image_id)
            continue
        for link, target in (
            (out / "images" / f"{image_id}.png", dsb / "images" / f"{image_id}.png"),
            (out / "labels" / f"{image_id}_nuclei.tif", dsb / "masks" / f"{image_id}.tif"),
        ):
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(target.resolve())
        rows.append([image_id, DSB_STAGE, f"{nucleus_diameter_um / d:.5f}", "", "DAPI"])
    _write_dsb_metadata(out, rows)
    log.info("%s: %d DSB %s images linked", out, len(rows), split)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=REPO / "runs" / "data")
    p.add_argument("--n-2d", type=int, default=48, help="2D training fields per stage")
    p.add_argument("--n-3d", type=int, default=8, help="z-stacks per aggregate stage (training)")
    p.add_argument("--n-val-2d", type=int, default=4, help="2D validation fields per stage")
    p.add_argument(
        "--n-val-3d", type=int, default=2, help="z-stacks per aggregate stage (validation)"
    )
    p.add_argument("--size", type=int, default=384, help="field side in pixels")
    p.add_argument("--z", type=int, default=5, help="planes per z-stack")
    p.add_argument(
        "--pixel-size-range", type=float, nargs=2, default=(0.5, 0.85), metavar=("MIN", "MAX")
    )
    p.add_argument("--dsb", type=Path, default=REPO.parent / "shared" / "data" / "dsb2018_fluo")
    p.add_argument(
        "--nucleus-diameter-um",
        type=float,
        default=8.5,
        help="typical nucleus diameter the DSB images are scaled to (the model's "
        "typical_nucleus_diameter_um)",
    )
    p.add_argument("--skip-synth", action="store_true")
    p.add_argument(
        "--train-seeds",
        type=int,
        nargs=2,
        default=(TRAIN_SEEDS.start, TRAIN_SEEDS.stop),
        metavar=("START", "STOP"),
        help="seed range of the training fields (inside 0-999; default: all of it)",
    )
    p.add_argument(
        "--train-only",
        action="store_true",
        help="write synth_train only (no validation fields, no DSB links)",
    )
    p.add_argument("--workers", type=int, default=1, help="processes generating fields")
    p.add_argument(
        "--touching",
        type=float,
        default=None,
        metavar="P",
        help="probability (0-1) that a new cluster of a training field touches an earlier one, "
        "for the colony and aggregate stages (default: each stage's own, 0.3-0.5)",
    )
    args = p.parse_args(argv)
    if args.touching is not None and not 0 <= args.touching <= 1:
        p.error(f"--touching {args.touching:g}: give a probability between 0 and 1, e.g. 0.8")
    train_seeds = range(*args.train_seeds)
    if not (TRAIN_SEEDS.start <= train_seeds.start < train_seeds.stop <= TRAIN_SEEDS.stop):
        p.error(
            f"--train-seeds {args.train_seeds[0]} {args.train_seeds[1]}: give START < STOP "
            f"inside {TRAIN_SEEDS.start}-{TRAIN_SEEDS.stop} (validation, tuning and held-out "
            "fields use the seeds above), e.g. --train-seeds 448 1000"
        )
    if args.workers < 1:
        p.error("--workers must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    lo, hi = args.pixel_size_range
    if not args.skip_synth and not args.train_only:
        make_synth(
            args.out / "synth_val",
            VAL_SEEDS,
            n_2d=args.n_val_2d,
            n_3d=args.n_val_3d,
            size=args.size,
            z=args.z,
            pixel_size_range=(lo, hi),
            workers=args.workers,
        )
    if not args.skip_synth:
        make_synth(
            args.out / "synth_train",
            train_seeds,
            n_2d=args.n_2d,
            n_3d=args.n_3d,
            size=args.size,
            z=args.z,
            pixel_size_range=(lo, hi),
            workers=args.workers,
            touching=args.touching,
        )
    if not args.train_only and args.dsb.is_dir():
        for split in ("train", "val"):
            make_dsb(
                args.out / f"dsb_{split}",
                args.dsb,
                split,
                nucleus_diameter_um=args.nucleus_diameter_um,
            )
    elif not args.train_only:
        log.warning("%s not found: no DSB 2018 data (synthetic only)", args.dsb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
