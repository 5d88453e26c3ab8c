"""Raster metadata, ground sample distance, scenes of band files, read grids, the tile index and its cache.

Ground sample distance (GSD), in metres on the ground, for any CRS:

* measured geodesically: the two ends of one pixel step along the pixel x axis (and along y) around a point
  are converted to longitude/latitude on the CRS's own datum (pyproj) and their geodesic distance on its
  ellipsoid is taken (pyproj ``Geod``). This is the ground distance for geographic CRSs (degrees), for UTM
  and other projected CRSs (it includes the point scale factor: 0.9996 at a UTM central meridian, so
  10 m Sentinel-2 pixels are 10.004 m on the ground there) and for Web Mercator (EPSG:3857), whose unit is a
  metre only at the equator (a 1 m Web Mercator pixel is cos(latitude) metres on the ground);
* per tile at the centre of its read grid (``gsd``, ``gsd_x``, ``gsd_y`` of the index), and per window at the
  window centre (:func:`ground_gsd_at`, used by the datasets);
* anisotropic pixels (lon/lat rasters away from the equator, rectangular cells): ``gsd_x`` and ``gsd_y``
  are kept apart; the single ``gsd`` is their mean;
* no CRS or no geotransform: :class:`~dataloaders.errors.DataError` (the GSD cannot be known).

``target_gsd`` (the cell of a resampled read grid) is in *grid* metres for projected CRSs (the CRS's linear
unit converted to metres: UTM/national grids keep their 10 m grid exactly) and in ground metres at the tile
centre for geographic CRSs and Mercator projections (Web Mercator, EPSG:3395), whose grid unit is not a
ground distance; see :func:`grid_cell`.

Tiles. A tile is one multi-band raster file or one *scene*: a folder whose band files are named by
``band_files`` patterns (``*_B02.tif``, ...), possibly at different resolutions. Every tile has a *read
grid* (``crs``, ``transform``, ``width``, ``height`` in the index): the file's own grid; for a scene the
grid of its finest band file; with ``crs``/``target_gsd`` a north-up grid in that CRS at that cell,
aligned to multiples of the cell (like ``gdalwarp -tap``) so that neighbouring tiles share one grid (where
their cell is the same: not for lon/lat and Mercator CRSs, whose cell is set at each tile's centre).
Windows are pixel windows of a tile's read grid; files not on it are warped (``geo_read``).

Header cache. Reading the headers of 100k files takes minutes on network storage; :func:`read_raster_infos`
keeps them (CRS, transform, size, band count, dtype, nodata, GSD) in a JSON file keyed by absolute path +
size + mtime, under an exclusive file lock: the first process (e.g. rank 0) reads the headers and writes the
cache, the other ranks wait for the lock and then read the cache without opening a raster.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

from .errors import DataError, MissingDataError

PathLike = Union[str, os.PathLike]
RASTER_SUFFIXES = (".tif", ".tiff")
CACHE_VERSION = 2
CACHE_FILENAME = ".scalemae_tile_index.json"


@dataclass(frozen=True)
class RasterInfo:
    """What the data layer needs to know about one raster file (its header)."""

    path: str
    width: int
    height: int
    count: int
    dtype: str
    nodata: Optional[float]  # band 1's nodata (see nodatavals)
    crs: str  # authority string such as "EPSG:32610" when known, else WKT
    transform: Tuple[float, float, float, float, float, float]  # affine a, b, c, d, e, f
    gsd_x: float  # metres on the ground at the raster centre
    gsd_y: float
    geographic: bool
    nodatavals: Tuple[Optional[float], ...] = ()  # per band
    overviews: int = 0  # overview levels of band 1

    @property
    def gsd(self) -> float:
        """Mean of the x and y ground sample distances (metres)."""
        return 0.5 * (self.gsd_x + self.gsd_y)

    def band_nodata(self, band: int) -> Optional[float]:
        """Nodata of 1-based ``band`` (None when unset)."""
        if self.nodatavals and band <= len(self.nodatavals):
            return self.nodatavals[band - 1]
        return self.nodata


def crs_to_string(crs) -> str:
    """Short, stable text for a rasterio/pyproj CRS: ``EPSG:xxxx`` when it has an EPSG code, else WKT."""
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_wkt()


def _crs_text(crs) -> str:
    return crs if isinstance(crs, str) else crs_to_string(crs)


@functools.lru_cache(maxsize=128)
def _geodesy(crs_text: str):
    """(Transformer CRS -> its geodetic lon/lat, Geod of its ellipsoid) for a CRS string (cached)."""
    from pyproj import CRS, Transformer

    crs = CRS.from_user_input(crs_text)
    geodetic = crs.geodetic_crs
    if geodetic is None:
        raise ValueError("the CRS has no geodetic datum")
    return Transformer.from_crs(crs, geodetic, always_xy=True), geodetic.get_geod()


@functools.lru_cache(maxsize=128)
def _crs_kind(crs_text: str) -> Tuple[bool, bool, float]:
    """(geographic, ground-scaled grid, metres per linear unit) of a CRS (see :func:`grid_cell`)."""
    from pyproj import CRS

    crs = CRS.from_user_input(crs_text)
    if crs.is_geographic:
        return True, True, float("nan")
    op = crs.coordinate_operation
    method = (op.method_name if op is not None else "").lower()
    mercator = "mercator" in method and "transverse" not in method and "oblique" not in method
    factor = crs.axis_info[0].unit_conversion_factor if crs.axis_info else 1.0
    return False, mercator, float(factor)


def ground_gsd_at(crs, transform, col: float, row: float) -> Tuple[float, float]:
    """Ground size in metres ``(gsd_x, gsd_y)`` of the pixel of grid ``transform`` in ``crs`` at (col, row).

    One pixel step along the pixel x axis (y axis) centred on the point is measured as a geodesic on the
    CRS's ellipsoid (see the module docstring). Works for any CRS with a datum and any affine transform.

    Raises:
        ValueError: the CRS has no datum, or the point is outside the projection's domain.
    """
    a, b, c, d, e, f = tuple(transform)[:6]
    cols = (col - 0.5, col + 0.5, col, col)
    rows = (row, row, row - 0.5, row + 0.5)
    xs = [c + a * cc + b * rr for cc, rr in zip(cols, rows)]
    ys = [f + d * cc + e * rr for cc, rr in zip(cols, rows)]
    to_lonlat, geod = _geodesy(_crs_text(crs))
    lon, lat = to_lonlat.transform(xs, ys)
    _, _, dist = geod.inv(lon[0::2], lat[0::2], lon[1::2], lat[1::2])
    gx, gy = float(dist[0]), float(dist[1])
    if not (math.isfinite(gx) and math.isfinite(gy)) or gx <= 0 or gy <= 0:
        raise ValueError(f"no ground distance at ({xs[0]:.6g}, {ys[0]:.6g}): outside the projection's domain?")
    return gx, gy


def ground_sample_distance(transform, crs, width: int, height: int) -> Tuple[float, float]:
    """(gsd_x, gsd_y) in metres of a raster at its centre (see :func:`ground_gsd_at`)."""
    return ground_gsd_at(crs, transform, width / 2.0, height / 2.0)


def grid_cell(crs, target_gsd: float, x: float, y: float) -> Tuple[float, float]:
    """Cell size ``(cx, cy)`` in CRS units of a north-up grid with pixels of ``target_gsd`` metres at (x, y).

    Projected CRSs other than Mercator: ``target_gsd`` grid metres (divided by the unit's metres, e.g. feet).
    Geographic CRSs and Mercator projections: ground metres at (x, y), separately along x and y (square
    ground pixels from rectangular degree cells).
    """
    text = _crs_text(crs)
    geographic, ground_scaled, factor = _crs_kind(text)
    if not ground_scaled:
        return target_gsd / factor, target_gsd / factor
    step = target_gsd / 111320.0 if geographic else float(target_gsd)
    cell = [step, step]
    for _ in range(2):  # ground distance is near-linear in the step at pixel scales: one refinement suffices
        gx, gy = ground_gsd_at(text, (cell[0], 0.0, x - cell[0] / 2, 0.0, -cell[1], y + cell[1] / 2), 0.5, 0.5)
        cell = [cell[0] * target_gsd / gx, cell[1] * target_gsd / gy]
    return cell[0], cell[1]


def _read_header(path: str, verify: bool) -> RasterInfo:
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioError
    from rasterio.windows import Window

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
        dtype, nodatavals = src.dtypes[0], tuple(None if v is None else float(v) for v in src.nodatavals)
        overviews = len(src.overviews(1)) if count else 0
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
    crs_text = crs_to_string(crs)
    try:
        gsd_x, gsd_y = ground_sample_distance(transform, crs_text, width, height)
    except Exception as exc:  # pyproj: CRS without datum, point outside the projection
        raise DataError(f"{path}: cannot compute the ground sample distance for CRS {crs_text}: {exc}") from None
    return RasterInfo(path=path, width=width, height=height, count=count, dtype=dtype,
                      nodata=nodatavals[0] if nodatavals else None, crs=crs_text, transform=tuple(transform)[:6],
                      gsd_x=gsd_x, gsd_y=gsd_y, geographic=bool(crs.is_geographic), nodatavals=nodatavals,
                      overviews=overviews)


def read_raster_info(path: PathLike, verify: bool = False) -> RasterInfo:
    """Open a raster's header and return its :class:`RasterInfo`.

    With ``verify`` the last row of pixels is read too (cheap), so that a truncated or corrupt file fails
    here, by name, rather than in a DataLoader worker hours later.

    Raises:
        MissingDataError: the file does not exist.
        DataError: not a readable raster (corrupt, truncated, not a GeoTIFF), no CRS, or no geotransform.
    """
    return _read_header(str(path), verify)


# ----------------------------------------------------------------------------------------------------------
# header cache
def default_cache_path(source: Union[PathLike, Sequence[PathLike]]) -> Path:
    """Where the header cache of ``source`` lives when ``index_cache`` is not set.

    A writable folder source: ``<folder>/.scalemae_tile_index.json`` (next to the data, like GDAL's
    ``.aux.xml``); otherwise ``$SCALEMAE_CACHE_DIR`` (default ``$XDG_CACHE_HOME/scalemae`` or
    ``~/.cache/scalemae``) / ``tile_index-<hash of the source>.json``.
    """
    if not isinstance(source, (list, tuple)) and Path(source).is_dir() and os.access(source, os.W_OK):
        return Path(source) / CACHE_FILENAME
    root = os.environ.get("SCALEMAE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "scalemae")
    items = [str(Path(p).resolve()) for p in (source if isinstance(source, (list, tuple)) else [source])]
    digest = hashlib.sha1("\n".join(items).encode()).hexdigest()[:16]
    return Path(root) / f"tile_index-{digest}.json"


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``lock_path`` (yields False when it cannot be created)."""
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(lock_path, "a+")
    except OSError:
        yield False
        return
    try:
        try:
            import fcntl

            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        except (ImportError, OSError):  # no flock (Windows, some network file systems): still correct, not shared
            pass
        yield True
    finally:
        fh.close()


def _load_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("files"), dict):
        return {}
    return data["files"]


