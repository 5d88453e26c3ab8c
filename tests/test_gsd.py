"""The ``res`` rules of util/gsd.py: each function equals its plain formula (hypothesis), and every call site (the
pretraining and linear-probe transforms, the device pipeline, the GeoTIFF and segmentation datasets, kNN and
linear-probe evaluation, the MAE's ``source_size`` and ``absolute_scale``) produces exactly the function's value."""
from __future__ import annotations

import argparse
import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import main_linprobe
from util import gsd, knn_eval

ROOT = Path(__file__).resolve().parent.parent

sides = st.integers(1, 4096)
sizes = st.integers(1, 2048)
bases = st.floats(1e-3, 100.0, allow_nan=False)
gsds = st.floats(1e-3, 1e4, allow_nan=False)
f32 = torch.float32


# ------------------------------------------------------------------------------------------ the plain formulas
@settings(deadline=None)
@given(sides, sizes, bases)
def test_crop_res_is_the_inclusive_corner_rule(side, size, base):
    assert gsd.crop_res(side, size, base) == (side - 1) / size * base


@settings(deadline=None)
@given(sides, sizes, sizes, bases)
def test_crop_res_pair_is_target_then_input(side, target, inp, base):
    target_res = (side - 1) / target * base
    assert gsd.crop_res_pair(side, target, inp, base) == (target_res * target / inp, target_res)


@settings(deadline=None)
@given(sides, sizes, bases)
def test_window_res_is_the_pixel_ratio_without_minus_one(window, inp, base):
    assert gsd.window_res(window, inp, base) == base * window / inp
    assert gsd.window_res(inp, inp, base) == pytest.approx(base, rel=1e-12)  # own size: base_resolution
    if window > 1:  # the named difference to the crop rule
        assert gsd.window_res(window, inp, base) != pytest.approx(gsd.crop_res(window, inp, base), rel=1e-9)


@settings(deadline=None)
@given(sizes, bases, st.booleans(), st.sampled_from([224, 256, 64.0]))
def test_eval_res(scale, base, eval_gsd, reference):
    expected = base * reference / scale if eval_gsd else base
    assert gsd.eval_res(scale, base, eval_gsd, reference) == expected


@settings(deadline=None)
@given(gsds, gsds)
def test_relative_res_and_reference_gsd_factor(g, ref):
    assert gsd.relative_res(g, ref) == g / ref
    assert gsd.reference_gsd_factor(g, ref) == g / ref
    assert gsd.reference_gsd_factor(g, None) == 1.0 and gsd.reference_gsd_factor(None, ref) == 1.0
    t = torch.tensor([g, 2 * g], dtype=torch.float64)
    assert torch.equal(gsd.relative_res(t, ref), t / ref)


@pytest.mark.parametrize("bad", [None, 0, -1.0])
def test_relative_res_refuses_a_non_positive_reference(bad):
    with pytest.raises(ValueError, match="reference_gsd"):
        gsd.relative_res(1.0, bad)


@settings(deadline=None)
@given(st.floats(1e-3, 100.0), sizes, sizes)
def test_rescale_res_float_and_tensor(res, a, b):
    assert gsd.rescale_res(res, a, b) == res * (a / b)
    t = torch.tensor([res, 2 * res], dtype=f32)
    assert torch.equal(gsd.rescale_res(t, a, b), t * (a / b))


def test_as_res_shapes_and_errors():
    like = torch.zeros(3)
    assert torch.equal(gsd.as_res(None, 4, like), torch.ones(1))
    assert torch.equal(gsd.as_res(2.5, 4, like), torch.tensor([2.5]))
    out = gsd.as_res([1, 2, 3, 4], 4, like)
    assert out.dtype.is_floating_point and out.tolist() == [1.0, 2.0, 3.0, 4.0]
    assert gsd.as_res(torch.tensor(2.0, dtype=torch.float64), 4, like).dtype == torch.float64
    with pytest.raises(ValueError, match="one value per sample"):
        gsd.as_res([1.0, 2.0], 3, like)


def test_absolute_res():
    r = torch.tensor([0.5, 3.0])
    assert gsd.absolute_res(r, False) is r
    assert torch.equal(gsd.absolute_res(r, True), torch.ones(2))


