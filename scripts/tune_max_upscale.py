#!/usr/bin/env python
"""Choose how much a coarse image is enlarged for the clusters' maps (``MAX_UPSCALE``).

An image whose pixels are coarser than the model's by more than ``MAX_UPSCALE`` goes through the
network twice: nuclei at the full enlargement, clusters at most ``MAX_UPSCALE`` enlarged
(:func:`islet_imaging.models.inference.network_factor`). This script segments coarse synthetic
tuning fields of every stage (seeds ``--seeds``, default 1100-1107: neither training seeds 0-1099
nor the held-out benchmark seeds >= 9000; ``--size``² px, each at a pixel size drawn uniformly
from ``--pixel-size-range`` µm) with each candidate cap of ``--caps`` (``none``: enlarged fully,
one pass) and prints the pooled nuclei and cluster AP@0.5 per stage, a markdown table.

Usage::

    .venv/bin/python scripts/tune_max_upscale.py            # ~10 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections import defaultdict

import numpy as np


def _cap(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="models/default", help="model directory")
    p.add_argument("--seeds", type=int, nargs=2, default=(1100, 1107), metavar=("FIRST", "LAST"))
    p.add_argument("--size", type=int, default=384)
    p.add_argument("--pixel-size-range", type=float, nargs=2, default=(1.2, 1.8))
    p.add_argument("--caps", type=_cap, nargs="+", default=[None, 2.0, 1.8, 1.6])
    args = p.parse_args(argv)

    from islet_imaging.metrics import match, pool_matchings
    from islet_imaging.models import load_model
    from islet_imaging.models.inference import segment_cnn
    from islet_imaging.stages import BUILTIN_STAGES
    from islet_imaging.synth import generate_field

    model = load_model(args.model)
    rng = np.random.default_rng(7)
    fields = [
        (
            profile,
            generate_field(
                profile.name,
                seed=seed,
                size=args.size,
                pixel_size_um=float(rng.uniform(*args.pixel_size_range)),
            ),
        )
        for profile in BUILTIN_STAGES
        for seed in range(args.seeds[0], args.seeds[1] + 1)
    ]
    stages = [profile.short_name for profile in BUILTIN_STAGES]
    print("| max_upscale | " + " | ".join(stages) + " | nuclei (all) | clusters (all) |")
    print("|---" * (len(stages) + 3) + "|")
    for cap in args.caps:
        found: dict[str, dict[str, list]] = defaultdict(lambda: {"nuclei": [], "clusters": []})
        for profile, s in fields:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # coarse images warn: expected
                labels = segment_cnn(s.field, profile, model=model, max_upscale=cap)
            for key in (profile.short_name, "all"):
                found[key]["nuclei"].append(match(s.nuclei, labels.nuclei, thresholds=0.5)[0])
                if profile.cluster_kind != "monolayer-patch":
                    found[key]["clusters"].append(
                        match(s.clusters, labels.clusters, thresholds=0.5)[0]
                    )
        ap = {
            key: {c: f"{pool_matchings(m).ap:.3f}" if m else "–" for c, m in kinds.items()}
            for key, kinds in found.items()
        }
        cells = [
            f"{ap[k]['nuclei']} / {ap[k]['clusters']}" if found[k]["clusters"] else ap[k]["nuclei"]
            for k in stages
        ]
        name = "none" if cap is None else f"{cap:g}"
        row = [name, *cells, ap["all"]["nuclei"], ap["all"]["clusters"]]
        print("| " + " | ".join(row) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