def _save_cache(path: Path, files: dict) -> None:
    from util.io import OutputWriteError, atomic_write_text

    try:
        atomic_write_text(path, json.dumps({"version": CACHE_VERSION, "files": files}))
    except (OSError, OutputWriteError):  # read-only location: the cache is an optimisation only
        pass


def _info_from_json(path: str, d: dict) -> RasterInfo:
    d = dict(d, path=path, transform=tuple(d["transform"]), nodatavals=tuple(d.get("nodatavals", ())))
    return RasterInfo(**d)


def read_raster_infos(paths: Sequence[PathLike], verify: bool = True,
                      cache: Optional[PathLike] = None) -> List[RasterInfo]:
    """:func:`read_raster_info` of many files, through the header cache ``cache`` (a JSON file) when given.

    An entry is reused when the file's absolute path, size and mtime match (and, with ``verify``, when it
    was verified); other files are opened and their entries written back. The whole call holds an exclusive
    lock on ``<cache>.lock``, so concurrent ranks open every raster once in total.
    """
    paths = [str(p) for p in paths]
    if cache is None:
        return [_read_header(p, verify) for p in paths]
    cache = Path(cache)
    with _exclusive(cache.with_name(cache.name + ".lock")) as locked:
        files = _load_cache(cache) if locked else {}
        out, changed = [], False
        try:
            for p in paths:
                try:
                    st = os.stat(p)
                except FileNotFoundError:
                    raise MissingDataError(f"{p}: raster file not found") from None
                key = os.path.abspath(p)
                entry = files.get(key)
                if (entry and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns
                        and (entry.get("verified") or not verify)):
                    out.append(_info_from_json(p, entry["info"]))
                    continue
                info = _read_header(p, verify)
                files[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "verified": bool(verify),
                              "info": {k: v for k, v in asdict(info).items() if k != "path"}}
                changed = True
                out.append(info)
        finally:
            if changed and locked:
                _save_cache(cache, files)
    return out