# ------------------------------------------------------------------------------------------------ call sites
@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), bases)
def test_pretrain_transform_res_is_crop_res_pair(seed, base):
    from dataloaders.transforms import PretrainTransform

    t = PretrainTransform(input_size=6, mean=[0.5], std=[0.5], target_size=12, scale=(0.05, 1.0),
                          base_resolution=base, random_crop=False)
    img = torch.zeros(1, 21, 21, dtype=torch.uint8)
    side = t.draw(21, 21, torch.Generator().manual_seed(seed))[5]
    _, input_res, _, target_res = t(img, torch.Generator().manual_seed(seed))
    expected_in, expected_target = gsd.crop_res_pair(side, 12, 6, base)
    assert torch.equal(input_res, torch.tensor(expected_in, dtype=f32))
    assert torch.equal(target_res, torch.tensor(expected_target, dtype=f32))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), bases)
def test_linprobe_transform_res_is_crop_res(seed, base):
    from dataloaders.transforms import LinprobeTrainTransform, sample_square_crop

    t = LinprobeTrainTransform(input_size=7, mean=[0.5], std=[0.5], scale=(0.05, 1.0), base_resolution=base,
                               resize_crop=False)
    gen = torch.Generator().manual_seed(seed)
    torch.rand(1, generator=gen)  # the flip draw comes first
    side = sample_square_crop(19, 19, (0.05, 1.0), gen)[2]
    _, res = t(torch.zeros(1, 19, 19, dtype=torch.uint8), torch.Generator().manual_seed(seed))
    assert torch.equal(res, torch.tensor(gsd.crop_res(side, 7, base), dtype=f32))


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(1, 24), min_size=1, max_size=4), bases)
def test_device_pipeline_res_equals_the_cpu_pipeline_bit_for_bit(crop_sides, base):
    """The device pipeline computes res per sample as the CPU transform does (before, it redid ``* T / input`` in
    float32, one ulp off for some ``base_resolution``)."""
    from PIL import Image

    from dataloaders.gpu_pipeline import DeviceTransform
    from dataloaders.transforms import PretrainTransform, resized_crop_with_res

    t = PretrainTransform(input_size=10, mean=[0.5] * 3, std=[0.5] * 3, target_size=23, base_resolution=base,
                          random_crop=False)
    buf = io.BytesIO()
    Image.fromarray(np.zeros((24, 24, 3), dtype=np.uint8)).save(buf, format="JPEG")
    data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    params = torch.tensor([[0, 0, 0, 0, 0, s] for s in crop_sides], dtype=torch.int64)
    _, input_res, _, target_res = DeviceTransform(t, "cpu")([data] * len(crop_sides), params)
    for i, side in enumerate(crop_sides):
        _, cpu_in, _, cpu_target = resized_crop_with_res(torch.zeros(3, side, side), 0, 0, side, 23, 10, base)
        assert torch.equal(input_res[i], cpu_in) and torch.equal(target_res[i], cpu_target)
        assert input_res[i].item() == torch.tensor(gsd.crop_res_pair(side, 23, 10, base)[0], dtype=f32).item()


def _utm_tile(tmp_path, cell: float, size: int = 24):
    from affine import Affine

    from dataloaders.synthetic import write_geotiff

    data = np.full((1, size, size), 100, dtype=np.uint8)
    return write_geotiff(tmp_path / "t.tif", data, Affine(cell, 0, 500000.0, 0, -cell, 5200000.0), "EPSG:32633",
                         dtype="uint8")


def test_geotiff_samples_res_is_reference_gsd_factor(tmp_path):
    from dataloaders.geo_sampler import WindowSpec
    from dataloaders.geotiff import GeoTiffDataset, GeoTiffPretrainDataset

    path = _utm_tile(tmp_path, 2.0)
    for ref in (None, 0.5, 3.0):
        geo = GeoTiffDataset(path, window_size=8, reference_gsd=ref)
        sample = geo[WindowSpec(0, 4, 4, 8, 8)]
        assert sample["gsd"] == pytest.approx(2.0, rel=1e-3)
        assert sample["res"] == gsd.reference_gsd_factor(sample["gsd"], ref)
        pre = GeoTiffPretrainDataset(geo, lambda img: (img, torch.tensor(1.7), img, torch.tensor(0.85)), mean=[0.0],
                                     reference_gsd=ref)
        _, input_res, _, target_res = pre[WindowSpec(0, 4, 4, 8, 8)]
        factor = gsd.reference_gsd_factor(sample["gsd"], ref)
        assert torch.equal(input_res, torch.tensor(1.7) * factor)
        assert torch.equal(target_res, torch.tensor(0.85) * factor)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**20), st.floats(0.25, 1.0), st.sampled_from([None, 0.5, 3.0]), bases)
