"""Raster metadata, ground sample distance, tile index (GeoDataFrame) and area-of-interest handling.

GSD (ground sample distance) of a raster, in metres:

* projected CRS: the pixel size from the geotransform times the CRS's linear unit (metre, US survey foot,
  ...); this is the nominal GSD (for Web Mercator, EPSG:3857, that is *not* the ground distance away from
  the equator -- reproject such data first);
* geographic CRS (degrees): the geodesic length of one pixel step in x and in y at the tile's centre, on
  the CRS's ellipsoid (pyproj ``Geod``). It varies with latitude across large tiles; the centre value is used;
* no CRS or no geotransform: :class:`~dataloaders.errors.DataError` (the GSD cannot be known).

The per-sample ``gsd`` is the mean of the x and y values.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

from .errors import DataError, MissingDataError

PathLike = Union[str, os.PathLike]
RASTER_SUFFIXES = (".tif", ".tiff")


@dataclass(frozen=True)
class RasterInfo:
    """What the data layer needs to know about one raster file."""

    path: str
    width: int
    height: int
    count: int
    dtype: str
    nodata: Optional[float]
    crs: str  # authority string such as "EPSG:32610" when known, else WKT
    transform: Tuple[float, float, float, float, float, float]  # affine a, b, c, d, e, f
    gsd_x: float  # metres
    gsd_y: float  # metres
    geographic: bool

    @property
    def gsd(self) -> float:
        """Mean of the x and y ground sample distances (metres)."""
        return 0.5 * (self.gsd_x + self.gsd_y)


def crs_to_string(crs) -> str:
    """Short, stable text for a rasterio CRS: ``EPSG:xxxx`` when it has an EPSG code, else WKT."""
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_wkt()


def ground_sample_distance(transform, crs, width: int, height: int) -> Tuple[float, float]:
    """(gsd_x, gsd_y) in metres of a raster with affine ``transform`` in ``crs`` (see module docstring)."""
    a, b, c, d, e, f = transform[:6]
    step_x = math.hypot(a, d)  # length of one column step in CRS units
    step_y = math.hypot(b, e)
    if crs.is_geographic:
        from pyproj import CRS as PyCRS

        geod = PyCRS.from_user_input(crs.to_wkt()).get_geod()
        col, row = width / 2.0, height / 2.0
        lon0, lat0 = c + a * col + b * row, f + d * col + e * row
        _, _, dist_x = geod.inv(lon0, lat0, lon0 + a, lat0 + d)
        _, _, dist_y = geod.inv(lon0, lat0, lon0 + b, lat0 + e)
        return float(dist_x), float(dist_y)
    _, factor = crs.linear_units_factor
    return step_x * factor, step_y * factor


def read_raster_info(path: PathLike, verify: bool = False) -> RasterInfo:
    """Open a raster's header and return its :class:`RasterInfo`.

    With ``verify`` the last row of pixels is read too (cheap), so that a truncated or corrupt file fails
    here, by name, rather than in a DataLoader worker hours later.

    Raises:
        MissingDataError: the file does not exist.
        DataError: not a readable raster (corrupt, truncated, not a GeoTIFF), no CRS, or no geotransform.
    """
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioError
    from rasterio.windows import Window

    path = str(path)
    if not os.path.exists(path):
        raise MissingDataError(f"{path}: raster file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            src = rasterio.open(path)
    except RasterioError as exc:
        raise DataError(f"{path}: not a readable raster (corrupt or not a GeoTIFF?): {exc}") from None
    with src:
        crs, transform = src.crs, src.transform
        width, height, count = src.width, src.height, src.count
        dtype, nodata = src.dtypes[0], src.nodata
        if verify:
            try:
                src.read(window=Window(0, height - 1, width, 1))
            except RasterioError as exc:
                raise DataError(f"{path}: raster data cannot be read (truncated or corrupt file?): {exc}") from None
    if transform.is_identity:
        raise DataError(f"{path}: no geotransform (pixel size unknown); expected a georeferenced GeoTIFF")
    if crs is None:
        raise DataError(f"{path}: no CRS; the ground sample distance cannot be read "
                        f"(assign one, e.g. gdal_edit.py -a_srs EPSG:xxxx)")
    try:
        gsd_x, gsd_y = ground_sample_distance(transform, crs, width, height)
    except Exception as exc:  # pyproj / CRS without linear units
        raise DataError(f"{path}: cannot compute the ground sample distance for CRS {crs}: {exc}") from None
    return RasterInfo(path=path, width=width, height=height, count=count, dtype=dtype,
                      nodata=None if nodata is None else float(nodata), crs=crs_to_string(crs),
                      transform=tuple(transform)[:6], gsd_x=gsd_x, gsd_y=gsd_y, geographic=bool(crs.is_geographic))


def find_rasters(source: Union[PathLike, Sequence[PathLike]], glob: Optional[str] = None) -> List[str]:
    """Sorted raster paths from a folder (recursive ``*.tif``/``*.tiff`` or ``glob``), a file, or a list.

    Raises:
        MissingDataError: the folder/file does not exist.
        DataError: no raster matches.
    """
    if isinstance(source, (list, tuple)):
        paths = [str(p) for p in source]
        for p in paths:
            if not os.path.exists(p):
                raise MissingDataError(f"{p}: raster file not found")
        if not paths:
            raise DataError("empty list of raster files")
        return sorted(paths)
    source = Path(source)
    if not source.exists():
        raise MissingDataError(f"{source}: folder not found (expected a folder of GeoTIFFs or a raster file)")
    if source.is_file():
        return [str(source)]
    if glob:
        paths = [p for p in source.glob(glob) if p.is_file()]
    else:
        paths = [p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in RASTER_SUFFIXES]
    if not paths:
        pattern = glob or "**/*.tif, **/*.tiff"
        raise DataError(f"{source}: no raster files matching {pattern}")
    return sorted(str(p) for p in paths)


def load_aoi(path: PathLike, crs: str):
    """Union of the polygons of a vector file (GeoJSON, GPKG, Shapefile, ...) reprojected to ``crs``.

    Raises:
        MissingDataError: the file does not exist.
        DataError: unreadable, empty, without CRS, or without polygon area.
    """
    import geopandas as gpd

    path = Path(path)
    if not path.exists():
        raise MissingDataError(f"{path}: area-of-interest file not found")
    try:
        gdf = gpd.read_file(path)
    except Exception as exc:
        raise DataError(f"{path}: cannot read area-of-interest file (expected GeoJSON/GPKG/...): {exc}") from None
    if gdf.empty:
        raise DataError(f"{path}: area-of-interest file has no features")
    if gdf.crs is None:
        raise DataError(f"{path}: area-of-interest file has no CRS; expected one (e.g. EPSG:4326)")
    geom = gdf.to_crs(crs).geometry.union_all()
    if geom.is_empty or geom.area <= 0:
        raise DataError(f"{path}: area-of-interest has no polygon area (expected Polygon/MultiPolygon features)")
    return geom


def _footprint(info: RasterInfo):
    from shapely.geometry import Polygon

    a, b, c, d, e, f = info.transform
    corners = [(0, 0), (info.width, 0), (info.width, info.height), (0, info.height)]
    return Polygon([(c + a * x + b * y, f + d * x + e * y) for x, y in corners])


def _to_crs(geom, src_crs: str, dst_crs: str):
    import geopandas as gpd
    import shapely

    if src_crs == dst_crs:
        return geom
    densified = shapely.segmentize(geom, max_segment_length=max(math.sqrt(geom.area), 1e-9) / 16)
    return gpd.GeoSeries([densified], crs=src_crs).to_crs(dst_crs).iloc[0]


def _pixel_region(geom_native, info: RasterInfo):
    """Geometry in the raster's CRS -> the same region in (col, row) pixel coordinates."""
    from affine import Affine
    from shapely import affinity

    inv = ~Affine(*info.transform)
    return affinity.affine_transform(geom_native, [inv.a, inv.b, inv.d, inv.e, inv.c, inv.f])


