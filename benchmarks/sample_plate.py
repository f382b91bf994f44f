"""Score the bundled sample plate with each segmenter and compare with its truth.

    .venv/bin/python benchmarks/sample_plate.py                 # default CNN and classical, ~1 min

For each method: whole (interior) clusters found on the 11 colony/aggregate fields of 512² px
against the truth, fields whose interior cluster count is exact, the median over fields of the
relative error of the median cluster diameter, and the mean / max absolute error of every marker's
positive fraction per field (percentage points). Writes nothing but ``--work`` (temporary tables).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
PLATE = REPO / "sample_images" / "plate"


def compare(out: Path) -> dict[str, object]:
    """Figures of one ``score`` output folder against the sample plate's truth."""
    truth_dir = PLATE / "truth"
    fields = pd.read_csv(out / "fields.csv")
    big = fields[(fields["width_px"] == 512) & (fields["n_planes"] == 1)].set_index("image")
    true_n, true_med = {}, {}
    for image in big.index:
        tc = pd.read_csv(truth_dir / f"{image}_clusters.csv")
        interior = tc.loc[~tc["touches_border"].astype(bool), "equivalent_diameter_um"]
        true_n[image], true_med[image] = len(interior), float(interior.median())
    found = big[big["n_clusters"] > 0]
    rel = [abs(found.loc[i, "diameter_median_um"] / true_med[i] - 1) for i in found.index]
    errors = []
    for _, row in fields.iterrows():
        tc = truth_dir / f"{row['image']}_cells.csv"
        if tc.is_file():
            t = pd.read_csv(tc)
            errors += [
                abs(row["fraction_" + c] - t[c].mean())
                for c in t.columns
                if c.startswith("positive_")
            ]
    return {
        "interior clusters found / true": f"{int(big['n_clusters'].sum())} / {sum(true_n.values())}",
        "fields with exact count": f"{sum(int(big.loc[i, 'n_clusters'] == true_n[i]) for i in big.index)} / {len(big)}",
        "median diameter error (median over fields)": f"{100 * float(np.median(rel)):.1f} %",
        "marker fraction error mean / max (pp)": f"{100 * np.mean(errors):.2f} / {100 * np.max(errors):.2f}",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        nargs="+",
        default=["default", "classical"],
        help="'default', 'classical' or model directories; a CNN name ending in '+augment' "
        "(e.g. 'default+augment') scores with test-time augmentation",
    )
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "sample_plate")
    args = parser.parse_args(argv)
    from islet_imaging.models.inference import AUGMENTED_SUFFIX

    rows = {}
    for model in args.models:
        name = model.removesuffix(AUGMENTED_SUFFIX)
        out = args.work / Path(model).name
        cmd = [sys.executable, "-m", "islet_imaging", "-q", "score", str(PLATE), "--plate-map",
               str(REPO / "sample_images" / "plate_map.csv"), "--out", str(out), "--overwrite",
               "--model", name, "--no-progress"]  # fmt: skip
        cmd += ["--augment"] if model.endswith(AUGMENTED_SUFFIX) else []
        subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL)
        rows[model] = compare(out)
    keys = list(next(iter(rows.values())))
    print("| figure | " + " | ".join(rows) + " |")
    print("|---|" + "---|" * len(rows))
    for k in keys:
        print(f"| {k} | " + " | ".join(str(r[k]) for r in rows.values()) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
