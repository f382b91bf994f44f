#!/usr/bin/env python
"""Average the weights of models of one lineage into a new model directory ("model soup").

The new model takes the last model's config and thresholds; tune its post-processing
thresholds afterwards (``scripts/tune_postprocess.py --write``), since averaged maps differ. Its
model card (``README.md``) names the averaged models and their weights.

Usage::

    .venv/bin/python scripts/average_models.py runs/default_stage2 runs/default_stage3 \\
        --out runs/default_soup --name default
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="model directories (or 'default'), at least two")
    p.add_argument("--out", required=True, help="new model directory")
    p.add_argument("--weights", type=float, nargs="+", help="one weight per model (default equal)")
    p.add_argument("--name", help="the new model's name (default: the last model's)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    sys.path.insert(0, str(REPO))
    import dataclasses

    from islet_imaging.errors import InputError
    from islet_imaging.models import average_models, load_model, save_model, write_model_card

    try:
        models = [load_model(m, device="cpu") for m in args.models]
        network = average_models(models, weights=args.weights)
        config = models[-1].config
        if args.name:
            config = dataclasses.replace(config, name=args.name)
        save_model(args.out, network, config, models[-1].thresholds, overwrite=args.overwrite)
        weights = args.weights or [1.0] * len(models)
        sources = ", ".join(
            f"{m.path or m.name} (weight {w / sum(weights):.3g})"
            for m, w in zip(models, weights, strict=True)
        )
        write_model_card(
            args.out,
            training_data=f"The weight average of {sources}; their model cards describe the "
            "training data. Config and thresholds are the last model's: tune the thresholds "
            "for the average (scripts/tune_postprocess.py --write).",
            command=" ".join(["scripts/average_models.py", *(argv or sys.argv[1:])]),
        )
    except InputError as exc:  # ModelError is one
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
