#!/usr/bin/env python
"""Choose a model's ``clusters_saddle`` (the combined cluster split) on synthetic tuning fields.

The network runs once per field; the post-processing is then repeated on the cached maps for
every candidate value. Tuning fields: seeds ``--seeds`` (default 1100-1115: neither training
seeds 0-1099 nor the held-out benchmark seeds >= 9000) of every colony and aggregate stage
(monolayer patches are not split), ``--size``² px, each at a pixel size drawn uniformly from
``--pixel-size-range`` µm. Prints pooled cluster AP@0.5 / AP@0.75 per stage and over all, and
the value with the best pooled AP@0.5 (ties: the better AP@0.75, then the value closest to the
model's current one).

Usage::

    .venv/bin/python scripts/tune_cluster_split.py --model models/default
    .venv/bin/python scripts/tune_cluster_split.py --model models/default --write   # into thresholds.json
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

log = logging.getLogger("tune_cluster_split")


def _seeds(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    try:
        return list(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a seed range; give FIRST-LAST, e.g. 1100-1115"
        ) from None


def tuning_maps(model, seeds: list[int], size: int, pixel_size_range) -> list[tuple]:
    """Network maps of the tuning fields: (stage short name, field, profile, maps, spacing, truth)."""
    from islet_imaging.models.inference import predict_field_maps
    from islet_imaging.stages import BUILTIN_STAGES
    from islet_imaging.synth import generate_field

    rng = np.random.default_rng(0)
    cached = []
    for profile in BUILTIN_STAGES:
        if profile.cluster_kind == "monolayer-patch":
            continue
        for seed in seeds:
            px = float(rng.uniform(*pixel_size_range))
            s = generate_field(profile.name, seed=seed, size=size, pixel_size_um=px)
            maps, spacing = predict_field_maps(s.field, profile, model, dtype=np.float16)
            cached.append((profile.short_name, s.field, profile, maps, spacing, s.clusters))
        log.info("%s: maps of %d fields", profile.short_name, len(seeds))
    return cached


def cluster_ap(cached: list[tuple], model, thresholds) -> dict[str, tuple[float, float]]:
    """Pooled cluster AP@0.5 and AP@0.75 per stage and over all (key ``"all"``)."""
    from islet_imaging.metrics import match_dataset
    from islet_imaging.models.inference import field_instances

    pairs: dict[str, list] = defaultdict(list)
    for short, fld, profile, maps, spacing, truth in cached:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, clusters = field_instances(maps, spacing, fld, profile, model, thresholds=thresholds)
        pairs[short].append((truth, clusters))
    pairs["all"] = [p for v in list(pairs.values()) for p in v]
    return {
        k: tuple(float(r.ap) for r in match_dataset(v, thresholds=(0.5, 0.75)))
        for k, v in pairs.items()
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="models/default", help="model directory")
    p.add_argument("--seeds", type=_seeds, default=_seeds("1100-1115"), help="e.g. 1100-1115")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--pixel-size-range", type=float, nargs=2, default=(0.5, 0.8))
    p.add_argument(
        "--saddles",
        type=float,
        nargs="+",
        default=[0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5],
    )
    p.add_argument("--write", action="store_true", help="write the best value to thresholds.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from islet_imaging.errors import InputError
    from islet_imaging.models import load_model

    try:
        model = load_model(Path(args.model))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    base = model.thresholds
    cached = tuning_maps(model, args.seeds, args.size, args.pixel_size_range)
    results = {
        v: cluster_ap(cached, model, dataclasses.replace(base, clusters_saddle=v))
        for v in args.saddles
    }
    stages = list(next(iter(results.values())))
    print("| clusters_saddle | " + " | ".join(f"{s} AP@0.5" for s in stages) + " | all AP@0.75 |")
    print("|---" * (len(stages) + 2) + "|")
    for saddle, row in results.items():
        cells = " | ".join(f"{row[s][0]:.3f}" for s in stages)
        print(f"| {saddle:g} | {cells} | {row['all'][1]:.3f} |")
    best = max(
        results,
        key=lambda v: (
            round(results[v]["all"][0], 4),
            round(results[v]["all"][1], 4),
            -abs(v - base.clusters_saddle),
        ),
    )
    print(f"best clusters_saddle: {best:g} (current {base.clusters_saddle:g})")
    if args.write:
        from islet_imaging.models._modeldir import write_thresholds

        path = write_thresholds(args.model, dataclasses.replace(base, clusters_saddle=best))
        print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
