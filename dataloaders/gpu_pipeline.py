"""Opt-in device-side pretraining pipeline (``main_pretrain.py --gpu_pipeline``): light CPU workers, pixels on the GPU.

The CPU workers only read each JPEG's bytes and its size (from the header, without decoding) and draw the sample's
random choices with :meth:`PretrainTransform.draw` -- under the same per-sample seeding (:mod:`dataloaders.seeding`)
and in the same order as the CPU pipeline. The main process then decodes the batch on the device
(``torchvision.io.decode_jpeg(device=...)``, nvJPEG on CUDA) and applies the same maths there: zero-padded window,
flip, square crop, normalisation, bicubic resize to the target (align_corners=True) and bilinear to the input, with
the same ``res`` rule (:func:`util.gsd.crop_res_pair`, computed per sample exactly as the CPU pipeline does).

Everything is device-agnostic, so on CPU (libjpeg-turbo, the decoder of the CPU pipeline) it reproduces the CPU
pipeline to float rounding (tests/test_gpu_pipeline.py). On CUDA the pixels differ from the CPU pipeline's by the
decoder alone: nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's by a few grey levels on some
pixels (docs/differences.md). JPEG files only (other formats and GeoTIFF configs use the CPU
pipeline).
"""
from __future__ import annotations

import warnings
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from util.gsd import crop_res_pair

from .errors import DataError, MissingDataError
from .transforms import PretrainTransform

__all__ = ["RawJpegDataset", "collate_raw", "DeviceTransform", "DeviceBatches", "build_gpu_pipeline_loader"]


class RawJpegDataset(Dataset):
    """Items ``(jpeg bytes [nbytes] uint8, params [6] int64)`` with params = ``transform.draw(h, w)``.

    ``paths``: JPEG files. The random choices use torch's global RNG (seed it per sample with ``SeededDataset``),
    exactly as the CPU pipeline's transform does.
    """

    def __init__(self, paths: Sequence[str], transform: PretrainTransform) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.paths[index]
        try:
            with open(path, "rb") as fh:
                data = fh.read()
            with Image.open(path) as im:  # reads the header only
                if im.format != "JPEG":
                    raise DataError(f"{path}: --gpu_pipeline decodes JPEG files only, this is {im.format}")
                width, height = im.size
        except FileNotFoundError:
            raise MissingDataError(f"{path}: image file not found") from None
        except OSError as exc:
            raise DataError(f"{path}: cannot read image: {exc}") from None
        params = torch.tensor(self.transform.draw(height, width), dtype=torch.int64)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), params


def collate_raw(items: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A batch of raw items: (list of B byte tensors, params [B, 6])."""
    return [data for data, _ in items], torch.stack([p for _, p in items])


class DeviceTransform:
    """Decode a raw batch on ``device`` and apply ``transform``'s maths with the drawn params.

    Returns ``(imgs [B, C, in, in], input_res [B], targets [B, C, T, T], target_res [B])``: images on ``device``,
    the res values on the CPU (they come from the params; logging their mean needs no device sync).
    """

    def __init__(self, transform: PretrainTransform, device: torch.device | str) -> None:
        self.t = transform
        self.device = torch.device(device)
        self.mean = transform.mean.to(self.device).view(-1, 1, 1) * 255.0
        self.std = transform.std.to(self.device).view(-1, 1, 1) * 255.0

    def decode(self, datas: list[torch.Tensor]) -> list[torch.Tensor]:
        from torchvision.io import ImageReadMode, decode_jpeg

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to torchcodec
            if self.device.type == "cpu":
                return [decode_jpeg(d, mode=ImageReadMode.RGB) for d in datas]
            return decode_jpeg(datas, mode=ImageReadMode.RGB, device=self.device)

    def sample(self, img: torch.Tensor, params: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoded uint8 image [C, H, W] on the device -> (input [C, in, in], target [C, T, T])."""
        t = self.t
        crop_top, crop_left, flip, top, left, side = (int(v) for v in params)
        if t.random_crop:
            c, h, w = img.shape
            size = t.crop_size
            # the window's part inside the image, then zero padding around it (as crop_with_zero_pad)
            y0, x0 = max(crop_top, 0), max(crop_left, 0)
            y1, x1 = min(crop_top + size, h), min(crop_left + size, w)
            img = img[:, y0:y1, x0:x1]
            pad = (x0 - crop_left, crop_left + size - x1, y0 - crop_top, crop_top + size - y1)
            if any(pad):
                img = F.pad(img, pad)
        if flip:
            img = img.flip(-1)
        crop = img[:, top:top + side, left:left + side].float().sub_(self.mean).div_(self.std)
        target = F.interpolate(crop[None], size=(t.target_size, t.target_size), mode="bicubic",
                               align_corners=True)[0]
        inp = F.interpolate(target[None], size=(t.input_size, t.input_size), mode="bilinear", align_corners=True,
                            antialias=False)[0]
        return inp, target

    def __call__(self, datas: list[torch.Tensor], params: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        images = self.decode(datas)
        pairs = [self.sample(img, p) for img, p in zip(images, params.tolist())]
        t = self.t
        res = [crop_res_pair(int(p[5]), t.target_size, t.input_size, t.base_resolution) for p in params.tolist()]
        input_res = torch.tensor([r[0] for r in res], dtype=torch.float32)
        target_res = torch.tensor([r[1] for r in res], dtype=torch.float32)
        return (torch.stack([a for a, _ in pairs]), input_res, torch.stack([b for _, b in pairs]), target_res)


class DeviceBatches:
    """Iterate a raw-batch DataLoader and yield finished device batches; ``len`` and ``sampler`` are the loader's."""

    def __init__(self, loader: Any, transform: DeviceTransform) -> None:
        self.loader, self.transform = loader, transform

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for datas, params in self.loader:
            yield self.transform(datas, params)


def build_gpu_pipeline_loader(args: Any, cfg: dict, device: torch.device
                              ) -> tuple[DeviceBatches, Any, int]:
    """``main_pretrain``'s loader with the device-side pipeline: (batches, SeededSampler, steps per epoch).

    Supported for JPEG scene configs (``fmow``, ``resisc``, ...); other configs raise ``DataError`` naming the
    option to drop.
    """
    from .builders import DEMO_ID, GEO_TYPES, build_pretrain_sampler, norm_stats, scene_samples, validated_data
    from .seeding import SeededDataset, SeededSampler

    d = validated_data(cfg)
    if d["type"] in GEO_TYPES or d["type"] == DEMO_ID:
        raise DataError(f"--gpu_pipeline decodes JPEG scene folders; data.type '{d['type']}' is not one: drop "
                        f"--gpu_pipeline for this config")
    mean, std = norm_stats(d)
    transform = PretrainTransform(args.input_size, mean, std, target_size=max(args.target_size),
                                  scale=(args.scale_min, args.scale_max), base_resolution=args.base_resolution,
                                  random_crop=d["type"] == "fmow")
    dataset = RawJpegDataset([p for p, _ in scene_samples(d)], transform)
    base = build_pretrain_sampler(dataset, cfg, num_replicas=args.world_size, rank=args.rank, seed=args.seed)
    sampler = SeededSampler(base, rank=args.rank, world_size=args.world_size)
    workers = args.num_workers
    loader = torch.utils.data.DataLoader(
        SeededDataset(dataset, args.seed), sampler=sampler, batch_size=args.batch_size, num_workers=workers,
        collate_fn=collate_raw, drop_last=True, persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
    return DeviceBatches(loader, DeviceTransform(transform, device)), sampler, len(base) // args.batch_size
