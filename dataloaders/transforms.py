"""Per-sample transforms of the multiscale pretraining and linear-probe pipelines (torchvision/torch only).

The original ran the random resized crop per *batch* in the collate function with kornia; here all of it
runs per sample inside the DataLoader workers, so the main process only stacks finished tensors.

Pretraining (original_behaviour.md §4.3), for one image:

1. random crop of ``crop_size = 2 * input_size`` px with zero padding when the image is smaller (as
   ``torchvision.transforms.RandomCrop(pad_if_needed=True)``; padding is applied to the raw pixels, i.e.
   before normalisation); skipped with ``random_crop=False`` (non-FMoW / GeoTIFF configs, which crop from
   the whole image or window, as the original did);
2. random horizontal flip (p = 0.5);
3. to float (uint8 / 255) and per-channel normalisation;
4. square random resized crop: area fraction ~ U(scale_min, scale_max), side = round(sqrt(area)), uniform
   position, resized to ``target_size`` (T) with bicubic interpolation, align_corners=True (kornia's
   ``RandomResizedCrop`` defaults) -> the target ``I_hr``;
5. ``I_hr`` resized to ``input_size`` with bilinear, align_corners=True, no antialias (kornia ``Resize``)
   -> the encoder input;
6. ``(input_res, target_res) = util.gsd.crop_res_pair(side, T, input_size, base_resolution)`` (the crop rule,
   with the formulas, lives in ``util/gsd.py``).

The random numbers come from ``generator`` when given, else from torch's global RNG, which the DataLoader
seeds per worker from its own generator -- so batches are reproducible under ``torch.manual_seed`` (or a
DataLoader ``generator``) whatever the number of workers.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from util.gsd import crop_res, crop_res_pair

ImageLike = Union[Image.Image, torch.Tensor, np.ndarray]


def to_tensor_image(img: ImageLike) -> torch.Tensor:
    """Return a CHW tensor for a PIL image, an HWC/HW numpy array or a CHW/HW tensor (dtype preserved)."""
    if isinstance(img, Image.Image):
        return TF.pil_to_tensor(img)
    if isinstance(img, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(img))  # numpy arrays are HWC (or HW), as PIL gives them
        return t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    if isinstance(img, torch.Tensor):
        if img.ndim == 2:
            return img[None]
        if img.ndim != 3:
            raise ValueError(f"expected a CHW image tensor, got shape {tuple(img.shape)}")
        return img
    raise TypeError(f"expected a PIL image, numpy array or tensor, got {type(img).__name__}")


def to_float_normalized(img: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Float32 ``(img - mean) / std`` per channel; uint8 images are first scaled to [0, 1] (folded into
    mean/std). Raises ValueError when the channel count does not match."""
    if img.shape[0] != mean.numel():
        raise ValueError(f"image has {img.shape[0]} channels but mean/std have {mean.numel()} entries")
    if img.dtype == torch.uint8:
        return img.to(torch.float32).sub_(mean.view(-1, 1, 1) * 255.0).div_(std.view(-1, 1, 1) * 255.0)
    return (img.to(torch.float32) - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)


def _randint(low: int, high: int, generator: Optional[torch.Generator]) -> int:
    """Uniform integer in [low, high] (inclusive)."""
    return int(torch.randint(low, high + 1, (1,), generator=generator).item())


def random_crop_params(height: int, width: int, size: int,
                       generator: Optional[torch.Generator] = None) -> Tuple[int, int]:
    """(top, left) of a ``size`` window in image coordinates, as RandomCrop(pad_if_needed=True) draws it.

    When the image is smaller than ``size`` the offset is negative: the image lands at a uniformly random
    position inside a zero-padded window.
    """
    top = _randint(min(0, height - size), max(0, height - size), generator)
    left = _randint(min(0, width - size), max(0, width - size), generator)
    return top, left


def crop_with_zero_pad(img: torch.Tensor, top: int, left: int, size: int) -> torch.Tensor:
    """``size`` x ``size`` crop at (top, left); parts outside the image are zero."""
    c, h, w = img.shape
    if top >= 0 and left >= 0 and top + size <= h and left + size <= w:
        return img[:, top:top + size, left:left + size]
    out = img.new_zeros((c, size, size))
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + size, h), min(left + size, w)
    if y1 > y0 and x1 > x0:
        out[:, y0 - top:y1 - top, x0 - left:x1 - left] = img[:, y0:y1, x0:x1]
    return out


def sample_square_crop(height: int, width: int, scale: Tuple[float, float],
                       generator: Optional[torch.Generator] = None, attempts: int = 10) -> Tuple[int, int, int]:
    """(top, left, side) of a square random resized crop (aspect ratio 1, area fraction in ``scale``).

    Same scheme as torchvision's RandomResizedCrop: up to ``attempts`` draws of the area, falling back to
    the largest centred square.
    """
    area = height * width
    lo, hi = float(scale[0]), float(scale[1])
    for _ in range(attempts):
        frac = lo + (hi - lo) * float(torch.rand(1, generator=generator).item())
        side = int(round(math.sqrt(area * frac)))
        if 0 < side <= height and 0 < side <= width:
            top = _randint(0, height - side, generator)
            left = _randint(0, width - side, generator)
            return top, left, side
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side


