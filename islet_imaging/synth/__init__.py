"""Synthetic fields of every differentiation stage with exact ground truth.

They make the bundled sample plate, the default model's training data and the tests' truth.
Submodules load on first use; nothing here imports torch.

Examples
--------
>>> from islet_imaging.synth import generate_field
>>> s = generate_field("sc-islet", seed=0, size=128)
>>> s.field.data.shape[0], s.nuclei.shape
(4, (1, 128, 128))
"""

from __future__ import annotations

from islet_imaging._lazy import attach

_LAZY = {
    "SynthField": "islet_imaging.synth._generate",
    "generate_field": "islet_imaging.synth._generate",
    "cluster_table": "islet_imaging.synth._generate",
    "StageLook": "islet_imaging.synth._stages",
    "CellType": "islet_imaging.synth._stages",
    "LOOKS": "islet_imaging.synth._stages",
    "look_for": "islet_imaging.synth._stages",
    "write_dataset": "islet_imaging.synth._dataset",
    "write_synth_field": "islet_imaging.synth._dataset",
    "make_sample_plate": "islet_imaging.synth._plate",
    "SAMPLE_PLATE": "islet_imaging.synth._plate",
}

__getattr__, __dir__, __all__ = attach(__name__, _LAZY)
