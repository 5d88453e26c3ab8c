"""Applying a model to whole rasters (issue 20): the shared tiling core and what is built on it.

* ``inference.tiling`` -- the window grid of a raster / mosaic / band-file scene at a requested GSD (read with the
  project's GeoTIFF reader), sharding by window rows over ranks, resumable block bookkeeping;
* ``inference.geoparquet`` -- GeoParquet output of per-window rows (footprint geometry, fixed-size embedding);
* ``inference.search`` -- cosine top-k search over an embedding file.

Layer: above ``util``, ``dataloaders`` and ``harness`` (launchers such as ``main_embed.py`` import it).
"""
