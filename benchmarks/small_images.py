"""How much accuracy the CNN loses on images smaller than the context it was trained with.

Each held-out synthetic 2D field (512² px at the model's 0.65 µm/px, seeds 9000-9002, all 8
stages) is segmented whole, and square crops of it of each ``--sizes`` side are segmented as
images of their own. Both are scored against the crop of the truth, nuclei AP@0.5 pooled over
all crops of one side:

- *all nuclei*: every object of the crop, including those the crop's edge cuts;
- *interior nuclei*: objects touching the crop's edge removed from truth and prediction alike
  (``border_labels``), i.e. the objects a measurement keeps.

"cut from the whole field" is what the network reaches on the same pixels with the whole field
around them, so the gap to "segmented alone" is what the missing context costs. It decides
:data:`islet_imaging.models.inference.MIN_CONTEXT_PX`, below which inference warns.

Usage::

    .venv/bin/python benchmarks/small_images.py   # ~3 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STAGES = ("S0", "S1", "eESC", "S2", "S3", "S4", "S5", "S6")


def _interior(labels: np.ndarray) -> np.ndarray:
    from islet_imaging.models import border_labels

    edge = border_labels(labels)
    return np.where(np.isin(labels, list(edge)), 0, labels) if edge else labels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 96, 128, 192, 256])
    p.add_argument("--seeds", type=int, nargs="+", default=[9000, 9001, 9002])
    args = p.parse_args(argv)

    from islet_imaging.metrics import match, pool_matchings
    from islet_imaging.models import load_model
    from islet_imaging.models.inference import segment_cnn
    from islet_imaging.stages import get_stage
    from islet_imaging.synth import generate_field

    model = load_model(args.model)
    px = model.config.pixel_size_um
    scores: dict[tuple[int, str], list] = {}
    for stage in STAGES:
        profile = get_stage(stage)
        for seed in args.seeds:
            s = generate_field(stage, seed=seed, size=512, pixel_size_um=px)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                whole = segment_cnn(s.field, profile, model=model).nuclei[0]
            for size in args.sizes:
                step = max(size, 128)
                for y0 in range(0, 512 - size + 1, step):
                    for x0 in range(0, 512 - size + 1, step):
                        sl = (slice(y0, y0 + size), slice(x0, x0 + size))
                        crop = s.field.with_data(s.field.data[:, :, sl[0], sl[1]])
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")  # the small-image warning
                            alone = segment_cnn(crop, profile, model=model).nuclei[0]
                        truth = s.nuclei[0][sl]
                        for key, t, a, w in (
                            ("all", truth, alone, whole[sl]),
                            ("interior", _interior(truth), _interior(alone), _interior(whole[sl])),
                        ):
                            scores.setdefault((size, key + " alone"), []).append(
                                match(t, a, thresholds=(0.5,))[0]
                            )
                            scores.setdefault((size, key + " whole"), []).append(
                                match(t, w, thresholds=(0.5,))[0]
                            )
        print(f"{stage} done", file=sys.stderr, flush=True)

    print(
        "| side (px at the model's scale) | crops | all nuclei: segmented alone | cut from the "
        "whole field | interior nuclei: segmented alone | cut from the whole field | interior "
        "true nuclei |"
    )
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        ap = {k: pool_matchings(v) for (sz, k), v in scores.items() if sz == size}
        row = [
            str(size),
            str(len(scores[(size, "all alone")])),
            *(
                f"{float(ap[k].ap):.3f}"
                for k in ("all alone", "all whole", "interior alone", "interior whole")
            ),
            str(ap["interior alone"].n_true),
        ]
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
