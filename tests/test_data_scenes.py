"""Scene datasets: split lists, class maps, ImageFolder roots, FMoW filter, 90/10 split, shipped splits."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataloaders.builders import EVAL_STATS, build_eval_datasets, build_linprobe_datasets, build_pretrain_dataset
from dataloaders.errors import DataError, MissingDataError
from dataloaders.eval_sets import eval_transform
from dataloaders.scenes import make_class_map, random_split_indices, read_split_list, scan_image_folder
from dataloaders.splits import verify_sha256sums, write_sha256sums
from dataloaders.synthetic import make_scene_folder, write_split_lists

REPO = Path(__file__).resolve().parents[1]

# (lines, classes) of the shipped lists, original_behaviour.md §4.2
SHIPPED = {"resisc": (25200, 6300, 45), "mlrsnet": (87150, 21787, 46), "eurosat": (21600, 5400, 10),
           "aerial": (8995, 2249, 11)}


def _img(path, value=128, size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)
    return path


def test_split_list_parsing_root_is_the_list_folder(tmp_path):
    _img(tmp_path / "a" / "x.png")
    _img(tmp_path / "b" / "sub" / "y.png")
    lst = tmp_path / "train.txt"
    lst.write_text("./a/x.png\n\n# comment\n./b/sub/y.png\nb/sub/y.png\n")
    samples = read_split_list(lst)
    assert samples == [(str(tmp_path / "a" / "x.png"), "a"), (str(tmp_path / "b" / "sub" / "y.png"), "b"),
                       (str(tmp_path / "b" / "sub" / "y.png"), "b")]


@pytest.mark.parametrize("line", ["../a/x.png", "./a/../../x.png", "/etc/a/x.png", "./x.png", "a\\x.png"])
def test_split_line_escaping_the_root_is_rejected(tmp_path, line):
    lst = tmp_path / "val.txt"
    lst.write_text(f"./ok/img.png\n{line}\n")
    with pytest.raises(DataError) as err:
        read_split_list(lst, check_files=False)
    assert f"{lst}:2" in str(err.value) and line in str(err.value)


def test_missing_listed_file_names_it(tmp_path):
    _img(tmp_path / "a" / "x.png")
    lst = tmp_path / "train.txt"
    lst.write_text("./a/x.png\n./a/gone.png\n")
    with pytest.raises(MissingDataError, match="gone.png"):
        read_split_list(lst)


def test_one_class_map_shared_by_train_and_val(tmp_path):
    for rel in ("a/1.png", "b/1.png", "a/2.png", "c/1.png"):
        _img(tmp_path / rel)
    (tmp_path / "train.txt").write_text("./a/1.png\n./b/1.png\n")
    (tmp_path / "val.txt").write_text("./a/2.png\n./c/1.png\n")
    train, val, n = build_eval_datasets("resisc", tmp_path / "train.txt", tmp_path / "val.txt")
    assert n == 3 and train.class_to_idx == val.class_to_idx == {"a": 0, "b": 1, "c": 2}
    assert [y for _, y in train.samples] == [0, 1] and [y for _, y in val.samples] == [0, 2]
    img, label = val[1]
    assert label == 2 and img.shape == (3, 8, 8)
    mean, std = EVAL_STATS["resisc"]
    torch.testing.assert_close(img[:, 0, 0], (128 / 255 - torch.tensor(mean)) / torch.tensor(std))
    assert make_class_map([("p", "z")], [("q", "y")]) == {"y": 0, "z": 1}


def test_eval_path_random_90_10_split(tmp_path):
    make_scene_folder(tmp_path / "scenes", num_classes=4, per_class=5, size=16)
    tr, va, n = build_eval_datasets("demo", eval_path=tmp_path / "scenes", seed=0)
    assert n == 4 and len(tr) == 18 and len(va) == 2
    all_paths = {p for p, _ in scan_image_folder(tmp_path / "scenes")}
    tr_p, va_p = {p for p, _ in tr.samples}, {p for p, _ in va.samples}
    assert tr_p.isdisjoint(va_p) and tr_p | va_p == all_paths
    tr2, va2, _ = build_eval_datasets("demo", eval_path=tmp_path / "scenes", seed=0)
    assert tr2.samples == tr.samples and va2.samples == va.samples
    splits = {tuple(p for p, _ in build_eval_datasets("demo", eval_path=tmp_path / "scenes", seed=s)[1].samples)
              for s in range(5)}
    assert len(splits) > 1
    t, v = random_split_indices(100, 0.1, seed=3)
    assert len(t) == 90 and len(v) == 10 and set(t) | set(v) == set(range(100))


def test_eval_needs_both_lists_or_a_path(tmp_path):
    with pytest.raises(ValueError, match="eval_val_fnames"):
        build_eval_datasets("resisc", train_fnames=tmp_path / "train.txt")
    with pytest.raises(ValueError, match="unknown eval dataset"):
        build_eval_datasets("imagenet", eval_path=tmp_path)


def test_fmow_folder_keeps_only_rgb_jpg(tmp_path):
    root = tmp_path / "train"
    for cat in ("airport", "zoo"):
        for k in range(2):
            base = root / cat / f"{cat}_0" / f"{cat}_0_{k}"
            _img(Path(f"{base}_rgb.jpg"), size=40)
            _img(Path(f"{base}_msrgb.jpg"), size=40)
            Path(f"{base}_rgb.json").write_text("{}")
    cfg = {"data": {"type": "fmow", "img_dir": str(root), "mean": [0.5] * 3, "std": [0.2] * 3}}
    ds = build_pretrain_dataset(cfg, input_size=16)
    assert len(ds) == 4 and all(p.endswith("_rgb.jpg") for p, _ in ds.samples)
    imgs, in_res, target, t_res = ds[0]
    assert imgs.shape == (3, 16, 16) and target.shape == (3, 32, 32)
    tr, va, n = build_eval_datasets("fmow", train_fnames=root, val_fnames=root)
    assert n == 2 and len(tr) == 4 and tr[0][0].shape == (3, 512, 512)  # Resize(512) + CenterCrop(512)


def test_eval_transforms_special_resizes():
    assert set(EVAL_STATS) == {"resisc", "mlrsnet", "airound", "cvbrct", "eurosat", "optimal-31", "whu-rs19",
                               "ucmerced", "fmow"}
    assert EVAL_STATS["fmow"] == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    img = Image.new("RGB", (300, 200))
    assert eval_transform("ucmerced")(img).shape == (3, 256, 256)
    assert eval_transform("resisc")(img).shape == (3, 200, 300)
    assert eval_transform("fmow", "linprobe", eval_scale=64)(img).shape == (3, 64, 64)
    assert eval_transform("resisc", "linprobe", eval_scale=64, resize=True)(img).shape == (3, 64, 64)


def test_resisc_pretraining_from_a_split_list(tmp_path):
    make_scene_folder(tmp_path, num_classes=2, per_class=3, size=24, ext="jpg")
    train_txt, _ = write_split_lists(tmp_path, val_fraction=0.34, seed=0)
    cfg = {"data": {"type": "resisc", "img_dir": str(train_txt), "mean": [0.5] * 3, "std": [0.2] * 3}}
    ds = build_pretrain_dataset(cfg, input_size=8)
    assert len(ds) == 4
    inp, in_res, tgt, t_res = ds[0]
    assert inp.shape == (3, 8, 8) and tgt.shape == (3, 16, 16)
    assert 0 < t_res.item() <= (24 - 1) / 16 * 2.5  # RRC from the whole 24 px image


def test_linprobe_datasets(tmp_path):
    make_scene_folder(tmp_path / "tr", num_classes=3, per_class=2, size=24)
    make_scene_folder(tmp_path / "va", num_classes=3, per_class=1, size=24)
    cfg = {"data": {"type": "resisc", "img_dir": str(tmp_path / "tr"), "mean": [0.5] * 3, "std": [0.2] * 3}}
    tr, va, n = build_linprobe_datasets(cfg, "resisc", tmp_path / "va", input_size=16, eval_scale=16,
                                        val_resize=True)
    assert n == 3 and len(tr) == 6 and len(va) == 3
    img, res, label = tr[5]
    assert img.shape == (3, 16, 16) and res.ndim == 0 and label == 2
    vimg, vlabel = va[2]
    assert vimg.shape == (3, 16, 16) and vlabel == 2
    dtr, dva, dn = build_linprobe_datasets({"data": {"type": "demo", "length": 8, "size": 32}}, "demo", None,
                                           input_size=16, eval_scale=32)
    assert dn == 4 and len(dtr[0]) == 3 and dva[0][0].shape == (3, 32, 32)
    with pytest.raises(DataError, match="labelled"):
        build_linprobe_datasets({"data": {"type": "geotiff", "img_dir": "x", "mean": [0.0], "std": [1.0]}},
                                "resisc", tmp_path / "va")


def test_shipped_split_checksums_and_contents():
    assert verify_sha256sums(REPO / "splits" / "SHA256SUMS") == {}
    names = {line.split()[1] for line in (REPO / "splits" / "SHA256SUMS").read_text().splitlines()}
    assert names == {f"{s}-{d}.txt" for s in ("train", "val") for d in SHIPPED}
    for name, (n_train, n_val, n_cls) in SHIPPED.items():
        train = read_split_list(REPO / "splits" / f"train-{name}.txt", check_files=False)
        val = read_split_list(REPO / "splits" / f"val-{name}.txt", check_files=False)
        assert (len(train), len(val)) == (n_train, n_val)
        assert len(make_class_map(train)) == len(make_class_map(val)) == len(make_class_map(train, val)) == n_cls
        assert not {p for p, _ in train} & {p for p, _ in val}


def test_checksum_mismatch_is_reported(tmp_path):
    (tmp_path / "a.txt").write_text("./c/1.png\n")
    sums = write_sha256sums(tmp_path, ["a.txt"])
    assert verify_sha256sums(sums) == {}
    (tmp_path / "a.txt").write_text("./c/2.png\n")
    bad = verify_sha256sums(sums)
    assert list(bad) == ["a.txt"] and bad["a.txt"][0] != bad["a.txt"][1]


def test_make_splits_tool(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_splits", REPO / "tools" / "make_splits.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    make_scene_folder(tmp_path, num_classes=3, per_class=5, size=16)
    assert tool.main([str(tmp_path), "--val-fraction", "0.2", "--seed", "1"]) == 0
    train = (tmp_path / "train.txt").read_text().splitlines()
    val = (tmp_path / "val.txt").read_text().splitlines()
    assert len(train) == 12 and len(val) == 3 and all(line.startswith("./class_0") for line in train + val)
    assert sorted({line.split("/")[1] for line in val}) == ["class_00", "class_01", "class_02"]  # stratified
    assert tool.main([str(tmp_path), "--check"]) == 0
    tr, va, n = build_eval_datasets("demo", tmp_path / "train.txt", tmp_path / "val.txt")
    assert n == 3 and len(tr) == 12 and va.classes == ["class_00", "class_01", "class_02"]
    (tmp_path / "val.txt").write_text("tampered\n")
    assert tool.main([str(tmp_path), "--check"]) == 1
    assert tool.main([str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
