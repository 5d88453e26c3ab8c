"""The output folder of a run: created (one line when it cannot be), locked and cleaned for a training run; the
resolved configuration and its history; the TensorBoard writer; and ``--config`` / ``--data_root`` resolution."""
from __future__ import annotations

import argparse
import datetime
import os
from pathlib import Path
from typing import Any, Mapping, Optional

from util import dist as dist_util
from util.checkpoint import args_to_plain
from harness.checkpoints import remove_stale_temp_files
from harness.errors import UserError
from harness.run_control import take_output_lock

__all__ = ["SHIPPED_CONFIGS", "DEFAULT_DATA_ROOT", "resolve_data_config", "prepare_output", "make_folder",
           "check_writable", "save_run_config", "record_raster_dtype", "open_log_writer"]

_REPO = Path(__file__).resolve().parent.parent  # the launchers live in the repository root
SHIPPED_CONFIGS = _REPO / "config"
DEFAULT_DATA_ROOT = _REPO / "data"


_DATA_FOLDER_TYPES = ("fmow", "resisc", "eurosat")  # the original's image-folder configs, read from its data/


def resolve_data_config(args: argparse.Namespace, default: str) -> str:
    """Resolve ``--config`` (unset: the shipped ``config/<default>``; a relative path that does not exist from the
    working directory is also tried under the repository) and, for the shipped image-folder configs (fmow, resisc,
    eurosat), default ``--data_root`` to the repository's ``data/`` folder -- the original README's
    ``ln -s ~/data/fmow-rgb data``. Other configs keep their rule (relative to the file's folder). Sets
    ``args.config``/``args.data_root``; returns the config path. A missing file is a ``UserError``."""
    given = args.config
    path = Path(os.path.expanduser(given)) if given else SHIPPED_CONFIGS / default
    if given and not path.is_file() and not path.is_absolute() and (_REPO / path).is_file():
        path = _REPO / path
    if not path.is_file():
        shipped = ", ".join(f"config/{p.name}" for p in sorted(SHIPPED_CONFIGS.glob("*.yaml")))
        raise UserError(f"--config {given or path}: file not found (shipped: {shipped})")
    args.config = str(path)
    if args.data_root is None and path.resolve().parent == SHIPPED_CONFIGS.resolve():
        import yaml

        try:
            kind = str(((yaml.safe_load(path.read_text()) or {}).get("data") or {}).get("type", "")).lower()
        except (yaml.YAMLError, AttributeError, OSError):
            kind = ""  # load_config reports the problem with the file and key
        if kind in _DATA_FOLDER_TYPES:
            args.data_root = str(DEFAULT_DATA_ROOT)
            print(("--config not given: using " if not given else "") + f"config/{path.name}: relative paths "
                  f"resolve against {DEFAULT_DATA_ROOT} (the original README's `ln -s ~/data/fmow-rgb data`; "
                  f"--data_root changes it)")
    return args.config


def prepare_output(args: argparse.Namespace, training: bool = True) -> Path:
    """``--log_dir`` defaults to ``--output_dir``; on rank 0 create the output folder. A training run then takes the
    folder's lock (``run.lock``: one training run per folder; refused with one line before anything is written) and
    cleans up after interrupted saves (:func:`remove_stale_temp_files`). An evaluation run (``training=False``)
    takes no lock and removes nothing: it may read a folder where training runs, and never writes checkpoints.
    Returns the output folder."""
    if not args.output_dir:
        raise UserError("--output_dir is empty: give a folder for checkpoints and logs")
    out_dir = Path(args.output_dir)
    if args.log_dir is None:
        args.log_dir = args.output_dir
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--output_dir {out_dir} exists and is not a folder")
    if dist_util.is_main_process():
        make_folder(out_dir, "--output_dir")
    if training:
        take_output_lock(out_dir)
        if dist_util.is_main_process():
            remove_stale_temp_files(out_dir)
    return out_dir


def _os_reason(err: OSError) -> str:
    """The OS's words for an ``OSError`` (``No space left on device``, ``Read-only file system``, ...)."""
    return err.strerror or type(err).__name__


