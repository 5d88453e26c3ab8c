"""GeoParquet files of per-window rows: a WKB ``geometry`` column (GeoParquet 1.0 ``geo`` metadata, the raster's
CRS as PROJJSON), plain columns, and fixed-size float32 list columns (embeddings). ``geopandas.read_parquet``
reads them; :func:`read_embeddings` returns the rows and an embedding column as a ``[N, D]`` array.
:func:`write_geoparquet_parts` streams a file part by part (one row group each): memory of one part.

Needs ``pyarrow`` (geopandas' own Parquet engine), imported when a file is written or read.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from util.io import atomic_write

__all__ = ["write_geoparquet", "write_geoparquet_parts", "read_embeddings", "embedding_columns"]

EMBEDDING_PREFIX = "embedding_"


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("writing GeoParquet needs pyarrow (pip install pyarrow)") from None
    return pa, pq


def write_geoparquet(path: str | Path, columns: Mapping[str, Sequence[Any]], geometry: Sequence[Any], crs: str | None,
                     vectors: Mapping[str, np.ndarray], metadata: Mapping[str, Any] | None = None) -> Path:
    """Write one GeoParquet file atomically (an existing ``path`` is replaced only by a complete file).

    ``columns``: plain columns of N values; ``geometry``: N shapely geometries in ``crs`` (None, with ``crs``
    None: images without georeferencing, stored as empty geometries of unknown CRS); ``vectors``: name ->
    ``[N, D]`` array stored as a fixed-size ``float32`` list column; ``metadata``: JSON stored under the file
    metadata key ``scalemae``.
    """
    import shapely

    geoms = np.asarray(geometry, dtype=object)
    kinds = sorted({int(shapely.get_type_id(g)) for g in geoms if g is not None})
    bbox = [float(v) for v in shapely.total_bounds(geoms)] if any(g is not None for g in geoms) else None
    return write_geoparquet_parts(path, [(columns, geoms, vectors)], crs, [GEOMETRY_TYPES.get(k, "Unknown")
                                                                          for k in kinds], bbox, metadata)


GEOMETRY_TYPES = {0: "Point", 3: "Polygon", 6: "MultiPolygon"}  # shapely type id -> GeoParquet geometry type


def write_geoparquet_parts(path: str | Path, parts: Iterable[tuple[Mapping[str, Sequence[Any]], Sequence[Any],
                                                                   Mapping[str, np.ndarray]]],
                           crs: str | None, geometry_types: Sequence[str], bbox: Sequence[float] | None,
                           metadata: Mapping[str, Any] | None = None) -> Path:
    """Write a GeoParquet file atomically from ``parts`` consumed one at a time, each ``(columns, geometry,
    vectors)`` as in :func:`write_geoparquet` and written as one Parquet row group: memory holds one part, not the
    file. The ``geo`` metadata is fixed before the first row: ``geometry_types`` (GeoParquet names, e.g.
    ``["Polygon"]``) and ``bbox`` (``[xmin, ymin, xmax, ymax]`` of all geometries, or None) are the caller's.
    Every part must have the columns, types and vector widths of the first (cast to its schema)."""
    from pyproj import CRS

    pa, pq = _pyarrow()
    geo = {"version": "1.0.0", "primary_column": "geometry",
           "columns": {"geometry": {"encoding": "WKB", "geometry_types": list(geometry_types),
                                    "crs": None if crs is None else CRS.from_user_input(crs).to_json_dict()}}}
    if bbox is not None:
        geo["columns"]["geometry"]["bbox"] = [float(v) for v in bbox]
    meta = {b"geo": json.dumps(geo).encode()}
    if metadata:
        meta[b"scalemae"] = json.dumps(metadata, sort_keys=True, default=str).encode()

    def write(tmp: str) -> None:
        writer = None
        try:
            for columns, geometry, vectors in parts:
                table = _table(pa, columns, geometry, vectors)
                if writer is None:
                    schema = table.schema.with_metadata(meta)
                    # dictionary pages only for plain columns: an embedding's floats rarely repeat, and a
                    # dictionary page per row group would only add to the file
                    writer = pq.ParquetWriter(tmp, schema, use_dictionary=[n for n in schema.names if n != "geometry"
                                                                           and n not in vectors])
                writer.write_table(table.replace_schema_metadata(meta).cast(schema))
            if writer is None:
                raise ValueError(f"{path}: no rows to write")
        finally:
            if writer is not None:
                writer.close()

    return atomic_write(path, write, by_name=True)


def _table(pa, columns: Mapping[str, Sequence[Any]], geometry: Sequence[Any], vectors: Mapping[str, np.ndarray]):
    """One part's ``pyarrow.Table``: plain columns, fixed-size float32 list columns, WKB ``geometry``."""
    import shapely

    data = {name: pa.array(list(values)) for name, values in columns.items()}
    for name, arr in vectors.items():
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        data[name] = pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), int(arr.shape[1]))
    data["geometry"] = pa.array(shapely.to_wkb(np.asarray(geometry, dtype=object)).tolist(), type=pa.binary())
    return pa.table(data)


def embedding_columns(names: Sequence[str]) -> list[str]:
    """The embedding columns among ``names`` (``embedding_cls``, ``embedding_mean``)."""
    return [n for n in names if n.startswith(EMBEDDING_PREFIX)]


def read_embeddings(path: str | Path, column: str | None = None):
    """``(GeoDataFrame, [N, D] float32 array, column)`` of an embedding file (``column``: default the first)."""
    import geopandas as gpd

    _pyarrow()
    what = "not an embedding file of main_embed.py (GeoParquet with embedding_* columns)"
    try:
        gdf = gpd.read_parquet(path)
    except (OSError, ValueError) as err:  # not Parquet, or Parquet without geometry metadata
        raise ValueError(f"{path}: {what}: {' '.join(str(err).split())}") from None
    cols = embedding_columns(list(gdf.columns))
    if not cols:
        raise ValueError(f"{path}: {what}: its columns are {list(gdf.columns)}")
    column = column or cols[0]
    if column not in cols:
        raise ValueError(f"{path}: no embedding column {column!r}; it has {cols}")
    vectors = np.stack([np.asarray(v, dtype=np.float32) for v in gdf[column]]) if len(gdf) else \
        np.zeros((0, 0), np.float32)
    return gdf, vectors, column
