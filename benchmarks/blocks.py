"""What block-wise segmentation changes: the shipped model on large held-out synthetic fields,
segmented whole and block by block (``segment_cnn(block=, block_halo_um=)``).

For each stage, one ``--size``² field at 0.65 µm/px (``--pixel-size``; seed 9100 + stage index,
not used in training or tuning) is segmented whole and in blocks of ``--block`` px (small blocks, so that
many objects cross block edges). Reported per stage and pooled: AP@0.5 of the block-wise labels
against the truth next to the whole field's, and how closely block-wise labels reproduce the
whole field's (AP@0.9 and @0.5 of one against the other), for nuclei and clusters, and both
times.

Usage::

    .venv/bin/python benchmarks/blocks.py --halos 160 200 320 --out benchmarks/results/blocks.json
    .venv/bin/python benchmarks/blocks.py --pixel-size 0.5 --out benchmarks/results/blocks_0.5um.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STAGES = ("S0", "S1", "eESC", "S2", "S3", "S4", "S5", "S6")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--halos", type=float, nargs="+", default=[200.0], metavar="UM")
    parser.add_argument("--stages", nargs="+", default=list(STAGES))
    parser.add_argument(
        "--pixel-size",
        type=float,
        default=0.65,
        metavar="UM",
        help="of the fields (0.65: the model's own, no resizing)",
    )
    parser.add_argument("--model", default="default")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    from islet_imaging.metrics import match
    from islet_imaging.models import load_model
    from islet_imaging.models.inference import segment_cnn
    from islet_imaging.stages import get_stage
    from islet_imaging.synth import generate_field

    model = load_model(args.model)
    rows: list[dict[str, Any]] = []
    for i, stage in enumerate(args.stages):
        profile = get_stage(stage)
        s = generate_field(profile, seed=9100 + i, size=args.size, pixel_size_um=args.pixel_size)
        t0 = time.perf_counter()
        whole = segment_cnn(s.field, profile, model=model, block=None)
        t_whole = time.perf_counter() - t0
        for halo in args.halos:
            t0 = time.perf_counter()
            parts = segment_cnn(s.field, profile, model=model, block=args.block, block_halo_um=halo)
            row: dict[str, Any] = {
                "stage": profile.name,
                "halo_um": halo,
                "seconds_whole": round(t_whole, 1),
                "seconds_blocks": round(time.perf_counter() - t0, 1),
            }
            for kind in ("nuclei", "clusters"):
                truth, w, p = getattr(s, kind), getattr(whole, kind), getattr(parts, kind)
                row[f"{kind}_n_truth"] = int(truth.max())
                row[f"{kind}_ap50_whole"] = round(match(truth, w, thresholds=0.5)[0].ap, 4)
                row[f"{kind}_ap50_blocks"] = round(match(truth, p, thresholds=0.5)[0].ap, 4)
                same = match(w, p, thresholds=(0.5, 0.9))
                row[f"{kind}_blocks_vs_whole_ap50"] = round(same[0].ap, 4)
                row[f"{kind}_blocks_vs_whole_ap90"] = round(same[1].ap, 4)
            rows.append(row)
            print(json.dumps(row), flush=True)
    res = {
        "model": str(model.path),
        "size": args.size,
        "block": args.block,
        "pixel_size_um": args.pixel_size,
        "seeds": f"9100 + stage index (stages {args.stages})",
        "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