def make_folder(path: str | os.PathLike, flag: str) -> Path:
    """``mkdir -p path``; any ``OSError`` (read-only, a file in the way, no space, no permission) is a
    ``UserError`` naming ``flag`` and the folder. Returns the path."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"{flag} {path}: exists and is not a folder") from None
    except OSError as err:
        where = f" ({err.filename})" if err.filename and os.fspath(err.filename) != os.fspath(path) else ""
        raise UserError(f"{flag} {path}: cannot create the folder: {_os_reason(err)}{where}") from None
    return path


def check_writable(path: str | os.PathLike, flag: str, folder: bool = False) -> Path:
    """Refuse, before any work and creating nothing, an output ``path`` that cannot be written: a file
    (``folder=False``: its folder) or a folder (``folder=True``: itself) whose nearest existing ancestor must be a
    folder this process may create files in. A file in the way, a read-only or foreign folder: one ``UserError``
    naming ``flag``. Returns the path."""
    path = Path(os.path.expanduser(str(path)))
    if folder and path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: exists and is not a folder")
    here = (path if folder else path.parent).absolute()
    while not here.exists() and here != here.parent:
        here = here.parent
    if not here.is_dir():
        raise UserError(f"{flag} {path}: {here} is a file, not a folder; choose a path in a folder")
    if not os.access(here, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write in {here} (permission denied or read-only); choose a "
                        f"folder you can write in")
    return path


def save_run_config(out_dir: str | os.PathLike, args: argparse.Namespace, cfg: Optional[Mapping],
                    evaluating: bool = False, **extra: Any) -> Optional[Path]:
    """Write the resolved arguments, the data config's ``data`` section and ``extra`` to ``out_dir/config.yaml``
    (``config_eval.yaml`` when ``evaluating``) and a copy to ``out_dir/configs/<start time>.yaml`` (one per start:
    the history of a resumed run). Call it only when the run is about to start (rank 0 only writes)."""
    if not dist_util.is_main_process():
        return None
    from dataloaders.config import save_config

    resolved = {"args": args_to_plain(args), "data": (cfg or {}).get("data"), **extra}
    name = "config_eval" if evaluating else "config"
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    try:
        save_config(resolved, Path(out_dir) / "configs" / f"{name}-{stamp}.yaml")
        return save_config(resolved, Path(out_dir) / f"{name}.yaml")
    except OSError as err:
        raise UserError(f"--output_dir {out_dir}: cannot write {name}.yaml: {_os_reason(err)}") from None


def record_raster_dtype(args: argparse.Namespace, train_data: Any) -> Optional[str]:
    """Set ``args.raster_dtype`` to the pixel dtype of the rasters ``train_data`` reads
    (``dataloaders.pixel_dtype.pixel_dtypes``), so that ``config.yaml`` and every checkpoint's ``args`` record it
    and inference can refuse rasters of another dtype. Several dtypes: None, and one ``NOTE:`` line saying that
    inference will not check the dtype. Returns what was recorded."""
    from dataloaders.pixel_dtype import RASTER_DTYPE_KEY, pixel_dtypes

    dtypes = pixel_dtypes(train_data)
    recorded = dtypes[0] if len(dtypes) == 1 else None
    setattr(args, RASTER_DTYPE_KEY, recorded)
    if len(dtypes) > 1 and dist_util.is_main_process():
        print(f"NOTE: the training rasters have pixel dtypes {', '.join(dtypes)}: no {RASTER_DTYPE_KEY} is recorded, "
              f"so main_embed.py/main_predict.py will not check the dtype of the rasters they read")
    return recorded


def open_log_writer(log_dir: str | os.PathLike):
    """A TensorBoard ``SummaryWriter`` on ``log_dir`` (created if needed)."""
    from torch.utils.tensorboard import SummaryWriter  # slow import: only on the rank that logs

    make_folder(log_dir, "--log_dir")
    return SummaryWriter(log_dir=log_dir)
