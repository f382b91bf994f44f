#!/usr/bin/env python
"""Accuracy of the segmentation models on held-out data: the default CNN vs the classical baseline.

Two test sets, neither used for training or tuning:

1. **Synthetic, held out** (exact truth from :mod:`islet_imaging.synth`): ``--n-per-stage`` 2D
   fields of ``--size``² px at 0.65 µm/px for every stage (seeds 9000, 9001, ...: the same fields
   as ``benchmarks/classical_accuracy.py``); ``--n-alt`` more per stage at ``--alt-pixel-size``
   µm/px (seeds 9010+, a check of the scale handling); ``--n-3d`` z-stacks per aggregate stage
   (S4–S6, seeds 9020+); ``--n-mip`` maximum-intensity projections of ``--z-mip``-plane z-stacks
   per aggregate stage (seeds 9400+; clusters only, against their outlines seen from above).
   Nuclei and clusters are matched to the truth.
2. **DSB 2018 fluorescence nuclei, ``test`` split** (``--dsb``): real images, no pixel size, so
   the nucleus diameter in pixels is given to the segmenters, estimated *without the test masks*
   in one of two ways (both reported): ``image`` — from each image alone
   (:func:`islet_imaging.models.classical.estimate_nucleus_diameter`, Otsu + median object size),
   or ``train-median`` — one fixed value, the median over the ``train`` split of each image's
   median nucleus diameter (from the train masks). For the CNN a third row leaves the diameter
   out, so that inference estimates it itself (scale-normalised LoG). Nuclei only.
   ``--dsb-split val`` scores the ``val`` split instead, to compare training recipes or models
   without looking at ``test``.

Metric: AP = tp / (tp + fp + fn) at IoU 0.5 and 0.75 (StarDist / DSB 2018 "average precision"),
pooled over the images of a group (:func:`islet_imaging.metrics.match_dataset`). Synthetic rows
also hold ``<class>_unmatched50``: why objects went unmatched at IoU 0.5 (missed, split, merged,
outline; :func:`islet_imaging.metrics.error_kinds`), summed over the group's images.

Usage::

    .venv/bin/python benchmarks/accuracy.py                      # everything, writes results/
    .venv/bin/python benchmarks/accuracy.py --methods default --skip-dsb --n-per-stage 1
    .venv/bin/python benchmarks/accuracy.py --methods default runs/x --dsb-split val \
        --n-per-stage 0 --n-alt 0 --n-3d 0 --out /tmp/val.json
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("accuracy")

THRESHOLDS = (0.5, 0.75)


def _ap(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float]:
    from islet_imaging.metrics import match_dataset

    if not pairs:
        return (math.nan, math.nan)
    res = match_dataset(pairs, thresholds=THRESHOLDS)
    return (float(res[0].ap), float(res[1].ap))


def _unmatched(pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, int]:
    """Why objects went unmatched at IoU 0.5 (:func:`islet_imaging.metrics.error_kinds`), summed."""
    from islet_imaging.metrics import error_kinds, pool_error_kinds

    return pool_error_kinds(error_kinds(t, p, threshold=THRESHOLDS[0]) for t, p in pairs)


def _segment(field, stage: str, method: str, nucleus_diameter: float | None = None):
    from islet_imaging.models.inference import AUGMENTED_SUFFIX
    from islet_imaging.segment import segment_field

    name, augment = method.removesuffix(AUGMENTED_SUFFIX), method.endswith(AUGMENTED_SUFFIX)
    model = name if name in ("classical", "default") else Path(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return segment_field(
            field, stage=stage, model=model, nucleus_diameter_um=nucleus_diameter, augment=augment
        )


def synthetic(args: argparse.Namespace) -> list[dict[str, object]]:
    """Per (method, stage, kind) pooled AP on held-out synthetic fields."""
    from islet_imaging.stages import BUILTIN_STAGES
    from islet_imaging.synth import generate_field

    jobs = []
    for profile in BUILTIN_STAGES:
        for i in range(args.n_per_stage):
            jobs.append((profile, 9000 + i, 1, 0.65, args.size, "2D"))
        for i in range(args.n_alt):
            alt = f"2D @{args.alt_pixel_size:g} µm/px"
            jobs.append((profile, 9010 + i, 1, args.alt_pixel_size, args.size, alt))
        if profile.cluster_kind == "aggregate":
            for i in range(args.n_3d):
                jobs.append((profile, 9020 + i, args.z, 0.65, args.size_3d, "3D"))
            for i in range(args.n_mip):
                jobs.append((profile, 9400 + i, args.z_mip, 0.65, args.size, "MIP"))
    z_step = args.z_step
    pairs: dict[tuple[str, str, str, str], list] = defaultdict(list)
    seconds: dict[tuple[str, str], float] = defaultdict(float)
    for profile, seed, z, px, size, kind in jobs:
        s = generate_field(
            profile.name, seed=seed, size=size, z=z, z_step_um=z_step, pixel_size_um=px
        )
        field, truths = s.field, {"nuclei": s.nuclei, "clusters": s.clusters}
        if kind == "MIP":
            field, truths = _projection(s)
        for method in args.methods:
            t0 = time.perf_counter()
            lab = _segment(field, profile.name, method)
            seconds[(method, kind)] += time.perf_counter() - t0
            for cls_name, truth in truths.items():
                pred = lab.nuclei if cls_name == "nuclei" else lab.clusters
                pairs[(method, profile.short_name, kind, cls_name)].append((truth, pred))
        log.info("synthetic %s seed %d (%s, %.2f µm/px) done", profile.short_name, seed, kind, px)
    rows = []
    for method in args.methods:
        groups = sorted({(st, kind) for (m, st, kind, _c) in pairs if m == method})
        order = {p.short_name: i for i, p in enumerate(BUILTIN_STAGES)}
        kinds = list(dict.fromkeys(j[5] for j in jobs))
        groups.sort(key=lambda g: (kinds.index(g[1]), order[g[0]]))
        for kind in kinds:
            sub = [g for g in groups if g[1] == kind]
            if not sub:
                continue
            for st, _ in [*sub, ("all", kind)]:
                row: dict[str, object] = {"method": method, "set": f"synthetic {kind}", "stage": st}
                for cls_name in ("nuclei", "clusters"):
                    if st == "all":
                        pr = [
                            p
                            for (m, s2, k2, c), v in pairs.items()
                            if m == method and k2 == kind and c == cls_name
                            for p in v
                        ]
                    else:
                        pr = pairs[(method, st, kind, cls_name)]
                    a50, a75 = _ap(pr)
                    row[f"{cls_name}_ap50"], row[f"{cls_name}_ap75"] = a50, a75
                    row[f"{cls_name}_unmatched50"] = _unmatched(pr)
                    row["n_images"] = len(pr)
                rows.append(row)
        for kind in kinds:
            if seconds[(method, kind)]:
                log.info("%s %s: %.1f s total", method, kind, seconds[(method, kind)])
    return rows


def _projection(s):  # type: ignore[no-untyped-def]
    """The maximum-intensity projection of a synthetic z-stack and its clusters' truth: each
    aggregate's outline seen from above (where two overlap, the one with the larger label).
    Nuclei are not scored: in a projection they overlap."""
    import dataclasses

    size = dataclasses.replace(s.field.pixel_size, z=None)
    field = dataclasses.replace(
        s.field, data=s.field.data.max(axis=1, keepdims=True), pixel_size=size
    )
    return field, {"clusters": s.clusters.max(axis=0, keepdims=True)}


def _median_diameter_px(labels: np.ndarray) -> float | None:
    counts = np.bincount(np.asarray(labels).ravel())[1:]
    counts = counts[counts > 0]
    return float(np.median(np.sqrt(4 * counts / math.pi))) if counts.size else None


def dsb(args: argparse.Namespace) -> list[dict[str, object]]:
    """Pooled nuclei AP on a DSB 2018 split (``--dsb-split``), ways of choosing the diameter."""
    from islet_imaging.io import read_field, read_labels
    from islet_imaging.models.classical import estimate_nucleus_diameter

    with (args.dsb / "split.csv").open(newline="") as fh:
        split = list(csv.DictReader(fh))
    train_ids = [r["id"] for r in split if r["split"] == "train"]
    test_ids = [r["id"] for r in split if r["split"] == args.dsb_split][: args.dsb_limit or None]
    train_d = [
        d
        for d in (
            _median_diameter_px(read_labels(args.dsb / "masks" / f"{i}.tif")) for i in train_ids
        )
        if d is not None
    ]
    fixed = float(np.median(train_d))
    log.info("DSB train-split median nucleus diameter: %.2f px (%d images)", fixed, len(train_d))
    pairs: dict[tuple[str, str], list] = defaultdict(list)
    for image_id in test_ids:
        fld = read_field(args.dsb / "images" / f"{image_id}.png", channel_names=("DAPI",))
        truth = read_labels(args.dsb / "masks" / f"{image_id}.tif")
        est = estimate_nucleus_diameter(fld.data[0, 0]) or fixed
        for method in args.methods:
            ways: list[tuple[str, float | None]] = [("image", est), ("train-median", fixed)]
            if method != "classical":
                ways.append(("model's own estimate", None))  # segment_cnn estimates it (LoG)
            for how, diameter in ways:
                lab = _segment(fld, args.dsb_stage, method, diameter)
                pairs[(method, how)].append((truth, lab.nuclei))
    rows = []
    for (method, how), pr in sorted(pairs.items()):
        a50, a75 = _ap(pr)
        rows.append(
            {
                "method": method,
                "set": f"DSB2018 {args.dsb_split} (diameter: {how})",
                "stage": args.dsb_stage,
                "nuclei_ap50": a50,
                "nuclei_ap75": a75,
                "clusters_ap50": math.nan,
                "clusters_ap75": math.nan,
                "n_images": len(pr),
            }
        )
    rows.append({"note": f"train-median diameter = {fixed:.2f} px"})
    return rows


def to_markdown(rows: list[dict[str, object]]) -> str:
    def f(v: object) -> str:
        return (
            "–"
            if isinstance(v, float) and math.isnan(v)
            else (f"{v:.3f}" if isinstance(v, float) else str(v))
        )

    head = "| method | set | stage | images | nuclei AP@0.5 | nuclei AP@0.75 | clusters AP@0.5 | clusters AP@0.75 |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "method" not in r:
            continue
        lines.append(
            f"| {r['method']} | {r['set']} | {r['stage']} | {r['n_images']} | {f(r['nuclei_ap50'])} | "
            f"{f(r['nuclei_ap75'])} | {f(r['clusters_ap50'])} | {f(r['clusters_ap75'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=["default", "classical"],
        help="'default', 'classical' or model directories; a CNN name ending in '+augment' "
        "(e.g. 'default+augment') runs with test-time augmentation",
    )
    p.add_argument("--n-per-stage", type=int, default=4, help="2D synthetic fields per stage")
    p.add_argument("--size", type=int, default=512, help="2D field side (px)")
    p.add_argument("--n-alt", type=int, default=1, help="2D fields per stage at --alt-pixel-size")
    p.add_argument(
        "--alt-pixel-size", type=float, default=0.45, help="µm/px of the scale-check fields"
    )
    p.add_argument("--n-3d", type=int, default=1, help="z-stacks per aggregate stage (S4-S6)")
    p.add_argument("--z", type=int, default=5, help="planes per z-stack")
    p.add_argument("--z-step", type=float, default=2.0, help="µm between z-stack planes")
    p.add_argument(
        "--n-mip",
        type=int,
        default=0,
        help="maximum-intensity projections of z-stacks per aggregate stage (seeds 9400+; "
        "clusters only)",
    )
    p.add_argument("--z-mip", type=int, default=12, help="planes of the projected z-stacks")
    p.add_argument("--size-3d", type=int, default=256, help="z-stack side (px)")
    p.add_argument("--dsb", type=Path, default=REPO.parent / "shared" / "data" / "dsb2018_fluo")
    p.add_argument(
        "--dsb-stage", default="S1", help="stage profile used for DSB images (size filters)"
    )
    p.add_argument("--skip-dsb", action="store_true")
    p.add_argument(
        "--dsb-split",
        choices=("test", "val"),
        default="test",
        help="DSB split to score: test (held out; the reported figure) or val (for comparing "
        "training recipes without touching test)",
    )
    p.add_argument(
        "--dsb-limit", type=int, default=0, help="only the first N test images (0 = all)"
    )
    p.add_argument("--skip-synthetic", action="store_true")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "accuracy.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    import torch

    torch.set_num_threads(2)
    rows: list[dict[str, object]] = []
    if not args.skip_synthetic:
        rows += synthetic(args)
    if not args.skip_dsb:
        if args.dsb.is_dir():
            rows += dsb(args)
        else:
            log.warning("%s not found: DSB 2018 part skipped", args.dsb)
    md = to_markdown(rows)
    print(md)
    for r in rows:
        if "note" in r:
            print(f"\n{r['note']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"argv": sys.argv[1:], "rows": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
