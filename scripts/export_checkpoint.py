#!/usr/bin/env python
"""Write a training checkpoint's network as a model directory.

For a run whose kept model is not the one wanted: an interrupted run, an intermediate epoch, or
the last step of a run that kept its starting model because no epoch beat it on validation. With
``--ema`` runs the moving average is written (``--raw``: the raw weights). The config and
thresholds are the ones the checkpoint stores (the run's starting model's); tune the thresholds
afterwards (``scripts/tune_postprocess.py --model OUT --write``).

Usage::

    .venv/bin/python scripts/export_checkpoint.py runs/my_model.run/last.pt --out runs/my_model_last
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a run's best.pt or last.pt")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--raw", action="store_true", help="the raw weights even if the run kept --ema")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from islet_imaging.errors import InputError
    from islet_imaging.train import export_checkpoint

    try:
        export_checkpoint(args.checkpoint, args.out, average=not args.raw, overwrite=args.overwrite)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
