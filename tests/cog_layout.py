"""An independent check of the Cloud-Optimized GeoTIFF layout: the file's bytes are parsed here (classic TIFF and
BigTIFF, either byte order), without GDAL or rasterio, and held to the rules of the COG specification that GDAL's
``validate_cloud_optimized_geotiff.py`` checks:

* every image is tiled (TileWidth/TileLength/TileOffsets, no StripOffsets);
* the first IFD is the full-resolution image and the following ones are its overviews (NewSubfileType 1), each
  smaller than the one before;
* every IFD comes before any image data (a reader gets the whole structure from the first bytes);
* image data are stored from the smallest overview to the full resolution: all tiles of an overview before any
  tile of the next larger image;
* within each image, tiles are in row-major order at increasing offsets;
* (this project's rule, beyond the specification) the overviews have the full image's tile size, so a reader's
  request of one tile covers the same ground ratio at every level;
* GDAL's structural-metadata "ghost" block after the header says ``LAYOUT=IFDS_BEFORE_DATA`` and
  ``BLOCK_ORDER=ROW_MAJOR``.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Ifd", "read_ifds", "cog_problems"]

_TYPE_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 6: 1, 7: 1, 8: 2, 9: 4, 11: 4, 12: 8, 16: 8, 17: 8, 18: 8}
_TYPE_CODE = {1: "B", 3: "H", 4: "I", 6: "b", 8: "h", 9: "i", 16: "Q", 17: "q", 18: "Q"}
WIDTH, HEIGHT, SUBFILE, STRIP_OFFSETS, TILE_W, TILE_H, TILE_OFFSETS, TILE_COUNTS = 256, 257, 254, 273, 322, 323, 324, 325


@dataclass
class Ifd:
    """One image file directory: where it starts and its integer tags (tag -> list of values)."""
    offset: int
    tags: dict[int, list[int]]

    def get(self, tag: int, default: int = 0) -> int:
        return self.tags.get(tag, [default])[0]


def read_ifds(path: str | Path) -> tuple[list[Ifd], bytes]:
    """Every IFD of the TIFF at ``path`` in file order, and the file's bytes."""
    data = Path(path).read_bytes()
    order = {b"II": "<", b"MM": ">"}.get(data[:2])
    if order is None:
        raise ValueError(f"{path}: not a TIFF (byte-order mark {data[:2]!r})")
    magic = struct.unpack(order + "H", data[2:4])[0]
    if magic == 42:
        big, (first,) = False, struct.unpack(order + "I", data[4:8])
    elif magic == 43:
        big, (first,) = True, struct.unpack(order + "Q", data[8:16])
    else:
        raise ValueError(f"{path}: TIFF version {magic}")
    count_fmt, entry_size, next_fmt, inline = ("Q", 20, "Q", 8) if big else ("H", 12, "I", 4)
    ifds, offset, seen = [], first, set()
    while offset:
        if offset in seen or offset >= len(data):
            raise ValueError(f"{path}: IFD chain loops or leaves the file at {offset}")
        seen.add(offset)
        n = struct.unpack_from(order + count_fmt, data, offset)[0]
        start = offset + struct.calcsize(count_fmt)
        tags = {}
        for k in range(n):
            pos = start + k * entry_size
            tag, typ = struct.unpack_from(order + "HH", data, pos)
            count = struct.unpack_from(order + ("Q" if big else "I"), data, pos + 4)[0]
            if typ not in _TYPE_CODE:
                continue  # ASCII, rationals, floats: not needed here
            size = _TYPE_SIZE[typ] * count
            value_pos = pos + (12 if big else 8)
            if size > inline:
                value_pos = struct.unpack_from(order + ("Q" if big else "I"), data, value_pos)[0]
            tags[tag] = list(struct.unpack_from(f"{order}{count}{_TYPE_CODE[typ]}", data, value_pos))
        ifds.append(Ifd(offset, tags))
        offset = struct.unpack_from(order + next_fmt, data, start + n * entry_size)[0]
    return ifds, data


def cog_problems(path: str | Path) -> list[str]:
    """What keeps the file at ``path`` from being a Cloud-Optimized GeoTIFF (see the module docstring); [] when
    none."""
    ifds, data = read_ifds(path)
    problems = []
    for i, ifd in enumerate(ifds):
        if STRIP_OFFSETS in ifd.tags or TILE_OFFSETS not in ifd.tags:
            problems.append(f"IFD {i} is not tiled")
    if problems:
        return problems
    if ifds[0].get(SUBFILE) & 1:
        problems.append("the first IFD is an overview, not the full-resolution image")
    for i, (big, small) in enumerate(zip(ifds, ifds[1:]), 1):
        if not small.get(SUBFILE) & 1:
            problems.append(f"IFD {i} is not an overview (NewSubfileType {small.get(SUBFILE)})")
        if not (small.get(WIDTH) < big.get(WIDTH) and small.get(HEIGHT) < big.get(HEIGHT)):
            problems.append(f"IFD {i} is not smaller than IFD {i - 1}")
        if (small.get(TILE_W), small.get(TILE_H)) != (ifds[0].get(TILE_W), ifds[0].get(TILE_H)):
            problems.append(f"IFD {i}: tiles of {small.get(TILE_W)} x {small.get(TILE_H)} px, the full image's are "
                            f"{ifds[0].get(TILE_W)} x {ifds[0].get(TILE_H)}")
    offsets = [[o for o in ifd.tags[TILE_OFFSETS] if o] for ifd in ifds]  # 0: a sparse (empty) tile
    first_data = min((o for per in offsets for o in per), default=len(data))
    if max(ifd.offset for ifd in ifds) > first_data:
        problems.append("an IFD comes after image data")
    for i, per in enumerate(offsets):
        ifd = ifds[i]
        across = -(-ifd.get(WIDTH) // ifd.get(TILE_W))
        down = -(-ifd.get(HEIGHT) // ifd.get(TILE_H))
        if len(ifd.tags[TILE_OFFSETS]) != across * down * (1 if ifd.get(284, 1) == 1 else ifd.get(277, 1)):
            problems.append(f"IFD {i}: {len(ifd.tags[TILE_OFFSETS])} tile offsets for {across} x {down} tiles")
        if per != sorted(per) or len(set(per)) != len(per):
            problems.append(f"IFD {i}: tiles are not at increasing offsets in row-major order")
    for i in range(len(ifds) - 1):  # the smaller image's data first
        if offsets[i] and offsets[i + 1] and min(offsets[i]) < max(offsets[i + 1]):
            problems.append(f"data of IFD {i} come before data of its overview IFD {i + 1}")
    header_end = 16 if data[2:4] in (b"+\x00", b"\x00+") else 8
    ghost = data[header_end:ifds[0].offset]
    if b"LAYOUT=IFDS_BEFORE_DATA" not in ghost or b"BLOCK_ORDER=ROW_MAJOR" not in ghost:
        problems.append("no COG structural metadata (LAYOUT=IFDS_BEFORE_DATA, BLOCK_ORDER=ROW_MAJOR) after the "
                        "header")
    return problems