_CUBIC_A = -0.75  # PyTorch / kornia bicubic coefficient


@lru_cache(maxsize=256)
def _taps(n_in: int, n_out: int, mode: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Source indexes and weights of a 1-D align_corners=True resize, as ``F.interpolate`` computes them."""
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    src = torch.arange(n_out, dtype=torch.float32) * scale
    i0 = torch.floor(src)
    t = src - i0
    if mode == "bilinear":
        offsets = torch.arange(0, 2)
        weights = torch.stack([1.0 - t, t], 1)
    elif mode == "bicubic":
        a = _CUBIC_A

        def near(v: torch.Tensor) -> torch.Tensor:  # |v| <= 1
            return ((a + 2) * v - (a + 3)) * v * v + 1

        def far(v: torch.Tensor) -> torch.Tensor:  # 1 < |v| < 2
            return ((a * v - 5 * a) * v + 8 * a) * v - 4 * a

        offsets = torch.arange(-1, 3)
        weights = torch.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], 1)
    else:
        raise ValueError(f"mode must be 'bilinear' or 'bicubic', got {mode!r}")
    index = (i0.long()[:, None] + offsets[None]).clamp_(0, n_in - 1)  # border pixels repeat
    return index, weights


def _resample_dim1(x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    out = x.index_select(1, index[:, 0]).mul_(weights[:, 0, None])
    for k in range(1, index.shape[1]):
        out.addcmul_(x.index_select(1, index[:, k]), weights[:, k, None])
    return out


def resize_align_corners(img: torch.Tensor, size: int, mode: str = "bicubic") -> torch.Tensor:
    """Square resize of a float CHW tensor, equal (to ~1e-6) to ``F.interpolate(img[None], (size, size),
    mode=mode, align_corners=True)[0]`` (no antialias, bicubic a = -0.75, clamped borders).

    Separable, with 4 (bicubic) or 2 (bilinear) taps per output pixel: about 3x faster than
    ``F.interpolate`` on one CPU thread -- the case of DataLoader workers, where it runs for every
    pretraining sample. With several intra-op threads (e.g. ``num_workers=0``) its many small ops would pay
    the thread pool's synchronisation, so ``F.interpolate`` is used there.
    """
    if torch.get_num_threads() > 1:
        return F.interpolate(img[None], size=(size, size), mode=mode, align_corners=True)[0]
    _, h, w = img.shape
    iy, wy = _taps(h, size, mode)
    ix, wx = _taps(w, size, mode)
    cols = _resample_dim1(img.transpose(1, 2).contiguous(), ix, wx)  # (C, size, h)
    return _resample_dim1(cols.transpose(1, 2).contiguous(), iy, wy)  # (C, size, size)


def resized_crop_with_res(img: torch.Tensor, top: int, left: int, side: int, target_size: int,
                          input_size: int, base_resolution: float
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic core of the pretraining transform for a known crop.

    Args:
        img: normalised float CHW tensor.
        top, left, side: the square crop in ``img`` pixels.
        target_size: T, side of the high-resolution target.
        input_size: side of the encoder input.
        base_resolution: multiplier of the crop ratio (CLI ``--base_resolution``).

    Returns:
        ``(input[C,in,in], input_res, target[C,T,T], target_res)``; the res values are float32 0-d tensors of
        ``util.gsd.crop_res_pair(side, target_size, input_size, base_resolution)``.
    """
    target = resize_align_corners(img[:, top:top + side, left:left + side], target_size, "bicubic")
    inp = F.interpolate(target[None], size=(input_size, input_size), mode="bilinear", align_corners=True,
                        antialias=False)[0]
    input_res, target_res = crop_res_pair(side, target_size, input_size, base_resolution)
    return (inp, torch.tensor(input_res, dtype=torch.float32), target,
            torch.tensor(target_res, dtype=torch.float32))


def flip_and_square_crop(x: torch.Tensor, hflip_p: float, scale: Tuple[float, float], mean: torch.Tensor,
                         std: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random horizontal flip, then a random square crop (area fraction in ``scale``), normalised: [C, s, s].

    Normalisation is per-channel affine, so normalising only the crop is exact (and cheaper).
    """
    if float(torch.rand(1, generator=generator).item()) < hflip_p:
        x = x.flip(-1)
    top, left, side = sample_square_crop(x.shape[1], x.shape[2], scale, generator)
    return to_float_normalized(x[:, top:top + side, left:left + side], mean, std)


def _as_stat(values: Sequence[float]) -> torch.Tensor:
    return torch.as_tensor(list(values), dtype=torch.float32)


def _checked_scale(scale: Tuple[float, float]) -> Tuple[float, float]:
    if not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"scale must satisfy 0 < scale_min <= scale_max <= 1, got {tuple(scale)}")
    return float(scale[0]), float(scale[1])


def _checked_stats(mean: Sequence[float], std: Sequence[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    if len(mean) != len(std):
        raise ValueError(f"mean has {len(mean)} entries but std has {len(std)}")
    return _as_stat(mean), _as_stat(std)


class PretrainTransform:
    """Multiscale pretraining transform for one image (see the module docstring for the exact steps).

    Args:
        input_size: encoder input side.
        mean, std: per-channel normalisation (in the scale of the float image: [0,1] for uint8 inputs).
        target_size: T, side of the target ``I_hr``; default ``2 * input_size``.
        scale: area-fraction range of the random resized crop (``--scale_min``, ``--scale_max``).
        base_resolution: ``--base_resolution``.
        random_crop: first take a random ``crop_size`` window (zero-padded) as the FMoW pipeline does.
        crop_size: side of that window; default ``2 * input_size``.
        hflip_p: probability of the horizontal flip.

    Call with a PIL image, a uint8 tensor (scaled by 1/255) or a float CHW tensor (used as is) and an
    optional ``torch.Generator``; returns ``(input[C,in,in], input_res, target[C,T,T], target_res)``.
    """

    def __init__(self, input_size: int = 224, mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225), target_size: Optional[int] = None,
                 scale: Tuple[float, float] = (0.2, 1.0), base_resolution: float = 2.5,
                 random_crop: bool = True, crop_size: Optional[int] = None, hflip_p: float = 0.5) -> None:
        self.scale = _checked_scale(scale)
        self.mean, self.std = _checked_stats(mean, std)
        self.input_size = int(input_size)
        self.target_size = int(target_size) if target_size else 2 * self.input_size
        self.crop_size = int(crop_size) if crop_size else 2 * self.input_size
        self.base_resolution = float(base_resolution)
        self.random_crop = bool(random_crop)
        self.hflip_p = float(hflip_p)

    def draw(self, height: int, width: int, generator: Optional[torch.Generator] = None) -> Tuple[int, ...]:
        """The random choices for an image of ``height`` x ``width`` px, in the order ``__call__`` draws them:
        ``(crop_top, crop_left, flip, top, left, side)`` -- the zero-padded ``crop_size`` window (0, 0 when
        ``random_crop`` is off), the flip (0/1) and the square crop inside the (flipped) window. Needs only the
        image size, so a loader can draw them without decoding (``dataloaders/gpu_pipeline.py``)."""
        crop_top = crop_left = 0
        if self.random_crop:
            crop_top, crop_left = random_crop_params(height, width, self.crop_size, generator)
            height = width = self.crop_size
        flip = int(float(torch.rand(1, generator=generator).item()) < self.hflip_p)
        top, left, side = sample_square_crop(height, width, self.scale, generator)
        return crop_top, crop_left, flip, top, left, side

    def __call__(self, img: ImageLike, generator: Optional[torch.Generator] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x = to_tensor_image(img)
        crop_top, crop_left, flip, top, left, side = self.draw(x.shape[1], x.shape[2], generator)
        if self.random_crop:
            x = crop_with_zero_pad(x, crop_top, crop_left, self.crop_size)
        if flip:
            x = x.flip(-1)
        crop = to_float_normalized(x[:, top:top + side, left:left + side], self.mean, self.std)
        return resized_crop_with_res(crop, 0, 0, side, self.target_size, self.input_size, self.base_resolution)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(input_size={self.input_size}, target_size={self.target_size}, "
                f"crop_size={self.crop_size if self.random_crop else None}, scale={self.scale}, "
                f"base_resolution={self.base_resolution}, hflip_p={self.hflip_p})")


class LinprobeTrainTransform:
    """Linear-probe / finetune training transform: returns ``(img[C,in,in], input_res)``.

    FMoW pipeline (``resize_crop=True``): resize the short side to ``input_size`` (antialiased bilinear),
    random crop ``input_size`` (zero padded if needed); otherwise the whole image is used. Then flip,
    normalise, square random resized crop with area fraction in ``scale`` (default 0.5-1.0) resized to
    ``input_size`` (bicubic, align_corners=True); ``input_res = util.gsd.crop_res(side, input_size, base_resolution)``.
    """

    def __init__(self, input_size: int = 224, mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225), scale: Tuple[float, float] = (0.5, 1.0),
                 base_resolution: float = 2.5, resize_crop: bool = True, hflip_p: float = 0.5) -> None:
        self.scale = _checked_scale(scale)
        self.mean, self.std = _checked_stats(mean, std)
        self.input_size = int(input_size)
        self.base_resolution = float(base_resolution)
        self.resize_crop = bool(resize_crop)
        self.hflip_p = float(hflip_p)

    def __call__(self, img: ImageLike, generator: Optional[torch.Generator] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.resize_crop:
            img = TF.resize(img, self.input_size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        x = to_tensor_image(img)
        if self.resize_crop:
            top, left = random_crop_params(x.shape[1], x.shape[2], self.input_size, generator)
            x = crop_with_zero_pad(x, top, left, self.input_size)
        crop = flip_and_square_crop(x, self.hflip_p, self.scale, self.mean, self.std, generator)
        out = resize_align_corners(crop, self.input_size, "bicubic")
        res = crop_res(crop.shape[-1], self.input_size, self.base_resolution)
        return out, torch.tensor(res, dtype=torch.float32)
