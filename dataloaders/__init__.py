"""Scale-MAE data layer: dataset configs, the multiscale pretraining pipeline, scene and GeoTIFF datasets.

Modules (import them directly; this package imports nothing heavy on its own):

* ``config``      -- YAML data configs, one parser for both schemas: ``load_config`` (datasets),
  ``load_seg_config`` (segmentation), ``save_config``, ``ConfigError``.
* ``builders``    -- ``build_pretrain_dataset``, ``build_pretrain_sampler``, ``build_eval_datasets``,
  ``build_linprobe_datasets``, ``EVAL_STATS``.
* ``transforms``  -- ``PretrainTransform`` (per sample, in DataLoader workers) and ``LinprobeTrainTransform``.
* ``scenes``      -- ImageFolder trees, split lists (``./<class>/<file>``), decoding with clear errors.
* ``eval_sets``   -- the nine kNN / linear-probe dataset ids, statistics and transforms.
* ``geotiff``     -- ``GeoTiffDataset``, ``GeoTiffPretrainDataset``, ``relative_res``; with ``geo_index``
  (ground GSD in any CRS, band-file scenes, read grids, tile index, header cache, area of interest),
  ``geo_read`` (plain / decimated / warped window reads, mosaics) and ``geo_sampler``
  (``DistributedRandomWindowSampler``).
* ``segmentation`` -- segmentation windows: ``SegmentationDataset``, ``grid_windows``, ``TileShardSampler``,
  ``seg_collate``, ``build_seg_datasets``; with ``seg_sources`` (``GeoVectorSource``: GeoTIFFs + vector labels,
  ``MaskPairSource``: image/mask pairs) and ``seg_labels`` (``VectorLabels``: polygons burnt on window grids,
  ``mask_to_classes``). ``seg_synthetic``: the synthetic building scenes of the demo and tests.
* ``splits``      -- writing split lists and SHA256SUMS (``tools/make_splits.py``).
* ``synthetic``   -- deterministic synthetic scenes and GeoTIFFs for tests and the demo.
* ``pixel_dtype`` -- ``pixel_dtypes``: the pixel dtype(s) of the files a training dataset reads (what a training
  run records as ``raster_dtype`` for inference to check).
* ``stats``, ``errors`` -- normalisation statistics; ``DataError`` / ``MissingDataError``.

Resolution (``res``) semantics: ``res`` is a *relative* ground sample distance that multiplies the patch-grid
positions of the positional embedding; it is not metres. Every rule that computes it (pretraining crop, linear
probe, segmentation windows, evaluation sides, the ``reference_gsd`` factor of GeoTIFF windows) lives in
``util/gsd.py``.
"""