# ----------------------------------------------------------------------------------------------------------
# files, scenes, AOI
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
        paths = [p for p in source.glob(glob) if p.is_file() and not p.name.startswith(CACHE_FILENAME)]
    else:
        paths = [p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in RASTER_SUFFIXES]
    if not paths:
        pattern = glob or "**/*.tif, **/*.tiff"
        raise DataError(f"{source}: no raster files matching {pattern}")
    return sorted(str(p) for p in paths)


def _glob_key_regex(pattern: str):
    """Regex of a file-name glob whose wildcards (``*``, ``?``, ``[...]``) are capture groups."""
    import re

    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*":
            out.append("(.*)")
        elif ch == "?":
            out.append("(.)")
        elif ch == "[" and "]" in pattern[i + 1:]:
            j = pattern.index("]", i + 1)
            body = pattern[i + 1:j]
            out.append("([" + ("^" + body[1:] if body.startswith("!") else body) + "])")
            i = j
        else:
            out.append(re.escape(ch))
        i += 1
    return re.compile("".join(out))


def find_scenes(source: PathLike, band_files: Sequence[str], scene_glob: Optional[str] = None
                ) -> List[Tuple[str, List[str]]]:
    """``[(scene name, [one file per band_files pattern])]`` of the band-file scenes under ``source``.

    Each pattern is a glob relative to a scene folder (``**`` allowed), e.g. ``"**/*_B02_10m.jp2"``. The
    files of one scene are those whose file names agree on what the patterns' wildcards match: with
    ``*_B02.tif`` and ``*_B8A.tif``, ``T33UUP_20240101_B02.tif`` and ``T33UUP_20240101_B8A.tif`` form scene
    ``T33UUP_20240101`` -- so one folder may hold many scenes (a flat download) and a scene's bands may sit
    in different sub-folders (Sentinel-2 SAFE ``R10m/``, ``R20m/``). Scene folders are ``source`` itself
    (``scene_glob`` unset or ``.``) or the folders matching ``scene_glob`` under it, searched separately.
    The scene name is ``<folder>/<wildcard text>``.

    Raises:
        MissingDataError: ``source`` does not exist.
        DataError: no scene, a scene without a file for some pattern, or two files of one scene for one
            pattern (names the scene and the pattern).
    """
    source = Path(source)
    if not source.is_dir():
        raise MissingDataError(f"{source}: scene folder root not found (band_files needs a folder of scenes)")
    pattern = scene_glob or "."
    folders = [source] if pattern in (".", "./") else sorted(p for p in source.glob(pattern) if p.is_dir())
    if not folders:
        raise DataError(f"{source}: no scene folders matching scene_glob {pattern!r}")
    keys = [_glob_key_regex(os.path.basename(b)) for b in band_files]
    scenes = []
    for folder in folders:
        found: dict = {}
        for k, band in enumerate(band_files):
            for path in sorted(p for p in folder.glob(band) if p.is_file()):
                m = keys[k].fullmatch(path.name)
                if m is None:
                    continue
                slot = found.setdefault(m.groups(), [None] * len(band_files))
                if slot[k] is not None:
                    raise DataError(f"{folder}: files {slot[k]} and {path} both match band pattern {band!r} for "
                                    f"scene {'_'.join(m.groups()) or folder.name!r}; make the pattern specific "
                                    f"(or set scene_glob to one folder per scene)")
                slot[k] = str(path)
        if not found:
            raise DataError(f"{folder}: no file matches band pattern {band_files[0]!r}")
        for key in sorted(found):
            files = found[key]
            name = f"{folder}/{'_'.join(key)}" if key else str(folder)
            missing = [b for b, f in zip(band_files, files) if f is None]
            if missing:
                raise DataError(f"{name}: no band file matching {missing[0]!r} in this scene "
                                f"(has {os.path.basename(next(f for f in files if f))})")
            scenes.append((name, files))
    return scenes


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


