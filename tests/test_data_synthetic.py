"""Synthetic data generators: deterministic, class-separable, georeferenced; the in-memory demo sets."""
import hashlib
from pathlib import Path

import numpy as np
import rasterio
import torch

from dataloaders.builders import build_eval_datasets, build_pretrain_dataset, build_pretrain_sampler
from dataloaders.config import load_config
from dataloaders.synthetic import DemoScenes, make_geotiff_folder, make_scene, make_scene_folder

CONFIG = Path(__file__).resolve().parents[1] / "config"


def _digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_scene_folder_is_deterministic(tmp_path):
    a = _digest(make_scene_folder(tmp_path / "a", num_classes=3, per_class=2, size=32))
    b = _digest(make_scene_folder(tmp_path / "b", num_classes=3, per_class=2, size=32))
    c = _digest(make_scene_folder(tmp_path / "c", num_classes=3, per_class=2, size=32, seed=1))
    assert len(a) == 6 and a == b and a != c
    assert sorted({k.split("/")[0] for k in a}) == ["class_00", "class_01", "class_02"]


def test_classes_are_separable_at_several_scales():
    n_cls, n_img, size = 6, 12, 48
    imgs = np.stack([make_scene(c, size, 0, i) for c in range(n_cls) for i in range(n_img)])
    labels = np.repeat(np.arange(n_cls), n_img)
    # nearest class centroid on coarse (6x6) colour layout and on fine-scale gradient energy
    coarse = imgs.reshape(len(imgs), 3, 6, 8, 6, 8).mean((3, 5)).reshape(len(imgs), -1)
    gray = imgs.mean(1)
    fine = np.stack([np.abs(np.diff(gray, axis=2)).mean((1, 2)), np.abs(np.diff(gray, axis=1)).mean((1, 2))], 1)
    for feats in (coarse, fine):
        train, test = np.arange(len(imgs)) % 2 == 0, np.arange(len(imgs)) % 2 == 1
        cents = np.stack([feats[train & (labels == c)].mean(0) for c in range(n_cls)])
        pred = ((feats[test][:, None] - cents[None]) ** 2).sum(-1).argmin(1)
        assert (pred == labels[test]).mean() >= 0.6
    assert make_scene(2, 16, 0, 3).shape == (3, 16, 16) and make_scene(2, 16, 0, 3, bands=8).shape == (8, 16, 16)
    assert np.array_equal(make_scene(1, 16, 5, 2), make_scene(1, 16, 5, 2))


def test_geotiff_folder_has_real_georeference_and_nodata(tmp_path):
    make_geotiff_folder(tmp_path, n=2, bands=4, size=32, gsd=10.0, crs="EPSG:32633", nodata=0, dtype="uint16")
    with rasterio.open(tmp_path / "tile_001.tif") as src:
        assert src.crs.to_epsg() == 32633 and src.nodata == 0 and src.count == 4 and src.dtypes[0] == "uint16"
        assert tuple(src.transform)[:6] == (10.0, 0.0, 500000.0 + 320.0, 0.0, -10.0, 4200000.0)
        data = src.read()
    rows, cols = np.indices((32, 32))
    assert (data[:, (rows + cols) < 8] == 0).all() and (data[:, (rows + cols) >= 8] > 0).all()


def test_demo_config_pretrains_and_evaluates_without_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(CONFIG / "demo.yaml", overrides=["data.length=8"])
    ds = build_pretrain_dataset(cfg, input_size=32)
    sampler = build_pretrain_sampler(ds, cfg, num_replicas=1, rank=0, seed=0)
    sampler.set_epoch(1)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler)))
    assert [tuple(t.shape) for t in batch] == [(4, 3, 32, 32), (4,), (4, 3, 64, 64), (4,)]
    train, val, n = build_eval_datasets("demo")
    assert n == 4 and len(train) == 128 and len(val) == 32
    img, label = val[5]
    assert img.shape == (3, 96, 96) and label == 1
    assert not torch.equal(train[0][0], val[0][0])
    assert list(tmp_path.iterdir()) == []  # nothing written
    d = DemoScenes(length=4, size=16, num_classes=2, seed=3)
    assert d.targets == [0, 1, 0, 1] and np.array_equal(np.asarray(d[2][0]), np.asarray(d[2][0]))
