"""Per-object measurements: marker intensities, positivity calls, cluster size and IEQ.

Pure functions on numpy label and intensity arrays with the voxel size in µm, returning tidy
pandas tables keyed by label value. Nothing here imports torch, Qt or napari; submodules load on
first use.

Examples
--------
>>> import numpy as np
>>> from islet_imaging.measure import measure_clusters
>>> lab = np.zeros((1, 64, 64), np.int32); lab[0, 10:30, 10:30] = 1
>>> measure_clusters(lab, spacing=1.0)["area_um2"].tolist()
[400.0]
"""

from __future__ import annotations

from islet_imaging._lazy import attach

_LAZY = {
    # cells (islet_imaging/measure/_cells.py)
    "measure_cells": "islet_imaging.measure._cells",
    "cytoplasm_labels": "islet_imaging.measure._cells",
    "cell_cluster_ids": "islet_imaging.measure._cells",
    "background_levels": "islet_imaging.measure._cells",
    "background_rings": "islet_imaging.measure._cells",
    # clusters (islet_imaging/measure/_clusters.py)
    "measure_clusters": "islet_imaging.measure._clusters",
    "cluster_composition": "islet_imaging.measure._clusters",
    "feret_diameters": "islet_imaging.measure._clusters",
    # IEQ (islet_imaging/measure/_ieq.py)
    "IEQ_REFERENCE_DIAMETER_UM": "islet_imaging.measure._ieq",
    "RICORDI_CLASSES": "islet_imaging.measure._ieq",
    "ieq_continuous": "islet_imaging.measure._ieq",
    "ieq_ricordi": "islet_imaging.measure._ieq",
    "ricordi_class": "islet_imaging.measure._ieq",
    # positivity (islet_imaging/measure/_positivity.py)
    "Threshold": "islet_imaging.measure._positivity",
    "ThresholdSpec": "islet_imaging.measure._positivity",
    "GaussianMixture1D": "islet_imaging.measure._positivity",
    "call_positive": "islet_imaging.measure._positivity",
    "control_threshold": "islet_imaging.measure._positivity",
    "find_threshold": "islet_imaging.measure._positivity",
    "fit_gmm_1d": "islet_imaging.measure._positivity",
    "log_transform": "islet_imaging.measure._positivity",
    "parse_threshold_method": "islet_imaging.measure._positivity",
    "population_names": "islet_imaging.measure._positivity",
    "thresholds_table": "islet_imaging.measure._positivity",
    # comparison with synthetic truth (islet_imaging/measure/_truth.py)
    "compare_field": "islet_imaging.measure._truth",
    "truth_summary": "islet_imaging.measure._truth",
}

__getattr__, __dir__, __all__ = attach(__name__, _LAZY)
