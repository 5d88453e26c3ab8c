"""Multiscale pretraining / linear-probe transforms: res formula, shapes, flips, worker determinism."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from dataloaders.builders import build_pretrain_dataset
from dataloaders.transforms import (LinprobeTrainTransform, PretrainTransform, crop_with_zero_pad,
                                    random_crop_params, resize_align_corners, resized_crop_with_res,
                                    sample_square_crop)

ZERO, ONE = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def ramp(size):
    """Float image whose channel 0 is the column index and channel 1 the row index."""
    cols = torch.arange(size, dtype=torch.float32).expand(size, size)
    return torch.stack([cols, cols.t().contiguous(), torch.zeros(size, size)])


@pytest.mark.parametrize("side", [2, 17, 40, 64])
def test_res_from_known_crop_matches_formula(side):
    img = torch.randn(3, 64, 64)
    inp, input_res, target, target_res = resized_crop_with_res(img, 0, 64 - side, side, 64, 32, 2.5)
    assert target_res.item() == pytest.approx((side - 1) / 64 * 2.5)
    assert input_res.item() == pytest.approx((side - 1) / 64 * 2.5 * 64 / 32)
    assert input_res.dtype == torch.float32 and input_res.ndim == 0
    expected_t = F.interpolate(img[None, :, :side, 64 - side:], size=(64, 64), mode="bicubic", align_corners=True)[0]
    torch.testing.assert_close(target, expected_t)
    expected_i = F.interpolate(target[None], size=(32, 32), mode="bilinear", align_corners=True, antialias=False)[0]
    torch.testing.assert_close(inp, expected_i)


@pytest.mark.parametrize("seed", range(6))
def test_transform_res_matches_the_crop_it_took(seed):
    # on a linear ramp, bicubic (align_corners) reproduces the ramp, so the target's first/last column
    # values reveal the crop's first/last source column: side - 1 = last - first.
    tf = PretrainTransform(input_size=16, mean=ZERO, std=ONE, scale=(0.2, 1.0), base_resolution=2.5, hflip_p=0.0)
    g = torch.Generator().manual_seed(seed)
    inp, input_res, target, target_res = tf(ramp(32), generator=g)
    side_minus_1 = (target[0, 0, -1] - target[0, 0, 0]).item()
    assert side_minus_1 == pytest.approx(round(side_minus_1), abs=1e-3)
    assert target_res.item() == pytest.approx(side_minus_1 / 32 * 2.5, rel=1e-5)
    assert input_res.item() == pytest.approx(target_res.item() * 32 / 16, rel=1e-6)
    assert 0.2 * 32 * 32 - 64 <= (side_minus_1 + 1) ** 2 <= 32 * 32


def test_targets_are_exactly_twice_the_input():
    for input_size in (16, 24):
        tf = PretrainTransform(input_size=input_size, mean=ZERO, std=ONE)
        inp, _, target, _ = tf(torch.rand(3, 70, 50))
        assert inp.shape == (3, input_size, input_size)
        assert target.shape == (3, 2 * input_size, 2 * input_size)


def test_full_crop_res_and_normalisation():
    tf = PretrainTransform(input_size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), scale=(1.0, 1.0),
                           base_resolution=2.0, hflip_p=0.0)
    img = torch.full((3, 16, 16), 0.75)
    inp, input_res, target, target_res = tf(img)
    assert target_res.item() == pytest.approx(15 / 16 * 2.0)
    assert input_res.item() == pytest.approx(15 / 16 * 2.0 * 16 / 8)
    torch.testing.assert_close(target, torch.ones_like(target))  # (0.75 - 0.5) / 0.25


def test_flip_keeps_res_and_mirrors_the_target():
    img = torch.rand(3, 32, 32)
    outs = []
    for p in (0.0, 1.0):
        tf = PretrainTransform(input_size=16, mean=ZERO, std=ONE, scale=(1.0, 1.0), hflip_p=p)
        outs.append(tf(img, generator=torch.Generator().manual_seed(3)))
    (_, r_in0, t0, r_t0), (_, r_in1, t1, r_t1) = outs
    assert r_in0 == r_in1 and r_t0 == r_t1
    torch.testing.assert_close(t1, t0.flip(-1), atol=1e-5, rtol=0)
    assert not torch.allclose(t0, t1)
    # with random scales the res still does not depend on the flip
    res = [PretrainTransform(16, ZERO, ONE, hflip_p=p)(img, generator=torch.Generator().manual_seed(9))[3]
           for p in (0.0, 1.0)]
    assert res[0] == res[1]


def test_pil_and_uint8_tensor_inputs_agree():
    arr = (np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)
    tf = PretrainTransform(input_size=16, mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2))
    a = tf(Image.fromarray(arr), generator=torch.Generator().manual_seed(1))
    b = tf(torch.from_numpy(arr).permute(2, 0, 1), generator=torch.Generator().manual_seed(1))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_random_crop_pads_small_images_with_zeros():
    img = torch.ones(1, 5, 7, dtype=torch.uint8)
    for seed in range(5):
        top, left = random_crop_params(5, 7, 12, torch.Generator().manual_seed(seed))
        assert -7 <= top <= 0 and -5 <= left <= 0
        out = crop_with_zero_pad(img, top, left, 12)
        assert out.shape == (1, 12, 12) and out.sum().item() == 35  # the whole image, the rest zeros
    assert crop_with_zero_pad(torch.arange(100).view(1, 10, 10), 2, 3, 4)[0, 0, 0] == 23


def test_square_crop_area_range_and_fallback():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        top, left, side = sample_square_crop(40, 40, (0.25, 0.5), g)
        assert 0.25 * 1600 - 2 * 40 <= side * side <= 0.5 * 1600 + 2 * 40
        assert 0 <= top <= 40 - side and 0 <= left <= 40 - side
    # a wide image cannot hold sqrt(area) squares -> centred largest square
    assert sample_square_crop(10, 1000, (1.0, 1.0), g) == (0, 495, 10)


def test_linprobe_transform_res_matches_crop():
    tf = LinprobeTrainTransform(input_size=16, mean=ZERO, std=ONE, scale=(0.5, 1.0), base_resolution=2.5,
                                resize_crop=False, hflip_p=0.0)
    img, res = tf(ramp(32), generator=torch.Generator().manual_seed(4))
    assert img.shape == (3, 16, 16)
    side_minus_1 = (img[0, 0, -1] - img[0, 0, 0]).item()
    assert res.item() == pytest.approx(side_minus_1 / 16 * 2.5, rel=1e-5)
    tf2 = LinprobeTrainTransform(input_size=16, mean=ZERO, std=ONE, resize_crop=True)
    img2, res2 = tf2(Image.new("RGB", (50, 30)))
    assert img2.shape == (3, 16, 16) and 0 < res2.item() <= 15 / 16 * 2.5


def _demo_batches(seed, workers=2):
    cfg = {"data": {"type": "demo", "length": 8, "size": 40, "num_classes": 2}}
    ds = build_pretrain_dataset(cfg, input_size=16, target_size=32)
    loader = DataLoader(ds, batch_size=4, num_workers=workers, generator=torch.Generator().manual_seed(seed))
    return list(loader)


def test_batches_from_two_workers_are_deterministic_under_a_seed():
    a, b, c = _demo_batches(0), _demo_batches(0), _demo_batches(1)
    assert len(a) == 2
    imgs, input_res, targets, target_res = a[0]
    assert imgs.shape == (4, 3, 16, 16) and targets.shape == (4, 3, 32, 32)
    assert input_res.shape == (4,) and target_res.shape == (4,)
    torch.testing.assert_close(input_res, target_res * 2)
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            assert torch.equal(u, v)
    assert not torch.equal(a[0][1], c[0][1])


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
@pytest.mark.parametrize("shape,size", [((3, 37, 53), 64), ((2, 64, 64), 20), ((1, 1, 5), 7), ((3, 10, 10), 1)])
def test_separable_resize_equals_interpolate(mode, shape, size):
    img = torch.randn(*shape)
    expected = F.interpolate(img[None], size=(size, size), mode=mode, align_corners=True)[0]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # the separable kernel (used by single-threaded DataLoader workers)
        torch.testing.assert_close(resize_align_corners(img, size, mode), expected, atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("cls", [PretrainTransform, LinprobeTrainTransform])
def test_transforms_reject_bad_scale_and_mismatched_stats(cls):
    with pytest.raises(ValueError, match="scale must satisfy"):
        cls(input_size=16, scale=(0.8, 0.5))
    with pytest.raises(ValueError, match="mean has 3 entries but std has 2"):
        cls(input_size=16, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2))
