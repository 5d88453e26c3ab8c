"""Census of inputs that used to run to exit 0 with a wrong or meaningless result (issue 17, "silently wrong").

Each case runs a launcher's or tool's command line in-process through ``harness.run`` (what ``python main_*.py``
does) on tiny data and checks what the user sees:

* an error case exits with status 2 and prints exactly one ``error:`` line naming the culprit, no traceback, and
  every file that existed before is byte-identical (nothing written, no checkpoint);
* a warning case (continuing is legitimate) exits normally and prints the ``WARNING:`` line exactly once.

Segmentation warnings are checked at ``build_seg_datasets`` (the one place main_segment.py builds its data; a full
segmentation run costs more than this census may), and one warning case runs under two gloo processes to show it
is printed once (rank 0).
"""
from __future__ import annotations

import errno
import functools
import hashlib
import http.server
import importlib.util
import json
import os
import stat
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

import main_linprobe
import main_pretrain
import main_segment
import models_mae
import models_vit
import harness
from ranks import free_port

REPO = Path(__file__).resolve().parents[1]


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = sys.modules.setdefault(name, importlib.util.module_from_spec(spec))
    if not hasattr(module, "get_args_parser") and not hasattr(module, "parse_args"):
        spec.loader.exec_module(module)
    return module


export_encoder = _load_tool("export_encoder")
make_splits = _load_tool("make_splits")
LAUNCHERS = {"pretrain": main_pretrain, "linprobe": main_linprobe, "segment": main_segment, "export": export_encoder}


