"""The pixel dtype of the rasters a training dataset reads: what a training run records as ``raster_dtype``.

Inference (``inference.inputs.check_dtype``) refuses a raster whose pixel dtype differs from the one the checkpoint
was trained on: the same ``--scale`` then gives values on another range (uint16 DNs shown to a model trained on
8-bit imagery). The training launchers record it through ``harness.TrainingRun`` (``harness.record_raster_dtype``:
``args.raster_dtype``, so it is in every checkpoint's ``args`` and in ``config.yaml``). What each dataset reads:

* GeoTIFF datasets (``GeoTiffDataset``, ``GeoTiffPretrainDataset``, segmentation on GeoTIFFs + vector labels): the
  reader's tile index has a ``dtype`` column (rasterio's name of each file's band dtype: ``uint8``, ``uint16``,
  ``float32`` ...);
* image/mask pairs (``MaskPairSource``): the dtype of each image array as read (Pillow for PNG/JPEG, rasterio for
  TIFF), in its tile index's ``dtype`` column too;
* image folders (``SceneDataset``, ``DemoScenes``, the GPU pipeline's ``RawJpegDataset``): every image is decoded to
  8-bit RGB whatever the file holds, so the model saw ``uint8`` pixels.

Several dtypes among the training files (:func:`pixel_dtypes` has more than one): nothing is recorded. One recorded
dtype would refuse rasters the model was in fact trained on, and ``check_dtype`` compares against one dtype; a run that
mixes dtypes under one ``scale`` has said that their values are comparable, which is all the check can tell.
"""
from __future__ import annotations

from typing import Any

__all__ = ["RASTER_DTYPE_KEY", "DECODED_IMAGE_DTYPE", "pixel_dtypes"]

RASTER_DTYPE_KEY = "raster_dtype"  # the key in a run's saved args (inference looks for it at any depth)
DECODED_IMAGE_DTYPE = "uint8"  # image-folder datasets decode every image to 8-bit RGB
_WRAPPERS = ("dataset", "loader", "source", "geo")  # DataLoader/SeededDataset, DeviceBatches, segmentation, GeoTIFF


def pixel_dtypes(data: Any) -> list[str]:
    """The distinct pixel dtypes (sorted numpy names) of the files the training dataset ``data`` reads; ``data``
    may be wrapped (a ``DataLoader``, ``SeededDataset``, ``DeviceBatches``, ``SegmentationDataset``). ``[]`` when
    the dataset tells none (an unknown dataset class)."""
    from .gpu_pipeline import RawJpegDataset
    from .scenes import SceneDataset
    from .synthetic import DemoScenes

    obj, seen = data, set()
    while obj is not None and id(obj) not in seen:
        seen.add(id(obj))
        if isinstance(obj, (SceneDataset, DemoScenes, RawJpegDataset)):
            return [DECODED_IMAGE_DTYPE]
        index = getattr(obj, "tile_index", None)
        if index is not None:
            columns = getattr(index, "columns", ())
            return sorted({str(d) for d in index["dtype"]}) if "dtype" in columns else []
        obj = next((getattr(obj, a) for a in _WRAPPERS if getattr(obj, a, None) is not None), None)
    return []

