"""Top-k most similar windows of an embedding file (``main_embed.py``), across all its GSDs, by cosine similarity.

    python tools/search_embeddings.py ortho_embeddings.parquet --point -122.41 37.77 --point_crs EPSG:4326 --k 5
    python tools/search_embeddings.py ortho_embeddings.parquet --window 17 --output hits.geojson

Prints one line per hit (rank, score, gsd, window, footprint in EPSG:4326); ``--output`` writes the hits with their
footprints (GeoJSON / GeoPackage, by extension).
"""
from __future__ import annotations

import argparse
import os
import sys

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:  # run as a script without `pip install -e .`
    sys.path.insert(0, _REPO_ROOT)

import harness  # noqa: E402


OUTPUT_DRIVERS = {".geojson": "GeoJSON", ".json": "GeoJSON", ".gpkg": "GPKG"}  # --output suffix -> OGR driver


def get_args_parser() -> argparse.ArgumentParser:
    p = harness.ArgumentParser("Similarity search over main_embed.py embeddings", add_help=True)
    p.add_argument("embeddings", help="GeoParquet file written by main_embed.py")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--window", type=int, default=None, help="query: this row of the file (0-based)")
    q.add_argument("--point", type=float, nargs=2, metavar=("X", "Y"), default=None,
                   help="query: the window containing this point (finest GSD unless --gsd)")
    p.add_argument("--point_crs", default=None, help="CRS of --point (default: the file's; EPSG:4326 for lon lat)")
    p.add_argument("--gsd", type=float, default=None, help="with --point: the query window's GSD")
    p.add_argument("--k", type=int, default=10, help="number of hits (default 10)")
    p.add_argument("--column", default=None, help="embedding column (default the first: embedding_cls)")
    p.add_argument("--output", default=None, help="write the hits here (.geojson / .gpkg)")
    p.add_argument("--debug", action="store_true", help=f"tracebacks of errors (also {harness.DEBUG_ENV}=1)")
    return p


def main(args: argparse.Namespace):
    from inference.inputs import check_crs
    from inference.search import search

    if not os.path.isfile(args.embeddings):
        raise harness.UserError(f"{args.embeddings}: file not found")
    harness.check_positive(args, "k")
    check_crs(args.point_crs, "--point_crs")
    driver = OUTPUT_DRIVERS.get(os.path.splitext(args.output or "")[1].lower()) if args.output else None
    if args.output:
        harness.require(driver is not None, f"--output {args.output}: give a .geojson or .gpkg file name")
        harness.require(not os.path.isdir(args.output), f"--output {args.output}: is a folder; give a .geojson or "
                                                        f".gpkg file name")
        harness.check_writable(args.output, "--output")
    query, hits = search(args.embeddings, k=args.k, index=args.window, point=args.point, crs=args.point_crs,
                         gsd=args.gsd, column=args.column)
    print(f"query: window {query.name} gsd {query['gsd']:g} {query['source']} row {query['row']} col "
          f"{query['col']} {query['footprint_wgs84']}")
    for rank, (_, hit) in enumerate(hits.iterrows(), 1):
        print(f"{rank:3d}  {hit['score']:.4f}  gsd {hit['gsd']:g}  window {hit['window']}  row {hit['row']} col "
              f"{hit['col']}  {hit['footprint_wgs84']}")
    if args.output:
        from util.io import atomic_write

        layer = {"layer": "hits"} if driver == "GPKG" else {}  # not the temporary file's name
        atomic_write(args.output, lambda tmp: hits.to_file(tmp, driver=driver, **layer), by_name=True)
        print(f"hits written to {args.output}")
    return hits


if __name__ == "__main__":
    harness.run(main, get_args_parser())
