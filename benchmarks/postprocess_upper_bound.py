"""How well the post-processing inverts the training targets: the CNN's accuracy ceiling.

For synthetic fields with exact truth, the targets of the truth (``make_targets``, what the
network is trained to predict) are fed as "perfect maps" to ``maps_to_instances`` with the default
thresholds and the stage's size filters, and the instances are scored against the truth. A
perfect network would reach these numbers; losses here come from the target definition and the
post-processing (plane-wise maps in 3D, size filters, truncated objects), not from the network.
The last columns post-process clusters as inference does (``stage_instances``: the model's cluster
split for colonies and aggregates, with the perfect distance map and its cap in µm; none for
monolayer patches), from the perfect cluster maps.

Usage::

    .venv/bin/python benchmarks/postprocess_upper_bound.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STAGES_2D = ("S0", "S1", "eESC", "S2", "S3", "S4", "S5", "S6")
STAGES_3D = ("S4", "S5", "S6")


def main() -> int:
    from islet_imaging.metrics import match_dataset
    from islet_imaging.models import ModelConfig, make_targets, maps_to_instances
    from islet_imaging.models.inference import cluster_split_for, stage_instances
    from islet_imaging.stages import get_stage
    from islet_imaging.synth import generate_field

    cfg = ModelConfig()
    print(
        "| stage | dims | fields | nuclei AP50 | nuclei AP75 | clusters AP50 | clusters AP75 "
        "| inference split | clusters AP50 | clusters AP75 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dims, stages, seeds, kw in (
        ("2D 512²", STAGES_2D, (9000, 9001), {"size": 512}),
        ("3D 256²×12, z-step 2 µm", STAGES_3D, (9200,), {"size": 256, "z": 12, "z_step_um": 2.0}),
    ):
        for stage in stages:
            profile = get_stage(stage)
            pairs: dict[str, list] = {"nuclei": [], "clusters": [], "split": []}
            split = cluster_split_for(profile, cfg)
            for seed in seeds:
                s = generate_field(stage, seed=seed, pixel_size_um=cfg.pixel_size_um, **kw)
                squeeze = s.nuclei.shape[0] == 1
                nuc_t = s.nuclei[0] if squeeze else s.nuclei
                clu_t = s.clusters[0] if squeeze else s.clusters
                t = make_targets(nuc_t, clu_t, distance_cap_px=cfg.distance_cap_px)
                maps = {k: v for k, v in t.items() if not k.endswith("_weight")}
                spacing = s.field.pixel_size.yx if squeeze else s.field.pixel_size.zyx
                nuc, clu = maps_to_instances(
                    maps,
                    thresholds=cfg.thresholds,
                    spacing=spacing,
                    nucleus_diameter_um=profile.nucleus_diameter_um,
                    cluster_diameter_um=(profile.min_cluster_diameter_um, None),
                )
                pairs["nuclei"].append((nuc_t, nuc))
                pairs["clusters"].append((clu_t, clu))
                _, clu_split = stage_instances(maps, spacing, profile, cfg, cfg.thresholds)
                pairs["split"].append((clu_t, clu_split))
            row = [profile.short_name, dims, str(len(seeds))]
            for name in ("nuclei", "clusters", "split"):
                if name == "split":
                    row.append(split)
                m50, m75 = match_dataset(pairs[name], thresholds=(0.5, 0.75))
                row += [f"{m50.ap:.3f}", f"{m75.ap:.3f}"]
            print("| " + " | ".join(row) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
