"""Tiled, scale-aware inference and the ``segment`` command.

Most tests use an "oracle" network with hand-set weights: it passes the normalised nuclear stain
through the U-Net's skip path, so its foreground is ``image > 0.1`` and its distance map is
``sigmoid(12·(image − 0.5))``. Rendered nuclei are paraboloids (1 at the centre, 0 at the rim),
so the oracle segments them exactly, whatever the pixel size: what is tested is the machinery
around the network (inputs, rescaling, tiling, 3D, post-processing, files), not training.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from test_blocks import same_partition

from islet_imaging.cli import main
from islet_imaging.errors import InputError
from islet_imaging.io import Field, Origin, PixelSize, read_labels, write_ome_tiff
from islet_imaging.metrics import match
from islet_imaging.models._config import ModelConfig
from islet_imaging.models._modeldir import Model, save_model
from islet_imaging.models._network import build_network
from islet_imaging.models.inference import (
    MAX_UPSCALE,
    MIN_CONTEXT_PX,
    UNKNOWN_SCALE_MIN_NUCLEUS,
    CoarseImageWarning,
    EmptyImageWarning,
    SmallImageWarning,
    estimate_nucleus_diameter_px,
    field_instances,
    predict_maps,
    prepare_input,
    rescale_factor,
    resize_image,
    resize_labels,
    segment_cnn,
)
from islet_imaging.segment import Labels, segment_field
from islet_imaging.stages import StageProfile, get_stage

S0 = get_stage("S0")  # clusters outlined by the nuclear stain
S6 = get_stage("S6")  # clusters outlined by the sum of all channels

ORACLE = ModelConfig(
    name="oracle",
    base_channels=4,
    depth=2,
    max_channels=8,
    norm="none",
    percentiles=(0.0, 100.0),
    pixel_size_um=0.5,
    typical_nucleus_diameter_um=10.0,
)


def oracle_network() -> torch.nn.Module:
    net = build_network(ORACLE)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        d0, up = net.down[0], net.up[0].block
        for c in (0, 1):  # input channel c → feature c, through the skip connection
            d0[0].weight[c, c, 1, 1] = 1.0
            d0[3].weight[c, c, 1, 1] = 1.0
            up[0].weight[c, 4 + c, 1, 1] = 1.0  # concat([reduce(up), skip]): skip at 4..7
            up[3].weight[c, c, 1, 1] = 1.0
        head = net.head
        for c, (fg, dist) in enumerate(((0, 1), (2, 3))):
            head.weight[fg, c, 0, 0] = 40.0
            head.bias[fg] = -4.0  # foreground: x > 0.1
            head.weight[dist, c, 0, 0] = 12.0
            head.bias[dist] = -6.0  # seeds: x > 0.5
    return net


@pytest.fixture(scope="module")
def oracle() -> Model:
    return Model.from_network(oracle_network(), ORACLE, device="cpu")


def render(
    shape_um: tuple[float, ...],
    centres_um: list[tuple[float, ...]],
    radius_um: float,
    spacing: tuple[float, ...],
) -> tuple[np.ndarray, np.ndarray]:
    """Paraboloid nuclei (peak 1) and their truth labels (where 1 - (r/R)² > 0.1)."""
    shape = tuple(round(s / p) for s, p in zip(shape_um, spacing, strict=True))
    grids = np.meshgrid(
        *[(np.arange(n) + 0.5) * p for n, p in zip(shape, spacing, strict=True)], indexing="ij"
    )
    img = np.zeros(shape, np.float32)
    lab = np.zeros(shape, np.int32)
    for i, c in enumerate(centres_um, start=1):
        r2 = sum((g - ci) ** 2 for g, ci in zip(grids, c, strict=True)) / radius_um**2
        v = (1.0 - r2).astype(np.float32)
        take = v > img
        img[take] = v[take]
        lab[take & (v > 0.1)] = i
    return img, lab


CENTRES = [(12.0, 12.0), (12.0, 21.0), (30.0, 40.0), (45.0, 15.0), (50.0, 52.0), (30.0, 20.0)]


def field_2d(
    pixel_size: float | None, *, px_for_shape: float | None = None
) -> tuple[Field, np.ndarray]:
    spacing = px_for_shape or pixel_size or 0.5
    img, lab = render((64.0, 64.0), CENTRES, 5.0, (spacing, spacing))
    data = (img * 1000 + 100).astype(np.uint16)[np.newaxis, np.newaxis]
    ps = None if pixel_size is None else PixelSize(pixel_size, pixel_size)
    return Field(data, ("DAPI",), ps), lab[np.newaxis]


# -- inputs -------------------------------------------------------------------------------------
def test_prepare_input_nuclear_and_sum() -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 1000, (3, 1, 20, 20)).astype(np.uint16)
    fld = Field(data, ("INS", "Hoechst", "GCG"), PixelSize(0.5, 0.5))
    cfg = ModelConfig(percentiles=(0.0, 100.0))
    x0 = prepare_input(fld, S0, cfg)
    assert x0.shape == (2, 1, 20, 20) and x0.dtype == np.float32
    np.testing.assert_allclose(x0[0], x0[1])  # S0: clusters outlined by the nuclear stain
    d = data[1].astype(np.float32)
    np.testing.assert_allclose(x0[0], (d - d.min()) / (d.max() - d.min()), atol=1e-6)
    x6 = prepare_input(fld, S6, cfg)
    total = sum((c - c.min()) / (c.max() - c.min()) for c in data.astype(np.float32))
    np.testing.assert_allclose(
        x6[1], (total - total.min()) / (total.max() - total.min()), atol=1e-5
    )


def test_missing_nuclear_channel_lists_channels(oracle: Model) -> None:
    fld = Field(np.ones((2, 1, 32, 32), np.uint16), ("INS", "GCG"), PixelSize(0.5, 0.5))
    with pytest.raises(InputError, match=r"no nuclear stain channel among \['INS', 'GCG'\]"):
        segment_cnn(fld, S6, model=oracle)


def test_tiny_image_is_refused(oracle: Model) -> None:
    fld = Field(np.ones((1, 1, 10, 40), np.uint16), ("DAPI",), PixelSize(0.5, 0.5))
    with pytest.raises(InputError, match="at least 16"):
        segment_cnn(fld, S0, model=oracle)


@pytest.mark.parametrize("value", [0, 65535])
def test_constant_image_warns_and_gives_empty_labels(oracle: Model, value: int) -> None:
    fld = Field(np.full((1, 1, 40, 40), value, np.uint16), ("DAPI",), PixelSize(0.5, 0.5))
    with pytest.warns(EmptyImageWarning, match="constant"):
        labels = segment_cnn(fld, S0, model=oracle, return_probabilities=True)
    assert labels.nuclei.shape == (1, 40, 40) and labels.nuclei.max() == 0
    assert labels.clusters.max() == 0 and set(labels.probabilities) == set(ORACLE.output_names)


def test_image_smaller_than_the_context_warns_and_is_segmented(oracle: Model) -> None:
    """The warning looks at the side at the model's scale, not in the file: a 128 px field at the
    model's pixel size is enough; the same field said to hold 2× larger nuclei is resized to
    64 px and warns, naming both sizes; it still gets labels on its own grid."""
    fld, _ = field_2d(0.5)
    assert fld.spatial_shape[1:] == (MIN_CONTEXT_PX, MIN_CONTEXT_PX)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        segment_cnn(fld, S0, model=oracle)
    assert not caught
    with pytest.warns(SmallImageWarning, match=r"128×128 px, 64×64 px at the model's 0\.5 µm"):
        labels = segment_cnn(fld, S0, model=oracle, nucleus_diameter_um=20.0)
    assert labels.nuclei.shape == labels.clusters.shape == fld.spatial_shape


@pytest.mark.parametrize(("pixel_size", "warns"), [(0.85, False), (0.95, True)])
def test_coarse_image_warns_and_is_segmented(oracle: Model, pixel_size: float, warns: bool) -> None:
    """Pixels over MAX_UPSCALE × the model's (0.5 µm) warn, naming the effective size; still
    segmented on the field's own grid."""
    assert 0.85 / ORACLE.pixel_size_um < MAX_UPSCALE < 0.95 / ORACLE.pixel_size_um
    fld, _ = field_2d(pixel_size, px_for_shape=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        labels = segment_cnn(fld, S0, model=oracle)
    coarse = [w for w in caught if issubclass(w.category, CoarseImageWarning)]
    assert len(coarse) == int(warns) and len(caught) == len(coarse)
    if warns:
        assert "0.95 µm per pixel (effective), 1.9× the model's 0.5 µm" in str(coarse[0].message)
    assert labels.nuclei.shape == fld.spatial_shape


@pytest.mark.parametrize(
    ("pixel_size", "max_upscale", "cluster_factor"),
    [
        (0.95, MAX_UPSCALE, MAX_UPSCALE),  # ×1.9: the clusters' maps at ×1.8, a second pass
        (0.95, None, None),  # no cap: one pass
        (0.85, MAX_UPSCALE, None),  # ×1.7, under the cap: one pass
        (None, MAX_UPSCALE, None),  # no pixel size: the scale comes from the nuclei, never capped
    ],
)
def test_coarse_clusters_are_seen_at_most_max_upscale(
    oracle: Model,
    monkeypatch: pytest.MonkeyPatch,
    pixel_size: float | None,
    max_upscale: float | None,
    cluster_factor: float | None,
) -> None:
    """Nuclei's maps at the full enlargement; clusters' maps from a pass capped at max_upscale,
    their distance cap scaled by the ratio; labels on the field's grid."""
    from islet_imaging.models import inference

    fld, truth = field_2d(pixel_size, px_for_shape=pixel_size or 0.95)
    diameter = None if pixel_size is not None else 10.0 / 0.95  # px: the same ×1.9
    passes: list[float] = []
    real_maps_at = inference._maps_at

    def spy_maps_at(inputs, model, factor, **kwargs):  # type: ignore[no-untyped-def]
        passes.append(factor)
        return real_maps_at(inputs, model, factor, **kwargs)

    scales: list[float] = []
    real_stage_instances = inference.stage_instances

    def spy_stage_instances(*args, **kwargs):  # type: ignore[no-untyped-def]
        scales.append(kwargs["map_scale"])
        return real_stage_instances(*args, **kwargs)

    monkeypatch.setattr(inference, "_maps_at", spy_maps_at)
    monkeypatch.setattr(inference, "stage_instances", spy_stage_instances)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        labels = segment_cnn(
            fld, S0, model=oracle, max_upscale=max_upscale, nucleus_diameter_um=diameter
        )
    assert passes[0] == pytest.approx(1.9 if pixel_size != 0.85 else 1.7)
    if cluster_factor is None:
        assert len(passes) == 1 and scales == [1.0]
    else:
        assert passes[1:] == [pytest.approx(cluster_factor)]
        assert scales == [pytest.approx(1.9 / cluster_factor)]
    assert labels.nuclei.shape == labels.clusters.shape == fld.spatial_shape
    assert match(truth, labels.nuclei, thresholds=0.5)[0].ap == 1.0


@pytest.mark.parametrize("bad", [0.0, 0.5, -1.0, float("nan")])
def test_bad_max_upscale_is_refused(oracle: Model, bad: float) -> None:
    fld, _ = field_2d(0.95, px_for_shape=0.95)
    with pytest.raises(InputError, match=r"max_upscale .* at least 1"):
        segment_cnn(fld, S0, model=oracle, max_upscale=bad)


# -- segmentation and scale ---------------------------------------------------------------------
def test_oracle_segments_exactly(oracle: Model) -> None:
    fld, truth = field_2d(0.5)
    labels = segment_cnn(fld, S0, model=oracle, return_probabilities=True)
    assert isinstance(labels, Labels) and labels.method == "oracle"
    assert labels.nuclei.shape == fld.spatial_shape and labels.nuclei.dtype == np.int32
    assert labels.nuclei.max() == len(CENTRES)
    assert match(truth, labels.nuclei, thresholds=0.9)[0].ap == 1.0
    assert set(labels.probabilities) == set(ORACLE.output_names)
    assert labels.probabilities["nuclei_foreground"].shape == fld.spatial_shape
    # segment_field routes model=<Model> here too
    same = segment_field(fld, stage="S0", model=oracle)
    np.testing.assert_array_equal(same.nuclei, labels.nuclei)


def test_half_pixel_size_gives_same_um_sizes(oracle: Model) -> None:
    """The same scene at 0.5 and 0.25 µm/px: same objects, same areas in µm²."""
    coarse, _ = field_2d(0.5)
    fine, truth_f = field_2d(0.25)
    assert fine.spatial_shape[1] == 2 * coarse.spatial_shape[1]
    assert rescale_factor(fine, ORACLE) == (0.5, 0.25)
    lc = segment_cnn(coarse, S0, model=oracle).nuclei
    lf = segment_cnn(fine, S0, model=oracle).nuclei
    assert lc.max() == lf.max() == len(CENTRES)
    area_c = np.bincount(lc.ravel())[1:] * 0.5**2
    area_f = np.bincount(lf.ravel())[1:] * 0.25**2
    true_area = np.bincount(truth_f.ravel())[1:] * 0.25**2
    np.testing.assert_allclose(np.sort(area_f), np.sort(true_area), rtol=0.06)
    np.testing.assert_allclose(np.sort(area_c), np.sort(area_f), rtol=0.06)
    assert match(truth_f, lf, thresholds=0.85)[0].ap == 1.0


def test_nucleus_diameter_in_pixels_replaces_pixel_size(oracle: Model) -> None:
    with_px, _ = field_2d(0.5)
    no_px, _ = field_2d(None, px_for_shape=0.5)
    # nuclei are 10 µm = 20 px across; the model's typical nucleus is 10 µm
    assert rescale_factor(no_px, ORACLE, nucleus_diameter_um=20.0) == (1.0, 0.5)
    a = segment_cnn(with_px, S0, model=oracle).nuclei
    b = segment_cnn(no_px, S0, model=oracle, nucleus_diameter_um=20.0).nuclei
    np.testing.assert_array_equal(a, b)


def test_without_pixel_size_the_diameter_is_estimated(oracle: Model) -> None:
    fld, truth = field_2d(None, px_for_shape=0.5)
    d = estimate_nucleus_diameter_px(fld.data[0, 0])
    assert 14 < d < 26  # true diameter 20 px
    with pytest.warns(UserWarning, match="estimated the nucleus diameter"):
        labels = segment_cnn(fld, S0, model=oracle)
    assert match(truth, labels.nuclei, thresholds=0.5)[0].ap == 1.0
    # in blocks: estimated once, on the whole field, and the same objects
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parts = segment_cnn(fld, S0, model=oracle, block=64)
    assert [str(w.message).count("estimated the nucleus diameter") for w in caught] == [1]
    assert same_partition(parts.nuclei, labels.nuclei)


def test_resample_functions() -> None:
    lab = np.zeros((1, 8, 8), np.int32)
    lab[0, 2:6, 2:6] = 5
    up = resize_labels(lab, (16, 16))
    assert up.shape == (1, 16, 16) and set(np.unique(up)) == {0, 5}
    assert (up == 5).sum() == 4 * (lab == 5).sum()
    np.testing.assert_array_equal(resize_labels(up, (8, 8)), lab)
    img = np.ones((2, 30, 40), np.float32)
    out = resize_image(img, (15, 20))
    assert out.shape == (2, 15, 20)
    np.testing.assert_allclose(out, 1.0, atol=1e-6)


def test_probabilities_are_resized_in_logit_space() -> None:
    """An edge from 0.01 to 0.99 between two pixel centres, enlarged 10×: the 0.3 level is
    crossed where the logits cross it (0.41 of the way), not at 0.30 as the probabilities'
    straight line would; 0.5 stays half-way; the same shape is returned as is."""
    from islet_imaging.models.inference import resize_probabilities

    edge = np.array([[0.01, 0.01, 0.99, 0.99]], np.float32)
    logit = np.log(edge / (1 - edge))
    up = resize_probabilities(edge, (1, 40))[0]
    centres = (np.arange(40) + 0.5) / 10 - 0.5  # in the source pixels' coordinates
    between = (centres > 1) & (centres < 2)
    expected = 1 / (1 + np.exp(-np.interp(centres[between], [1, 2], logit[0, 1:3])))
    np.testing.assert_allclose(up[between], expected, rtol=1e-5)
    first_in = centres[between][np.argmax(up[between] > 0.3)]
    assert 1.40 <= first_in <= 1.46  # 0.41 of the way, to the next 0.1 px sample
    assert np.all(np.diff(up) >= 0) and 0 < up.min() and up.max() < 1
    np.testing.assert_array_equal(resize_probabilities(edge, (1, 4)), edge)


def test_low_levels_outline_resized_fields_as_at_the_models_pixels() -> None:
    """The oracle's nuclear logits are 40 × image − 4: on a field at half its pixel size, the
    0.2 level outlines what sigmoid(40 × image − 4) > 0.2 covers on the field's own grid, to
    the blur of resizing the input (+2.7 %); maps resized as probabilities added another 4 %."""
    cfg = dataclasses.replace(
        ORACLE, thresholds=dataclasses.replace(ORACLE.thresholds, nuclei_foreground=0.2)
    )
    model = Model.from_network(oracle_network(), cfg, device="cpu")
    fld, _ = field_2d(0.25)
    img, _ = render((64.0, 64.0), CENTRES, 5.0, (0.25, 0.25))
    expected = np.count_nonzero(1 / (1 + np.exp(-(40 * img - 4))) > 0.2)
    nuclei = segment_cnn(fld, S0, model=model).nuclei
    assert nuclei.max() == len(CENTRES)
    assert 1.0 <= np.count_nonzero(nuclei) / expected < 1.045


# -- tiling -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def random_bn_model() -> Model:
    gen = torch.Generator().manual_seed(0)
    cfg = ModelConfig(base_channels=4, depth=3, max_channels=16)
    torch.manual_seed(0)  # the same random weights in every run
    net = build_network(cfg)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return Model.from_network(net, cfg, device="cpu")


def test_tiled_equals_untiled(random_bn_model: Model) -> None:
    img = np.random.default_rng(0).random((2, 136, 200)).astype(np.float32)
    whole = predict_maps(img, random_bn_model, tile=1024)
    tiled = predict_maps(img, random_bn_model, tile=96, overlap=48, batch_size=3)
    assert set(whole) == set(random_bn_model.config.output_names)
    for k in whole:
        assert whole[k].shape == (136, 200)
        np.testing.assert_allclose(tiled[k], whole[k], atol=1e-5)
    # channels_last off: same numbers
    plain = predict_maps(img, random_bn_model, tile=96, overlap=48, channels_last=False)
    for k in whole:
        np.testing.assert_allclose(plain[k], whole[k], atol=1e-5)


def test_tiled_segmentation_is_seamless(oracle: Model) -> None:
    img, truth = render(
        (100.0, 150.0), [(y, x) for y in (15, 50, 85) for x in range(15, 150, 24)], 5.5, (0.5, 0.5)
    )
    fld = Field((img * 4000).astype(np.uint16)[None, None], ("DAPI",), PixelSize(0.5, 0.5))
    whole = segment_cnn(fld, S0, model=oracle, tile=512)
    tiled = segment_cnn(fld, S0, model=oracle, tile=64, overlap=32)
    np.testing.assert_array_equal(whole.nuclei, tiled.nuclei)
    assert whole.nuclei.max() == truth.max()


def test_small_and_odd_sizes(random_bn_model: Model) -> None:
    for shape in [(17, 23), (16, 16), (33, 100)]:
        maps = predict_maps(np.zeros((2, *shape), np.float32), random_bn_model, tile=32, overlap=8)
        assert all(m.shape == shape for m in maps.values())
    with pytest.raises(InputError, match=r"\(2, Y, X\)"):
        predict_maps(np.zeros((3, 20, 20), np.float32), random_bn_model)


def colonies_field(three_d: bool = False) -> Field:
    """Two colonies of 6×6 touching nuclei across block edges, and single nuclei; 0.5 µm px. In
    3D (planes 3 µm apart) the colonies are two layers of nuclei."""
    layers = (7.0, 16.0) if three_d else (None,)
    centres = [
        (y, x) if z is None else (z, y, x)
        for y0, x0 in ((40, 60), (95, 170))
        for z in layers
        for y in range(y0, y0 + 54, 9)
        for x in range(x0, x0 + 54, 9)
    ]
    singles = [(y, x) for y in range(12, 200, 37) for x in (12, 130, 280)]
    centres += [c if not three_d else (12.0, *c) for c in singles]
    shape, spacing = (
        ((24.0, 200.0, 300.0), (3.0, 0.5, 0.5)) if three_d else ((200.0, 300.0), (0.5, 0.5))
    )
    img, _ = render(shape, centres, 5.5, spacing)
    data = (img * 4000 + 50).astype(np.uint16).reshape(1, -1, *img.shape[-2:])
    return Field(data, ("DAPI",), PixelSize(0.5, 0.5, 3.0))


@pytest.mark.parametrize(("three_d", "stage"), [(False, S0), (True, S6)])
def test_block_wise_segmentation_equals_whole(
    oracle: Model, three_d: bool, stage: StageProfile
) -> None:
    fld = colonies_field(three_d)
    whole = segment_cnn(fld, stage, model=oracle, block=None, return_probabilities=True)
    parts = segment_cnn(
        fld, stage, model=oracle, block=150, block_halo_um=60.0, return_probabilities=True
    )
    assert whole.nuclei.max() >= 80 and whole.clusters.max() >= 2
    assert same_partition(parts.nuclei, whole.nuclei)
    assert same_partition(parts.clusters, whole.clusters)
    assert parts.nuclei.max() == whole.nuclei.max()  # renumbered 1..N
    assert set(parts.probabilities) == set(whole.probabilities) == set(oracle.config.output_names)
    for name, v in whole.probabilities.items():
        assert v.dtype == np.float32 and v.max() > 0.9
        np.testing.assert_allclose(parts.probabilities[name], v, atol=1e-3)


def test_bad_block_options_are_refused(oracle: Model) -> None:
    fld, _ = field_2d(0.5)
    with pytest.raises(InputError, match="block 8 px is smaller"):
        segment_cnn(fld, S0, model=oracle, block=8)
    with pytest.raises(InputError, match="halo -1"):
        segment_cnn(fld, S0, model=oracle, block=64, block_halo_um=-1)


def test_block_normalisation_is_the_whole_fields(oracle: Model) -> None:
    """A block that holds only dim nuclei is normalised with the whole field's percentiles:
    its dim nuclei stay below the foreground level, as they do in the whole field."""
    fld = colonies_field()
    data = fld.data.copy()
    data[..., 200:] = data[..., 200:] // 60 + 50  # the right third: nuclei at 2 % brightness
    fld = fld.with_data(data)
    whole = segment_cnn(fld, S0, model=oracle, block=None)
    parts = segment_cnn(fld, S0, model=oracle, block=200, block_halo_um=30.0)
    assert same_partition(parts.nuclei, whole.nuclei)
    assert not whole.nuclei[..., 260:].any()


# -- 3D -----------------------------------------------------------------------------------------
def test_z_stack_gives_3d_objects(oracle: Model) -> None:
    spacing = (1.5, 0.5, 0.5)
    centres = [(9.0, 12.0, 12.0), (9.0, 12.0, 21.0), (9.0, 30.0, 40.0), (10.0, 45.0, 15.0)]
    img, truth = render((18.0, 64.0, 64.0), centres, 5.0, spacing)
    fld = Field((img * 1000).astype(np.uint16)[np.newaxis], ("DAPI",), PixelSize(0.5, 0.5, 1.5))
    labels = segment_cnn(fld, S0, model=oracle)
    assert labels.nuclei.shape == fld.spatial_shape == (12, 128, 128)
    assert labels.nuclei.max() == len(centres)
    assert match(truth, labels.nuclei, thresholds=0.7)[0].ap == 1.0
    # every nucleus spans several planes
    for i in range(1, len(centres) + 1):
        assert len(np.unique(np.nonzero(labels.nuclei == i)[0])) >= 3


# -- the segment command ------------------------------------------------------------------------
@pytest.fixture
def oracle_dir(tmp_path: Path) -> Path:
    return save_model(tmp_path / "oracle", oracle_network(), ORACLE)


def test_segment_cli_z_step(
    tmp_path: Path, oracle_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fld, _ = field_2d(0.5)
    stack = np.repeat(fld.data, 3, axis=1)  # 3 planes, no z step in the file
    img = write_ome_tiff(
        tmp_path / "in" / "A01_f1.ome.tif", Field(stack, ("DAPI",), fld.pixel_size)
    )
    out = tmp_path / "out"
    argv = ["segment", str(img), "--out", str(out), "--model", str(oracle_dir), "--stage", "S0"]
    with caplog.at_level(logging.WARNING):
        assert main(argv) == 0
    assert "A01_f1.ome.tif: a z-stack of 3 planes without a z step" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main([*argv, "--overwrite", "--z-step", "2"]) == 0
    assert "z step" not in caplog.text
    from islet_imaging.io import read_field

    back = read_field(out / "A01_f1_nuclei.tif")
    assert back.pixel_size is not None and back.pixel_size.z == 2.0


def test_segment_cli(tmp_path: Path, oracle_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    fld, truth = field_2d(0.5)
    img = write_ome_tiff(
        tmp_path / "in" / "A01_f1.ome.tif", Field(fld.data, ("DAPI",), fld.pixel_size, Origin())
    )
    out = tmp_path / "out"
    argv = ["segment", str(img), "--out", str(out), "--model", str(oracle_dir), "--stage", "S0"]
    assert main([*argv, "--probabilities"]) == 0
    nuc = read_labels(out / "A01_f1_nuclei.tif")
    assert nuc.shape == (1, 128, 128)
    assert match(truth, nuc, thresholds=0.9)[0].ap == 1.0
    assert (out / "A01_f1_clusters.tif").is_file()
    from islet_imaging.io import read_field

    probs = read_field(out / "A01_f1_probabilities.ome.tif")
    assert probs.channel_names == ORACLE.output_names
    assert probs.pixel_size is not None and probs.pixel_size.x == pytest.approx(0.5)
    # existing outputs are kept without --overwrite: the image fails, exit code 1
    before = (out / "A01_f1_nuclei.tif").stat().st_mtime_ns
    with caplog.at_level(logging.ERROR):
        assert main(argv) == 1
    assert "--overwrite" in caplog.text
    assert (out / "A01_f1_nuclei.tif").stat().st_mtime_ns == before
    assert main([*argv, "--overwrite"]) == 0
    # test-time augmentation: the mirror-symmetric oracle gives the same labels
    assert main([*argv, "--overwrite", "--augment"]) == 0
    np.testing.assert_array_equal(read_labels(out / "A01_f1_nuclei.tif"), nuc)
    # in 2×2 blocks (each window holds the whole 64 µm field, with the 200 µm halo), stitched:
    # the same objects
    with caplog.at_level(logging.INFO):
        assert main([*argv, "--overwrite", "--block", "64"]) == 0
    assert "segmented in 4 blocks" in caplog.text and "A01_f1: block 4 of 4" in caplog.text
    assert same_partition(read_labels(out / "A01_f1_nuclei.tif"), nuc)


def test_segment_cli_failures(
    tmp_path: Path, oracle_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good, _ = field_2d(0.5)
    src = tmp_path / "in"
    write_ome_tiff(src / "A01_f1.ome.tif", good)
    bad = Field(good.data, ("INS",), good.pixel_size)
    write_ome_tiff(src / "A02_f1.ome.tif", bad)
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR):
        rc = main(
            ["segment", str(src), "--out", str(out), "--model", str(oracle_dir), "--stage", "S0"]
        )
    assert rc == 1
    assert "1 image(s) failed" in caplog.text and "A02_f1.ome.tif" in caplog.text
    assert (out / "A01_f1_nuclei.tif").is_file() and not (out / "A02_f1_nuclei.tif").exists()
    # a bad model is bad input: exit code 2 before any image is read
    assert main(["segment", str(src), "--out", str(out), "--model", str(tmp_path / "nope")]) == 2
    assert (
        main(["segment", str(src), "--out", str(out), "--model", str(oracle_dir), "--tile", "8"])
        == 2
    )
    assert (
        main(["segment", str(src), "--out", str(out), "--model", str(oracle_dir), "--block", "40"])
        == 2
    )
    caplog.clear()
    assert main(["segment", str(src), "--out", str(out), "--model", "classical", "--augment"]) == 2
    assert "--augment needs a CNN model" in caplog.text
    caplog.clear()
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["segment", str(src), "--out", str(tmp_path / "notes.txt"), "--stage", "S0"]) == 2
    assert "notes.txt: --out names an existing file, not a folder" in caplog.text
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("length", [32, 208, 1040, 2048, 8192])
def test_tiling_covers_with_overlap(length: int) -> None:
    from islet_imaging.models.inference import _tiling

    size, starts = _tiling(length, 512, 64, 16)
    assert size <= 512 and size % 16 == 0
    assert all(s % 16 == 0 for s in starts)
    assert starts[0] == 0 and starts[-1] + size == length
    gaps = np.diff(starts)
    assert np.all(size - gaps >= 64)  # neighbours overlap by at least the requested overlap
    if length > 512:  # as few tiles as possible: one fewer would not cover with that overlap
        n = len(starts)
        assert (n - 1) * 512 - (n - 2) * 64 < length


def test_augment_is_the_mean_over_mirror_images(random_bn_model: Model) -> None:
    # (atol 1e-4: convolutions of mirrored tensors sum in another order, ~1e-5 apart)
    img = np.random.default_rng(2).random((2, 64, 96)).astype(np.float32)
    aug = predict_maps(img, random_bn_model, augment=True)
    mirrors = ((), (1,), (2,), (1, 2))  # axes of the (C, Y, X) input
    plain = [predict_maps(np.flip(img, ax).copy(), random_bn_model) for ax in mirrors]
    for k in aug:
        back = [
            np.flip(p[k], tuple(a - 1 for a in ax)) for p, ax in zip(plain, mirrors, strict=True)
        ]
        np.testing.assert_allclose(aug[k], np.mean(back, axis=0), atol=1e-4)
    # the random network is not mirror-symmetric: augmenting changes the maps
    assert max(np.abs(aug[k] - plain[0][k]).max() for k in aug) > 1e-3
    # averaged over the mirror group, the maps of a mirrored image are the mirrored maps
    flipped = predict_maps(img[:, ::-1].copy(), random_bn_model, augment=True)
    for k in aug:
        np.testing.assert_allclose(flipped[k], aug[k][::-1], atol=1e-4)
    # and tiling stays seamless
    tiled = predict_maps(img, random_bn_model, tile=48, overlap=16, batch_size=2, augment=True)
    for k in aug:
        np.testing.assert_allclose(tiled[k], aug[k], atol=1e-4)


def test_augmented_segmentation(oracle: Model) -> None:
    # the oracle is mirror-symmetric, so its augmented maps are its plain maps: mirror images
    # flipped back to the wrong place would misplace the asymmetric nuclei
    fld, truth = field_2d(0.5)
    plain = segment_cnn(fld, S0, model=oracle)
    aug = segment_cnn(fld, S0, model=oracle, augment=True)
    np.testing.assert_array_equal(aug.nuclei, plain.nuclei)
    assert match(truth, aug.nuclei, thresholds=0.9)[0].ap == 1.0
    routed = segment_field(fld, stage="S0", model=oracle, augment=True)
    np.testing.assert_array_equal(routed.nuclei, plain.nuclei)
    with pytest.raises(InputError, match="needs a CNN model"):
        segment_field(fld, stage="S0", model="classical", augment=True)


def test_float16_maps(random_bn_model: Model) -> None:
    img = np.random.default_rng(1).random((2, 64, 80)).astype(np.float32)
    a = predict_maps(img, random_bn_model, tile=48, overlap=16)
    b = predict_maps(img, random_bn_model, tile=48, overlap=16, dtype=np.float16)
    assert all(v.dtype == np.float16 for v in b.values())
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=1e-3)


def test_absurd_scale_is_refused(oracle: Model) -> None:
    data = np.random.default_rng(0).integers(0, 100, (1, 1, 32, 32)).astype(np.uint16)
    fld = Field(data, ("DAPI",), PixelSize(50.0, 50.0))
    with pytest.raises(InputError, match="Check --pixel-size"):
        segment_cnn(fld, S0, model=oracle)
    with pytest.raises(InputError, match="positive"):
        rescale_factor(fld, ORACLE, nucleus_diameter_um=-3.0)


def test_sparse_field_is_not_empty(oracle: Model) -> None:
    """One nucleus on a black 512² field: the 1-99.8 percentiles are both 0, still segmented."""
    img, truth = render((256.0, 256.0), [(60.0, 60.0)], 5.0, (0.5, 0.5))
    assert (truth > 0).mean() < 0.002
    fld = Field((img * 1000).astype(np.uint16)[None, None], ("DAPI",), PixelSize(0.5, 0.5))
    labels = segment_cnn(fld, S0, model=oracle)
    assert labels.nuclei.max() == 1
    assert match(truth[None], labels.nuclei, thresholds=0.9)[0].ap == 1.0


def test_predict_maps_of_a_field(oracle: Model) -> None:
    fine, _ = field_2d(0.25)
    maps = predict_maps(fine, oracle, profile="S0")
    assert set(maps) == set(ORACLE.output_names)
    assert maps["nuclei_foreground"].shape == fine.spatial_shape  # back on the field's grid
    with pytest.raises(InputError, match="stage"):
        predict_maps(fine, oracle)


def test_cluster_split_follows_the_stage() -> None:
    from islet_imaging.models.inference import cluster_split_for

    assert cluster_split_for(get_stage("S1"), ORACLE) == "none"  # monolayer patches
    assert cluster_split_for(get_stage("S6"), ORACLE) == ORACLE.cluster_split == "combined"
    assert cluster_split_for(S6, ORACLE.replace(cluster_split="distance")) == "distance"


@pytest.mark.filterwarnings("ignore::islet_imaging.errors.SmallImageWarning")
@pytest.mark.parametrize(
    ("pixel_size", "nucleus_diameter", "cap_um"),
    [(0.5, None, 12.0 * 0.5), (0.25, None, 12.0 * 0.5), (0.5, 20.0, 12.0 * 0.5 * 2.0)],
)
def test_combined_split_gets_the_distance_cap_in_um(
    monkeypatch: pytest.MonkeyPatch,
    pixel_size: float,
    nucleus_diameter: float | None,
    cap_um: float,
) -> None:
    """The cluster distance map is capped at ``distance_cap_px`` model pixels: in µm of the field
    that is the cap × the model's pixel size, scaled when the user says nuclei are larger."""
    import islet_imaging.models.inference as inference

    seen: dict[str, object] = {}
    real = inference.maps_to_instances

    def spy(maps: dict[str, np.ndarray], **kw: object) -> tuple[np.ndarray, np.ndarray]:
        seen.update(kw)
        return real(maps, **kw)

    monkeypatch.setattr(inference, "maps_to_instances", spy)
    cfg = ORACLE.replace(cluster_split="combined")
    model = Model.from_network(oracle_network(), cfg, device="cpu")
    fld, _ = field_2d(pixel_size)
    segment_cnn(fld, S6, model=model, nucleus_diameter_um=nucleus_diameter)
    assert cfg.distance_cap_px["clusters"] == 12.0
    assert seen["cluster_split"] == "combined"
    assert seen["cluster_distance_cap_um"] == pytest.approx(cap_um)


def test_without_pixel_size_smaller_nuclei_are_kept(oracle: Model) -> None:
    """S0 nuclei are 5-18 µm. A 4 µm nucleus is dropped when the pixel size is known; without
    one, µm come from a single typical diameter and the floor is lowered (to 3 µm)."""
    assert UNKNOWN_SCALE_MIN_NUCLEUS * S0.nucleus_diameter_um[0] == pytest.approx(3.0)
    yy, xx = np.mgrid[:40, :80]
    fg = np.zeros((1, 40, 80), np.float32)
    fg[0, np.hypot(yy - 20, xx - 20) < 2.0 / 0.5] = 1.0  # 4 µm across at 0.5 µm/px
    fg[0, np.hypot(yy - 20, xx - 60) < 5.0 / 0.5] = 1.0  # 10 µm
    maps = {"nuclei_foreground": fg}
    spacing = (1.0, 0.5, 0.5)
    counts = {}
    for px in (0.5, None):
        fld, _ = field_2d(px, px_for_shape=0.5)
        nuclei, _ = field_instances(maps, spacing, fld, S0, oracle)
        counts[px] = int(nuclei.max())
    assert counts == {0.5: 1, None: 2}