def check_band_count(info: RasterInfo, bands: Optional[Sequence[int]], expected: Optional[int]) -> None:
    """Raise DataError naming the file when its band count cannot serve ``bands`` / ``expected`` bands."""
    if bands:
        if max(bands) > info.count:
            raise DataError(f"{info.path}: has {info.count} band(s) but data.bands={list(bands)} needs at least "
                            f"{max(bands)}")
    elif expected is not None and info.count != expected:
        raise DataError(f"{info.path}: expected {expected} band(s) (as many as data.mean/std), got {info.count}; "
                        f"set data.bands to select bands")


def build_tile_index(source: Union[PathLike, Sequence[PathLike]], glob: Optional[str] = None,
                     crs: Optional[str] = None, aoi=None, bands: Optional[Sequence[int]] = None,
                     expected_bands: Optional[int] = None, verify: bool = True):
    """Build a GeoDataFrame of raster footprints, one row per file, in one CRS.

    Args:
        source: folder (searched recursively), single file, or list of files.
        glob: file pattern under a folder (default ``*.tif``/``*.tiff`` recursively).
        crs: CRS of the index; default: the first file's CRS.
        aoi: optional area of interest, a vector file path (read with geopandas) or a shapely geometry in
            the index CRS; tiles outside it are dropped.
        bands: 1-based bands that will be read (checked against each file's band count).
        expected_bands: when ``bands`` is not given, the band count every file must have.
        verify: read each file's last row so that truncated files fail here, with their name.

    Returns:
        GeoDataFrame with columns ``path, width, height, count, dtype, nodata, crs (native), transform,
        gsd, gsd_x, gsd_y, geographic, region_px`` (drawable region in pixel coordinates: the whole tile, or
        its part inside the AOI), ``area_m2`` (area of that region on the ground) and the footprint
        ``geometry`` in the index CRS.
    """
    import geopandas as gpd
    from shapely.geometry import box

    paths = find_rasters(source, glob)
    infos = []
    for p in paths:
        info = read_raster_info(p, verify=verify)
        check_band_count(info, bands, expected_bands)
        infos.append(info)
    if expected_bands is None and not bands:
        counts = {i.count for i in infos}
        if len(counts) > 1:
            first = infos[0]
            other = next(i for i in infos if i.count != first.count)
            raise DataError(f"{other.path}: has {other.count} band(s) but {first.path} has {first.count}; "
                            f"all rasters must have the same bands (or set data.bands)")
    index_crs = crs or infos[0].crs

    aoi_geom = None
    if aoi is not None:
        aoi_geom = load_aoi(aoi, index_crs) if isinstance(aoi, (str, os.PathLike)) else aoi

    rows = []
    for info in infos:
        native = _footprint(info)
        footprint = _to_crs(native, info.crs, index_crs)
        region_px = box(0, 0, info.width, info.height)
        if aoi_geom is not None:
            inside = footprint.intersection(aoi_geom)
            if inside.is_empty or inside.area <= 0:
                continue
            if not inside.buffer(1e-9 * math.sqrt(footprint.area)).contains(footprint):
                region_px = _pixel_region(_to_crs(inside, index_crs, info.crs), info).intersection(region_px)
                if region_px.is_empty or region_px.area <= 0:
                    continue
        rows.append({
            "path": info.path, "width": info.width, "height": info.height, "count": info.count,
            "dtype": info.dtype, "nodata": info.nodata, "crs": info.crs, "transform": info.transform,
            "gsd": info.gsd, "gsd_x": info.gsd_x, "gsd_y": info.gsd_y, "geographic": info.geographic,
            "region_px": region_px, "area_m2": float(region_px.area * info.gsd_x * info.gsd_y),
            "geometry": footprint,
        })
    if not rows:
        where = source if not isinstance(source, (list, tuple)) else f"{len(paths)} files"
        raise DataError(f"{aoi if isinstance(aoi, (str, os.PathLike)) else 'area of interest'}: no raster of "
                        f"{where} intersects the area of interest")
    return gpd.GeoDataFrame(rows, geometry="geometry", crs=index_crs)