def grid_footprint(transform, width: int, height: int):
    """Polygon of a grid's extent in its CRS (any affine transform)."""
    from shapely.geometry import Polygon

    a, b, c, d, e, f = tuple(transform)[:6]
    corners = [(0, 0), (width, 0), (width, height), (0, height)]
    return Polygon([(c + a * x + b * y, f + d * x + e * y) for x, y in corners])


def to_crs(geom, src_crs: str, dst_crs: str):
    """``geom`` reprojected from ``src_crs`` to ``dst_crs`` (edges densified first, so they may curve)."""
    import geopandas as gpd
    import shapely

    if src_crs == dst_crs:
        return geom
    densified = shapely.segmentize(geom, max_segment_length=max(math.sqrt(geom.area), 1e-9) / 16)
    return gpd.GeoSeries([densified], crs=src_crs).to_crs(dst_crs).iloc[0]


def _pixel_region(geom_native, transform):
    """Geometry in a grid's CRS -> the same region in (col, row) pixel coordinates."""
    from affine import Affine
    from shapely import affinity

    inv = ~Affine(*tuple(transform)[:6])
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


# ----------------------------------------------------------------------------------------------------------
# read grids and the tile index
def _aligned_grid(crs: str, cell: Tuple[float, float], bounds) -> Tuple[Tuple[float, ...], int, int]:
    """North-up grid covering ``bounds`` with cells aligned to multiples of ``cell`` (gdalwarp ``-tap``)."""
    cx, cy = cell
    minx, miny, maxx, maxy = bounds
    eps = 1e-9
    left = math.floor(minx / cx + eps) * cx
    top = math.ceil(maxy / cy - eps) * cy
    width = max(1, math.ceil((maxx - left) / cx - eps))
    height = max(1, math.ceil((top - miny) / cy - eps))
    return (cx, 0.0, left, 0.0, -cy, top), width, height


