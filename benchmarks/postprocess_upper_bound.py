"""How well the post-processing inverts the training targets: the CNN's accuracy ceiling.

For synthetic fields with exact truth (2D: the 80 held-out fields of ``accuracy.py``'s
10-field table, seeds 9000-9009; 3D: seed 9200), the targets of the truth (``make_targets``
with the model's distance caps, what the network is trained to predict) are fed as "perfect
maps" to the post-processing as inference runs it (``stage_instances``: the model's thresholds,
``--model``, default the shipped ``models/default``; the stage's size filters and cluster
split), and the instances are scored against the truth. A perfect network would reach these
numbers; losses here come from the target definition, the thresholds and the post-processing
(plane-wise maps in 3D, size filters, truncated objects), not from the network. The "shape
alone" columns split the perfect cluster foreground by its shape only, without the distance
map: what a segmenter reaches that finds every cluster's outline exactly but reads no cue
inside a contact. The last row pools the 2D fields.

Usage::

    .venv/bin/python benchmarks/postprocess_upper_bound.py [--model DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STAGES_2D = ("S0", "S1", "eESC", "S2", "S3", "S4", "S5", "S6")
STAGES_3D = ("S4", "S5", "S6")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="model name or directory (its config)")
    args = p.parse_args(argv)

    from islet_imaging.models import load_model, make_targets
    from islet_imaging.models.inference import cluster_split_for, stage_instances
    from islet_imaging.stages import get_stage
    from islet_imaging.synth import generate_field

    model = load_model(args.model)
    cfg, th = model.config, model.thresholds
    print(
        "| stage | dims | fields | nuclei AP50 | nuclei AP75 | cluster split | clusters AP50 "
        "| clusters AP75 | shape alone: clusters AP50 | clusters AP75 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    pooled: dict[str, list] = {"nuclei": [], "split": [], "shape": []}
    for dims, stages, seeds, kw in (
        ("2D 512²", STAGES_2D, range(9000, 9010), {"size": 512}),
        ("3D 256²×12, z-step 2 µm", STAGES_3D, (9200,), {"size": 256, "z": 12, "z_step_um": 2.0}),
    ):
        for stage in stages:
            profile = get_stage(stage)
            pairs: dict[str, list] = {"nuclei": [], "split": [], "shape": []}
            split = cluster_split_for(profile, cfg)
            for seed in seeds:
                s = generate_field(stage, seed=seed, pixel_size_um=cfg.pixel_size_um, **kw)
                squeeze = s.nuclei.shape[0] == 1
                nuc_t = s.nuclei[0] if squeeze else s.nuclei
                clu_t = s.clusters[0] if squeeze else s.clusters
                t = make_targets(nuc_t, clu_t, distance_cap_px=cfg.distance_cap_px)
                maps = {k: v for k, v in t.items() if not k.endswith("_weight")}
                spacing = s.field.pixel_size.yx if squeeze else s.field.pixel_size.zyx
                nuc, clu_split = stage_instances(maps, spacing, profile, cfg, th)
                pairs["nuclei"].append((nuc_t, nuc))
                pairs["split"].append((clu_t, clu_split))
                no_distance = {k: v for k, v in maps.items() if k != "clusters_distance"}
                _, clu_shape = stage_instances(no_distance, spacing, profile, cfg, th)
                pairs["shape"].append((clu_t, clu_shape))
            if squeeze:
                for name, v in pairs.items():
                    pooled[name] += v
            print(_row(profile.short_name, dims, len(seeds), split, pairs), flush=True)
    n_2d = len(pooled["nuclei"])
    print(_row("**all 2D**", "2D 512²", n_2d, "as above", pooled), flush=True)
    return 0


def _row(name: str, dims: str, n_fields: int, split: str, pairs: dict[str, list]) -> str:
    from islet_imaging.metrics import match_dataset

    row = [name, dims, str(n_fields)]
    for key in ("nuclei", "split", "shape"):
        if key == "split":
            row.append(split)
        m50, m75 = match_dataset(pairs[key], thresholds=(0.5, 0.75))
        row += [f"{m50.ap:.3f}", f"{m75.ap:.3f}"]
    return "| " + " | ".join(row) + " |"


if __name__ == "__main__":
    sys.exit(main())