def test_segmentation_res_is_window_res_times_gsd_factor(tmp_path_factory, seed, crop_min, ref, base):
    """Training windows with random crops: the res equals window_res of the crop side at the input size, times
    reference_gsd_factor; evaluation windows: window_res of the window at its own size."""
    from dataloaders.geo_sampler import WindowSpec
    from dataloaders.geotiff import GeoTiffDataset
    from dataloaders.seg_labels import VectorLabels
    from dataloaders.seg_sources import GeoVectorSource
    from dataloaders.segmentation import SegmentationDataset

    tmp = tmp_path_factory.mktemp("seg")
    path = _utm_tile(tmp, 2.0)
    (tmp / "l.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    src = GeoVectorSource(GeoTiffDataset(path, window_size=1), VectorLabels(tmp / "l.geojson", ["x"]))
    common = dict(mean=[0.0], std=[1.0], size=16, base_resolution=base, reference_gsd=ref, seed=seed)
    train = SegmentationDataset(src, input_size=12, train=True, length=4, crop_scale=(crop_min, 1.0), **common)
    sample = train[WindowSpec(0, 2, 3, 16, 16)]
    factor = gsd.reference_gsd_factor(src.read(0, 2, 3, 16, 16)[3]["gsd"], ref)
    allowed = {gsd.window_res(side, 12, base) * factor for side in range(1, 17)}
    assert sample["res"] in allowed
    full = SegmentationDataset(src, input_size=12, train=True, length=4, **common)
    assert full[WindowSpec(0, 2, 3, 16, 16)]["res"] == gsd.window_res(16, 12, base) * factor
    val = SegmentationDataset(src, input_size=12, train=False, **common)
    val_factor = gsd.reference_gsd_factor(src.read(0, 0, 0, 16, 16)[3]["gsd"], ref)
    assert val[0]["res"] == gsd.window_res(16, 16, base) * val_factor


@settings(deadline=None)
@given(st.integers(8, 512), bases, st.booleans(), st.integers(8, 512))
def test_knn_and_linprobe_eval_res_use_the_rule(scale, base, eval_gsd, reference):
    assert knn_eval.eval_res is gsd.eval_res
    args = argparse.Namespace(eval_scale=scale, eval_base_resolution=base, eval_gsd=eval_gsd,
                              eval_reference_resolution=reference)
    assert main_linprobe.eval_resolution(args) == gsd.eval_res(scale, base, eval_gsd, reference)


def test_linprobe_train_range_uses_crop_res():
    args = argparse.Namespace(input_size=224, base_resolution=2.5, scale_min=0.5, scale_max=1.0)
    lo, _, hi = main_linprobe.train_resolution_range(args)
    assert lo == gsd.crop_res(round(0.5 ** 0.5 * 224), 224, 2.5) and hi == gsd.crop_res(224, 224, 2.5)


@pytest.mark.parametrize("absolute", [False, True])
def test_mae_source_size_and_absolute_scale_use_the_rules(tiny_mae, absolute):
    model = tiny_mae(absolute_scale=absolute).eval()
    seen = {}
    encoder = model.forward_encoder

    def spy(imgs, mask_ratio, input_res, noise=None):
        seen["res"] = input_res
        return encoder(imgs, mask_ratio, input_res, noise)

    model.forward_encoder = spy
    res = torch.tensor([0.7, 1.3])
    with torch.no_grad():
        model(torch.zeros(2, 3, 64, 64), torch.zeros(2, 3, 128, 128), input_res=res, source_size=32)
    expected = gsd.absolute_res(gsd.rescale_res(res, 64, 32), absolute)
    assert torch.equal(seen["res"], expected)
    assert torch.equal(seen["res"], torch.ones(2) if absolute else res * 2)


def test_no_res_formula_outside_util_gsd():
    """The crop rule, the reference-GSD division and the resize factor are written only in util/gsd.py."""
    patterns = [re.compile(p) for p in (r"- 1\) / \w+ \* \w*base_resolution", r"base_resolution \* \w+ / \w+",
                                        r"gsd / (float\()?\w*reference_gsd", r"res \* \(\w+ / \w+\)",
                                        r"torch\.ones_like\(\w*res\)")]
    offenders = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", "bench", ".venv", "build") or rel.as_posix() == "util/gsd.py":
            continue
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#")[0]
            if '"' in code or "'" in code or code.strip().startswith("``"):
                continue  # help texts and messages may quote the formula
            if any(p.search(code) for p in patterns):
                offenders.append(f"{rel}:{lineno}: {line.strip()}")
    assert not offenders, offenders