def read_grid(ref: RasterInfo, crs: Optional[str] = None, target_gsd: Optional[float] = None):
    """``(crs, transform, width, height)`` of the read grid of a tile whose finest file is ``ref``.

    Without ``crs``/``target_gsd``: ``ref``'s own grid. Otherwise a north-up, cell-aligned grid in ``crs``
    (default: ``ref``'s) covering ``ref``'s footprint, with cells of ``target_gsd`` metres (default: ``ref``'s
    ground GSD) as :func:`grid_cell` defines them.
    """
    from rasterio.warp import transform_bounds

    dst_crs = crs or ref.crs
    if dst_crs == ref.crs and target_gsd is None:
        return ref.crs, tuple(ref.transform), ref.width, ref.height
    minx, miny, maxx, maxy = grid_footprint(ref.transform, ref.width, ref.height).bounds
    bounds = transform_bounds(ref.crs, dst_crs, minx, miny, maxx, maxy, densify_pts=21)
    if not all(math.isfinite(v) for v in bounds):
        raise DataError(f"{ref.path}: its footprint cannot be expressed in CRS {dst_crs}")
    centre = ((bounds[0] + bounds[2]) / 2, (bounds[1] + bounds[3]) / 2)
    gsd = float(target_gsd) if target_gsd else ref.gsd
    cell = grid_cell(dst_crs, gsd, *centre)
    transform, width, height = _aligned_grid(dst_crs, cell, bounds)
    return dst_crs, transform, width, height