# ------------------------------------------------------------------------------------------------------ data
def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _mask_pairs(root: Path, values: tuple[int, ...]) -> None:
    """Two 32 px RGB images and masks whose pixels take ``values`` (stripes)."""
    rng = np.random.default_rng(0)
    for i in range(2):
        _png(root / "img" / f"m{i}.png", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
        mask = np.zeros((32, 32), dtype=np.uint8)
        for j, v in enumerate(values):
            mask[j * 32 // len(values):(j + 1) * 32 // len(values)] = v
        _png(root / "mask" / f"m{i}.png", mask)


def _seg_masks_yaml(path: Path, root: Path, classes: str, extra: str = "") -> None:
    path.write_text(f"data:\n  type: masks\n  img_dir: {root}/img\n  mask_dir: {root}/mask\n  val_img_dir: {root}/img\n"
                    f"  val_mask_dir: {root}/mask\n  classes: {classes}\n  scale: 255.0\n  mean: [0.5, 0.5, 0.5]\n"
                    f"  std: [0.2, 0.2, 0.2]\n  size: 32\n  length: 4\n{extra}")


def _vector(path: Path, geoms: list, crs: str = "EPSG:32633") -> None:
    import geopandas as gpd

    path.write_text(gpd.GeoDataFrame({"class": ["building"] * len(geoms)}, geometry=geoms, crs=crs).to_json())


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A user's files: scene folders, segmentation tiles/labels/masks, checkpoints of every launcher."""
    import geopandas as gpd
    from shapely.geometry import box

    from dataloaders.seg_synthetic import make_building_scenes
    from dataloaders.synthetic import make_scene_folder

    root = tmp_path_factory.mktemp("silent")
    make_scene_folder(root / "scenes" / "train", 2, per_class=4, size=32, seed=0)
    make_scene_folder(root / "scenes" / "val", 3, per_class=1, size=32, seed=1)  # class_02: not in train
    make_scene_folder(root / "holey", 2, per_class=3, size=32, seed=2)
    (root / "holey" / "class_09").mkdir()  # an empty class folder
    (root / "fmow" / "train" / "airport").mkdir(parents=True)  # fMoW linked as data/: no resisc45/
    probe = "data:\n  type: resisc\n  img_dir: scenes/train\n  std: [0.2, 0.2, 0.2]\n"
    (root / "probe.yaml").write_text(probe + "  mean: [0.4, 0.4, 0.4]\n")
    (root / "probe_255.yaml").write_text(probe.replace("[0.2, 0.2, 0.2]", "[58.4, 57.1, 57.4]")
                                         + "  mean: [123.7, 116.3, 103.5]\n")

    # segmentation: 2 training tiles + 1 validation tile, labels in EPSG:4326
    scenes = make_building_scenes(root / "seg", n_train=2, n_val=1, size=64, count=3)
    gdf = gpd.read_file(scenes["labels"]).to_crs("EPSG:32633")
    x0 = gdf.total_bounds[0]
    _vector(root / "seg" / "far.geojson", [box(x0 + 1e5, 5e6, x0 + 1e5 + 10, 5e6 + 10)])  # 100 km away
    first = gdf[gdf.geometry.bounds["maxx"] < x0 + 32].geometry.tolist()  # the roofs of tile_000 only
    _vector(root / "seg" / "tile0_only.geojson", first)
    (root / "seg" / "empty.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    _mask_pairs(root / "masks255", (0, 255))  # building stored as 255: the probe's classic slip
    _mask_pairs(root / "masks3", (0, 1))  # 'road' (value 2) never occurs
    _seg_masks_yaml(root / "masks255.yaml", root / "masks255", "[building]")
    _seg_masks_yaml(root / "masks3.yaml", root / "masks3", "[building, road]")
    _mask_pairs(root / "masks7", (0, 1, 7))  # 7: no class
    _seg_masks_yaml(root / "masks7.yaml", root / "masks7", "[building]")

    # checkpoints of every launcher, and an exported encoder
    torch.manual_seed(0)
    mae = models_mae.mae_vit_tiny_patch16(img_size=32)
    torch.save({"model": mae.state_dict(), "args": {"model": "mae_vit_tiny_patch16"}}, root / "mae_tiny.pth")
    vit = models_vit.vit_tiny_patch16(num_classes=2)
    for name, writer, state in (("probe_ckpt", "main_linprobe", vit.state_dict()),
                                ("seg_ckpt", "main_segment",
                                 {f"backbone.{k}": v for k, v in vit.state_dict().items()}),
                                ("pre_ckpt", "main_pretrain", mae.state_dict())):
        keeper = harness.CheckpointKeeper(root / name, writer)
        keeper.save({"model": state, "epoch": 0, "args": {"epochs": 1}}, "the end of epoch 0")
    export_encoder.export_encoder(root / "mae_tiny.pth", root / "exported" / "enc")
    (root / "a_file").write_text("not a folder")
    return root


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(launcher: str, argv: list[str], root: Path, capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``python <launcher> argv`` run in-process (``{root}`` substituted)."""
    module = LAUNCHERS[launcher]
    entry = module.run if launcher == "export" else module.main
    run_cli.calls += 1  # every run its own output folder: a run that finishes must not be autoresumed by the next
    argv = [a.replace("{out}", f"{root}/out/run{run_cli.calls:03d}").replace("{root}", str(root)) for a in argv]
    code = 0
    try:
        harness.run(entry, module.get_args_parser(), argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


run_cli.calls = 0
CPU = ["--device", "cpu", "--num_workers", "0"]
KNN = CPU + ["--eval_only", "--resume", "{root}/mae_tiny.pth", "--eval_scale", "32", "--eval_batch_size", "4",
             "--output_dir", "{out}"]
PROBE = CPU + ["--input_size", "32", "--eval_scale", "32", "--epochs", "1", "--batch_size", "4",
               "--warmup_epochs", "0", "--config", "{root}/probe.yaml", "--output_dir", "{out}"]
SEG = CPU + ["--model", "vit_tiny_patch16", "--allow_random_init", "--input_size", "32", "--batch_size", "2",
             "--epochs", "1", "--output_dir", "{out}", "--config", "{root}/seg/seg_demo.yaml",
             "--data_override", "data.size=32"]
PRE = CPU + ["--config", str(REPO / "config" / "demo.yaml"), "--model", "mae_vit_tiny_patch16", "--input_size", "32",
             "--skip_knn_eval", "--output_dir", "{out}"]

# (issue item, launcher, argv, text the one error line must contain)
ERRORS = [
    ("01 labels burn no pixel in any training tile", "segment", SEG + ["data.labels={root}/seg/far.geojson"],
     "no polygon touches any of the 2 training raster(s)"),
    ("02 no foreground mask value occurs", "segment",
     SEG[:-4] + ["--config", "{root}/masks255.yaml"], "'building' (value 1)"),
    ("05 mean/std in 0-255 units", "linprobe", PROBE + ["--checkpoint_path", "{root}/mae_tiny.pth",
                                                        "--config", "{root}/probe_255.yaml"], "data.mean"),
    ("08 probe checkpoint to main_pretrain --resume", "pretrain",
     PRE + ["--resume", "{root}/probe_ckpt/checkpoint-latest.pth", ],
     "linear-probe/finetune checkpoint of main_linprobe.py: main_linprobe.py --resume continues it"),
    ("08 exported encoder to main_pretrain --resume", "pretrain",
     PRE + ["--resume", "{root}/exported/enc.pth", ],
     "exported by tools/export_encoder.py: main_linprobe.py and main_segment.py take it as --checkpoint_path"),
    ("08 exported .safetensors to main_linprobe --resume", "linprobe",
     PROBE + ["--resume", "{root}/exported/enc.safetensors"],
     "encoder exported by tools/export_encoder.py (.safetensors): main_linprobe.py and main_segment.py take it as "
     "--checkpoint_path"),
    ("08 segmentation checkpoint to main_linprobe", "linprobe",
     PROBE + ["--checkpoint_path", "{root}/seg_ckpt/checkpoint-latest.pth"],
     "segmentation checkpoint of main_segment.py: main_segment.py --resume continues it"),
    ("08 probe checkpoint to main_segment --resume", "segment",
     SEG + ["--resume", "{root}/probe_ckpt/checkpoint-latest.pth"], "main_linprobe.py --resume continues it"),
    ("08 pretraining checkpoint to main_linprobe --resume", "linprobe",
     PROBE + ["--resume", "{root}/pre_ckpt/checkpoint-latest.pth"],
     "pretraining checkpoint of main_pretrain.py: main_pretrain.py --resume continues it; main_linprobe.py and "
     "main_segment.py take it as --checkpoint_path"),
    ("09 empty vector file", "segment", SEG + ["data.labels={root}/seg/empty.geojson"],
     "empty.geojson: data.labels holds no polygon features"),
    ("10 mistyped flag (pretrain)", "pretrain", PRE + ["--blrr", "1e-3"], "--blrr (did you mean --blr?)"),
    ("10 mistyped flag (linprobe)", "linprobe", PROBE + ["--nb_clases", "3"], "--nb_clases (did you mean --nb_classes?)"),
    ("10 mistyped flag (segment)", "segment", SEG + ["--eval_scals", "1"], "--eval_scals (did you mean --eval_scales?)"),
    ("10 mistyped flag (export)", "export", ["{root}/mae_tiny.pth", "-o", "{root}/out/e", "--img-size", "64"],
     "--img-size (did you mean --img_size?)"),
    ("11 output folder under a file", "pretrain", PRE + ["--output_dir", "{root}/a_file/run"],
     "--output_dir {root}/a_file/run: cannot create the folder: Not a directory"),
    ("12 original README probe with fMoW as data", "linprobe",
     [a for a in PROBE if a not in ("--config", "{root}/probe.yaml")] + ["--checkpoint_path", "{root}/mae_tiny.pth",
                                                                         "--data_root", "{root}/fmow"],
     "without --config the probe trains on NWPU-RESISC45 (config/resisc.yaml"),
]


def _check_error(code: int, out: str, err: str, culprit: str) -> str:
    lines = [line for line in (out + err).splitlines() if line.startswith("error:")]
    assert code == 2, (code, out + err)
    assert len(lines) == 1, out + err
    assert culprit in lines[0], lines[0]
    assert err.strip() == lines[0], err  # nothing else on stderr: no traceback, no usage
    assert "Traceback" not in out + err and "usage:" not in out + err
    return lines[0]


@pytest.mark.parametrize("case,launcher,argv,culprit", ERRORS, ids=[c[0] for c in ERRORS])
def test_error_census(world, case, launcher, argv, culprit, capsys):
    before = snapshot(world)
    code, out, err = run_cli(launcher, argv, world, capsys)
    _check_error(code, out, err, culprit.replace("{root}", str(world)))
    after = snapshot(world)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing pre-existing changed
    # nothing written (the GeoTIFF reader's tile-header cache beside the rasters is by design)
    assert not [k for k in after if k not in before and ".scalemae_tile_index" not in k]


def test_mistyped_flag_of_make_splits(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        make_splits.main([str(tmp_path), "--val_fraction", "0.1"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "did you mean --val-fraction?" in err, err


@pytest.mark.parametrize("reason", [errno.EROFS, errno.ENOSPC, errno.EACCES], ids=["read-only", "no-space", "denied"])
def test_output_folder_oserror_is_one_line(world, reason, monkeypatch, capsys):
    """11: the OS refusing to create --output_dir (root ignores permissions, so the refusal is injected)."""
    target = world / "out" / f"ro_{reason}"
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self == target:
            raise OSError(reason, os.strerror(reason), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    code, out, err = run_cli("pretrain", PRE + ["--output_dir", str(target)], world, capsys)
    _check_error(code, out, err, f"--output_dir {target}: cannot create the folder: {os.strerror(reason)}")


# ------------------------------------------------------------------------------------------------- warnings
# (issue item, launcher, argv, text the one warning line must contain)
WARNINGS = [
    ("03 class absent from the kNN bank", "pretrain",
     KNN + ["--eval_train_fnames", "{root}/scenes/train", "--eval_val_fnames", "{root}/scenes/val", "--knn", "4"],
     "1 class(es) of the validation set never occur in the kNN bank, so their validation images can never be "
     "classified right: class_02"),
    ("03 class absent from the probe's training set", "linprobe",
     PROBE + ["--checkpoint_path", "{root}/mae_tiny.pth", "--eval_path", "{root}/scenes/val"],
     "never occur in the training set, so their validation images can never be classified right: class_02"),
    ("04 empty class folder", "pretrain", KNN + ["--eval_path", "{root}/holey", "--knn", "2"],
     "1 of the 3 class folders of {root}/holey hold no images"),
    ("06 kNN bank smaller than k", "pretrain",
     KNN + ["--eval_train_fnames", "{root}/holey", "--eval_val_fnames", "{root}/holey", "--knn", "20"],
     "--knn 20 is larger than the kNN bank (6 images): k is clipped to 6"),
]


@pytest.mark.parametrize("case,launcher,argv,culprit", WARNINGS, ids=[c[0] for c in WARNINGS])
def test_warning_census(world, case, launcher, argv, culprit, capsys):
    code, out, err = run_cli(launcher, argv, world, capsys)
    assert code in (0, None), out + err
    culprit = culprit.replace("{root}", str(world))
    assert (out + err).count(culprit) == 1, out + err
    line = next(line for line in out.splitlines() if culprit in line)
    assert line.startswith("WARNING:"), line
    warnings = [line for line in out.splitlines() if line.startswith("WARNING:")]
    assert len(warnings) == len(set(warnings)), out  # no warning repeated
    assert "Traceback" not in out + err and "error:" not in out + err


SEG_WARNINGS = [
    ("01 labels burn no pixel in one tile", "seg/seg_demo.yaml",
     ["data.labels={root}/seg/tile0_only.geojson", "data.val_labels={root}/seg/buildings.geojson"],
     "tile0_only.geojson: no polygon touches 1 of the 2 training raster(s) of data.img_dir, so their labels are all "
     "background: tile_001.tif"),
    ("02 a configured class never occurs in the masks", "masks3.yaml", [],
     "'road' (value 2) of the class ids (no data.mask_values) never occur(s) in the training masks"),
    ("02 mask values that are no class", "masks7.yaml", [],
     "mask values [7] of the training masks are no class of the class ids (no data.mask_values) and become "
     "data.ignore_index 255"),
    ("09 empty validation vector file", "seg/seg_demo.yaml", ["data.val_labels={root}/seg/empty.geojson"],
     "empty.geojson: data.val_labels holds no polygon features: every validation pixel is background"),
]


@pytest.mark.parametrize("case,config,overrides,culprit", SEG_WARNINGS, ids=[c[0] for c in SEG_WARNINGS])
def test_segmentation_warning_census(world, case, config, overrides, culprit, capsys):
    from dataloaders.config import load_seg_config
    from dataloaders.segmentation import build_seg_datasets

    cfg = load_seg_config(world / config, overrides=[o.replace("{root}", str(world)) for o in overrides])
    build_seg_datasets(cfg, input_size=32)  # goes on: no exception
    out = capsys.readouterr().out
    culprit = culprit.replace("{root}", str(world))
    warnings = [line for line in out.splitlines() if line.startswith("WARNING:")]
    assert [w for w in warnings if culprit in w] and len(warnings) == 1, out


# ------------------------------------------------------------------------------------------- two processes
def _knn_rank(rank: int, world: int, port: int, root: str, log_dir: str) -> None:
    """One rank of ``python -m torch.distributed.launch --nproc_per_node=2 main_pretrain.py --eval_only ...``,
    its stdout and stderr written to ``log_dir/rank<r>.txt``."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.pop(harness.DEBUG_ENV, None)
    torch.set_num_threads(1)
    log = os.open(os.path.join(log_dir, f"rank{rank}.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log, 1)
    os.dup2(log, 2)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False)
    argv = [a.replace("{root}", root) for a in KNN] + ["--eval_train_fnames", f"{root}/scenes/train",
                                                       "--eval_val_fnames", f"{root}/scenes/val", "--knn", "50",
                                                       "--output_dir", f"{root}/out/knn_ddp"]
    try:
        harness.run(main_pretrain.main, main_pretrain.get_args_parser(), argv)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="forked gloo ranks")
def test_warnings_are_printed_once_by_two_processes(world, tmp_path):
    """03 and 06 under two gloo processes: each warning line once (rank 0), and the kNN run still finishes."""
    mp.start_processes(_knn_rank, args=(2, free_port(), str(world), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    text = "".join((tmp_path / f"rank{r}.txt").read_text() for r in range(2))
    assert text.count("--knn 50 is larger than the kNN bank (8 images)") == 1, text
    assert text.count("never occur in the kNN bank") == 1, text
    assert "eval results (32)" in text and "Traceback" not in text and "error:" not in text, text


def _eval_rank(rank: int, world: int, port: int, log_dir: str) -> None:
    """One rank of a probe evaluation over 7 fixed logits (rank 0: 4 samples in 2 batches, rank 1: 3 in 1)."""
    import contextlib
    import io

    import torch.distributed as dist

    from engine_finetune import evaluate
    from util.dist import ShardSampler

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    data = _fixed_logits()
    loader = torch.utils.data.DataLoader(data, batch_size=3, sampler=ShardSampler(data, world, rank))
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        stats = evaluate(loader, _Logits(), torch.device("cpu"), 1.0, print_freq=1)
    Path(log_dir, f"eval{rank}.json").write_text(json.dumps({"stats": stats, "out": buffer.getvalue()}))
    dist.destroy_process_group()


class _Logits(torch.nn.Module):
    """The "model" of the fixed evaluation set: its inputs are the logits."""

    def forward(self, x, input_res=None):
        return x


def _fixed_logits() -> list:
    g = torch.Generator().manual_seed(3)
    return list(zip(torch.randn(7, 4, generator=g), torch.tensor([0, 1, 2, 3, 0, 1, 2])))


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="forked gloo ranks")
def test_probe_progress_lines_show_the_accuracy_of_all_ranks(tmp_path):
    """13: every progress line is over all ranks' images so far (both ranks print the same line); the last one
    equals the final global accuracy, also when the ranks' shards have different batch counts."""
    mp.start_processes(_eval_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    runs = [json.loads((tmp_path / f"eval{r}.json").read_text()) for r in range(2)]
    logits = torch.stack([x for x, _ in _fixed_logits()])
    labels = torch.stack([y for _, y in _fixed_logits()])
    expected = 100.0 * (logits.argmax(1) == labels).float().mean().item()
    progress = [[line for line in run["out"].splitlines() if line.startswith("Test: [")] for run in runs]
    assert len(progress[0]) == 2 and [p.split("time:")[0] for p in progress[0]] == \
        [p.split("time:")[0] for p in progress[1]]
    assert "(6 images so far, all ranks)" in progress[0][0]  # the first batch of each rank
    assert "(7 images so far, all ranks)" in progress[0][-1]
    assert f"acc1 {expected:.2f}" in progress[0][-1] and runs[0]["stats"]["acc1"] == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------- URL, export
class _HtmlPage(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        body = b"<!DOCTYPE html><html><head><title>scalemae-vitlarge-800.pth</title></head><body>Sign in</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_url_serving_html_is_one_error_and_never_cached(world, tmp_path, monkeypatch, capsys):
    """07: a URL that serves an HTML page (a release page, a login page) instead of the file."""
    from util.checkpoint import url_cache_path

    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HtmlPage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/releases/scalemae-vitlarge-800.pth"
        before = snapshot(world)
        for _ in range(2):  # the second run downloads again: nothing was cached
            code, out, err = run_cli("linprobe", PROBE + ["--checkpoint_path", url], world, capsys)
            err = "".join(line for line in err.splitlines(True) if "%|" not in line)  # the download's progress bar
            line = _check_error(code, out, err, f"{url} serves an HTML page")
            assert "nothing was cached" in line
            assert not url_cache_path(url).exists()
        assert snapshot(world) == before
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_files_share_one_mode(world, tmp_path, umask):
    """14: .pth, .safetensors and .json are all created as a plain open() would (0666 minus the umask)."""
    old = os.umask(umask)
    try:
        paths = export_encoder.export_encoder(world / "mae_tiny.pth", tmp_path / "enc")["paths"]
    finally:
        os.umask(old)
    modes = {kind: stat.S_IMODE(p.stat().st_mode) for kind, p in paths.items()}
    assert set(modes) == {"pth", "safetensors", "json"}
    assert set(modes.values()) == {0o666 & ~umask}, {k: oct(v) for k, v in modes.items()}
