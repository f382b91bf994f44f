"""Segmentation models: the small U-Net, its model directory, tiled inference, post-processing.

Importing this package is cheap; torch loads when a name that needs it is first used.

The contract (names below are stable)
-------------------------------------
**Config** — :class:`ModelConfig` (``_config.py``), a frozen dataclass stored as ``config.json``:
architecture (``base_channels``, ``depth``, ``max_channels``, ``context_blocks``, ``norm``,
``activation``), ``inputs`` (ordered input kinds: ``"nuclear"`` = the nuclear stain;
``"cluster"`` = the stage profile's ``cluster_input`` image — the nuclear stain again or the sum
of all per-channel-normalised channels), ``percentiles`` (per-channel normalisation: low → 0,
high → 1), ``pixel_size_um`` (training scale), ``typical_nucleus_diameter_um``, ``heads``
(``{"nuclei": ("foreground", "distance"), "clusters": (...)}``), ``distance_cap_px`` and default
:class:`Thresholds`.
``config.output_names[k]`` names output channel ``k`` (``"nuclei_foreground"``, ...).

**Network** — :func:`build_network(config) <build_network>` → :class:`UNet`; input
``(N, len(inputs), H, W)`` float32 made by :func:`prepare_input` (H, W multiples of
``config.size_multiple``), output ``(N, out_channels, H, W)`` *logits*; ``sigmoid`` gives the
foreground probability / distance map in 0..1.

**Targets** — :func:`make_targets(nuclei, clusters=None, distance_cap_px=config.distance_cap_px)
<make_targets>` → ``{"<class>_foreground", "<class>_distance", "<class>_weight"}`` float32 maps,
from labels *at the model's pixel size*. Train foreground with BCE-with-logits, distance with a
loss on ``sigmoid(logit)`` (or BCE-with-logits against the soft target), each multiplied by
``<class>_weight`` (0 where a class is not annotated, e.g. clusters in DSB2018).
:func:`prepare_input(field, profile, config) <prepare_input>` builds the network input of a Field
exactly as inference does (use it in training so train and test inputs agree).

**Post-processing** — :func:`maps_to_instances(maps, thresholds=..., spacing=...,
nucleus_diameter_um=..., cluster_diameter_um=...) <maps_to_instances>` inverts the targets:
``maps_to_instances(make_targets(lab))`` returns ``lab`` (up to renumbering). The thresholds
(``Thresholds``: ``<class>_foreground``, ``<class>_seed``, ``<class>_min_seed_fraction``,
``<class>_merge``) are tuned on validation data and saved with :func:`write_thresholds` /
:func:`save_model`.

**Model directory** — :func:`save_model(dir, network, config, thresholds, card=..., overwrite=...)
<save_model>` writes ``config.json``, ``weights.safetensors``, ``thresholds.json``,
``checksums.json`` (and ``README.md`` from :func:`write_model_card`) atomically;
:func:`load_model("default" | path, device=...) <load_model>` → :class:`Model` (validated, checksum
verified, cached per directory and device). ``"default"`` is looked up in ``$ISLET_IMAGING_MODELS``
then ``<repo>/models/``.

**Inference** — :func:`predict_maps(image, model, ...) <predict_maps>` (tiled, blended, bounded
memory) and :func:`segment_cnn(field, profile, model=..., ...) <segment_cnn>` →
:class:`islet_imaging.segment.Labels` (scale-aware: rescales to the model's pixel size and back;
fields over ``BLOCK_PX`` a side are segmented block by block and stitched, ``_blocks.py``).
"""

from __future__ import annotations

from islet_imaging._lazy import attach

_LAZY = {
    "ModelConfig": "islet_imaging.models._config",
    "Thresholds": "islet_imaging.models._config",
    "FORMAT_VERSION": "islet_imaging.models._config",
    "UNet": "islet_imaging.models._network",
    "build_network": "islet_imaging.models._network",
    "add_context_blocks": "islet_imaging.models._network",
    "count_parameters": "islet_imaging.models._network",
    "fuse_for_inference": "islet_imaging.models._network",
    "make_targets": "islet_imaging.models._targets",
    "distance_map": "islet_imaging.models._targets",
    "maps_to_instances": "islet_imaging.models._postprocess",
    "instances_from_maps": "islet_imaging.models._postprocess",
    "border_labels": "islet_imaging.models._postprocess",
    "Model": "islet_imaging.models._modeldir",
    "average_models": "islet_imaging.models._modeldir",
    "load_model": "islet_imaging.models._modeldir",
    "save_model": "islet_imaging.models._modeldir",
    "write_model_card": "islet_imaging.models._modeldir",
    "write_thresholds": "islet_imaging.models._modeldir",
    "list_models": "islet_imaging.models._modeldir",
    "resolve_model_dir": "islet_imaging.models._modeldir",
    "clear_model_cache": "islet_imaging.models._modeldir",
    "predict_maps": "islet_imaging.models.inference",
    "segment_cnn": "islet_imaging.models.inference",
    "prepare_input": "islet_imaging.models.inference",
    "normalise_channel": "islet_imaging.models.inference",
    "rescale_factor": "islet_imaging.models.inference",
    "cluster_split_for": "islet_imaging.models.inference",
    "shape_split_instances": "islet_imaging.models._postprocess",
}

__getattr__, __dir__, __all__ = attach(__name__, _LAZY)