def build_tile_index(source: Union[PathLike, Sequence[PathLike]], glob: Optional[str] = None,
                     crs: Optional[str] = None, aoi=None, bands: Optional[Sequence[int]] = None,
                     expected_bands: Optional[int] = None, verify: bool = True, *,
                     band_files: Optional[Sequence[str]] = None, scene_glob: Optional[str] = None,
                     target_gsd: Optional[float] = None, nodata=None, index_cache=None):
    """Build a GeoDataFrame of tiles (files or band-file scenes) with their read grids, in one CRS.

    Args:
        source: folder (searched recursively), single file, or list of files; with ``band_files`` the
            folder of scene folders.
        glob: file pattern under a folder (default ``*.tif``/``*.tiff`` recursively).
        crs: CRS of the index *and* of every read grid (mixed-CRS collections are then read warped);
            default: the index is in the first tile's CRS and each tile is read in its own.
        aoi: optional area of interest, a vector file path (read with geopandas) or a shapely geometry in
            the index CRS; tiles outside it are dropped.
        bands: 1-based bands that will be read (checked against each file's band count).
        expected_bands: band count every tile must provide when ``bands`` is not given.
        verify: read each file's last row so that truncated files fail here, with their name.
        band_files: per-band file patterns of a scene (see :func:`find_scenes`); every matched file
            contributes all its bands, in pattern order.
        scene_glob: scene folders under ``source`` (default: ``source`` itself).
        target_gsd: cell of the read grids in metres (see :func:`grid_cell`).
        nodata: nodata overriding the files' own: a number, or one per read band.
        index_cache: header cache file; None: :func:`default_cache_path`; False: no cache.

    Returns:
        GeoDataFrame with one row per tile: ``path`` (file, or scene name), ``files`` (tuple of file
        paths), ``file_bands`` (tuple of band-index tuples, one per file), ``infos`` (tuple of
        :class:`RasterInfo`), ``count`` (bands read), ``dtype``, ``nodata`` (tuple, one per band read),
        ``crs``/``transform``/``width``/``height`` (the read grid), ``native_crs``, ``warped`` (some file is
        not on the read grid), ``gsd``/``gsd_x``/``gsd_y`` (ground metres at the grid centre),
        ``geographic``, ``region_px`` (drawable region in read-grid pixels: the whole grid, or its part in
        the AOI), ``area_m2`` (its ground area) and the footprint ``geometry`` in the index CRS.
    """
    import geopandas as gpd
    from shapely.geometry import box

    if band_files:
        scenes = find_scenes(source, band_files, scene_glob)
        all_paths = [f for _, files in scenes for f in files]
    else:
        scenes = [(p, [p]) for p in find_rasters(source, glob)]
        all_paths = [p for p, _ in scenes]
    cache = None
    if index_cache is not False:
        cache = Path(index_cache) if index_cache else default_cache_path(source)
    by_path = dict(zip(all_paths, read_raster_infos(all_paths, verify=verify, cache=cache)))

    tiles = []
    for name, files in scenes:
        infos = [by_path[f] for f in files]
        if band_files:
            file_bands = [tuple(range(1, i.count + 1)) for i in infos]
        else:
            check_band_count(infos[0], bands, expected_bands)
            file_bands = [tuple(bands) if bands else tuple(range(1, infos[0].count + 1))]
        count = sum(len(b) for b in file_bands)
        if band_files and expected_bands is not None and count != expected_bands:
            raise DataError(f"{name}: its band files give {count} band(s) but {expected_bands} are expected "
                            f"(as many as data.mean/std)")
        tiles.append((name, infos, file_bands, count))
    if expected_bands is None and not bands:
        counts = {t[3] for t in tiles}
        if len(counts) > 1:
            first = tiles[0]
            other = next(t for t in tiles if t[3] != first[3])
            raise DataError(f"{other[0]}: has {other[3]} band(s) but {first[0]} has {first[3]}; "
                            f"all rasters must have the same bands (or set data.bands)")

    index_crs = crs
    rows = []
    for name, infos, file_bands, count in tiles:
        ref = min(infos, key=lambda i: i.gsd)  # finest file (the first on ties) defines the native grid
        grid_crs, transform, width, height = read_grid(ref, crs, target_gsd)
        index_crs = index_crs or grid_crs
        nd = _band_nodata(name, infos, file_bands, nodata, count)
        warped = any(i.crs != grid_crs or tuple(i.transform) != tuple(transform) for i in infos)
        try:
            gsd_x, gsd_y = ground_sample_distance(transform, grid_crs, width, height)
        except ValueError as exc:
            raise DataError(f"{name}: cannot compute the ground sample distance in CRS {grid_crs}: {exc}") from None
        rows.append({
            "path": name, "files": tuple(i.path for i in infos), "file_bands": tuple(file_bands),
            "infos": tuple(infos), "width": width, "height": height, "count": count, "dtype": infos[0].dtype,
            "nodata": nd, "crs": grid_crs, "native_crs": ref.crs, "transform": tuple(transform),
            "warped": warped, "gsd": 0.5 * (gsd_x + gsd_y), "gsd_x": gsd_x, "gsd_y": gsd_y,
            "geographic": _crs_kind(grid_crs)[0], "native": grid_footprint(transform, width, height),
        })

    aoi_geom = None
    if aoi is not None:
        aoi_geom = load_aoi(aoi, index_crs) if isinstance(aoi, (str, os.PathLike)) else aoi
    kept = []
    for row in rows:
        native = row.pop("native")
        footprint = to_crs(native, row["crs"], index_crs)
        region_px = box(0, 0, row["width"], row["height"])
        if aoi_geom is not None:
            inside = footprint.intersection(aoi_geom)
            if inside.is_empty or inside.area <= 0:
                continue
            if not inside.buffer(1e-9 * math.sqrt(footprint.area)).contains(footprint):
                region_px = _pixel_region(to_crs(inside, index_crs, row["crs"]), row["transform"]).intersection(
                    region_px)
                if region_px.is_empty or region_px.area <= 0:
                    continue
        row.update(region_px=region_px, area_m2=float(region_px.area * row["gsd_x"] * row["gsd_y"]),
                   geometry=footprint)
        kept.append(row)
    if not kept:
        where = source if not isinstance(source, (list, tuple)) else f"{len(all_paths)} files"
        raise DataError(f"{aoi if isinstance(aoi, (str, os.PathLike)) else 'area of interest'}: no raster of "
                        f"{where} intersects the area of interest")
    return gpd.GeoDataFrame(kept, geometry="geometry", crs=index_crs)


def _band_nodata(name: str, infos, file_bands, nodata, count: int) -> Tuple[Optional[float], ...]:
    """Nodata of every band read: the override (one value, or one per band where null keeps the file's
    own) or each file band's own."""
    own = tuple(info.band_nodata(b) for info, bands in zip(infos, file_bands) for b in bands)
    if nodata is None:
        return own
    if isinstance(nodata, (list, tuple)):
        if len(nodata) != count:
            raise DataError(f"{name}: data.nodata has {len(nodata)} values but {count} band(s) are read")
        return tuple(o if v is None else float(v) for v, o in zip(nodata, own))
    return (float(nodata),) * count
