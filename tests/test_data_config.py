"""YAML dataset configs: shipped values, validation, path resolution, overrides, saving."""
from pathlib import Path

import pytest

from dataloaders.config import ConfigError, load_config, save_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "config"


def test_shipped_configs_load_with_original_values():
    fmow = load_config(CONFIG / "fmow.yaml")["data"]
    assert fmow["type"] == "fmow" and fmow["mean"] == [0.485, 0.456, 0.406] and fmow["std"] == [0.229, 0.224, 0.225]
    assert fmow["base_resolution"] == 2.5 and fmow["oversample"] == 1.0 and fmow["vis_factor"] == 1.0
    resisc = load_config(CONFIG / "resisc.yaml")["data"]
    assert resisc["mean"] == [0.368, 0.381, 0.3436] and resisc["std"] == [0.2035, 0.1854, 0.1849]
    assert resisc["img_dir"].endswith("resisc45/train-resisc.txt")  # the shipped list name
    euro = load_config(CONFIG / "eurosat.yaml")["data"]
    assert euro["mean"] == resisc["mean"] and euro["img_dir"].endswith("EURO_TRAIN")
    naip = load_config(CONFIG / "naip.yaml")["data"]
    assert naip["type"] == "naip" and naip["length"] == 100000
    assert naip["mean"] == [0.4692, 0.4603, 0.4133] and naip["std"] == [0.1927, 0.1373, 0.1203]
    s2 = load_config(CONFIG / "sentinel2.yaml")["data"]
    assert s2["type"] == "sentinel2" and s2["size"] == 1024 and s2["vis_factor"] == 6000.0
    assert s2["base_resolution"] == 1.0
    geo = load_config(CONFIG / "geotiff.yaml")["data"]
    assert len(geo["bands"]) == len(geo["mean"]) == 6
    demo = load_config(CONFIG / "demo.yaml")["data"]
    assert demo["type"] == "demo" and "img_dir" not in demo


def test_demo_config_stats_match_the_generator():
    from dataloaders.synthetic import DEMO_MEAN, DEMO_STD

    demo = load_config(CONFIG / "demo.yaml")["data"]
    assert demo["mean"] == list(DEMO_MEAN) and demo["std"] == list(DEMO_STD)


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_relative_paths_resolve_against_config_folder_or_data_root(tmp_path, monkeypatch):
    cfg_file = _write(tmp_path / "cfgs" / "c.yaml", "data:\n  type: geotiff\n  img_dir: rasters\n  aoi: a/aoi.gpkg\n"
                                                    "  mean: [0.0]\n  std: [1.0]\n")
    monkeypatch.chdir(tmp_path)
    d = load_config(cfg_file)["data"]
    assert d["img_dir"] == str((tmp_path / "cfgs" / "rasters").resolve())
    assert d["aoi"] == str((tmp_path / "cfgs" / "a" / "aoi.gpkg").resolve())
    d = load_config(cfg_file, data_root=tmp_path / "data")["data"]
    assert d["img_dir"] == str((tmp_path / "data" / "rasters").resolve())
    monkeypatch.chdir(tmp_path / "cfgs")
    assert load_config("c.yaml")["data"]["img_dir"] == str((tmp_path / "cfgs" / "rasters").resolve())
    abs_cfg = _write(tmp_path / "abs.yaml", f"data:\n  type: fmow\n  img_dir: {tmp_path / 'x'}\n"
                                            "  mean: [0, 0, 0]\n  std: [1, 1, 1]\n")
    assert load_config(abs_cfg, data_root="/elsewhere")["data"]["img_dir"] == str(tmp_path / "x")


def test_overrides_applied_before_validation(tmp_path):
    cfg = load_config(CONFIG / "naip.yaml", data_root=tmp_path,
                      overrides=["data.length=10", "size=64", "data.mean=[0.1, 0.2, 0.3]", "data.aoi=aoi.geojson"])
    d = cfg["data"]
    assert d["length"] == 10 and d["size"] == 64 and d["mean"] == [0.1, 0.2, 0.3]
    assert d["aoi"] == str((tmp_path / "aoi.geojson").resolve())
    with pytest.raises(ConfigError, match="data.lenght"):
        load_config(CONFIG / "naip.yaml", overrides=["data.lenght=10"])
    with pytest.raises(ConfigError, match=r"data.length: expected an integer, got 'ten'"):
        load_config(CONFIG / "naip.yaml", overrides=["data.length=ten"])
    with pytest.raises(ConfigError, match="expected 'data.key=value'"):
        load_config(CONFIG / "naip.yaml", overrides=["data.length"])


def test_type_is_case_insensitive_and_defaults_filled():
    d = validate_config({"data": {"type": "SENTINEL2", "img_dir": "/x", "mean": [1], "std": [1]}})["data"]
    assert d["type"] == "sentinel2" and d["scale"] == 1.0 and d["oversample"] == 1.0 and d["min_valid"] == 0.0


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(CONFIG / "naip.yaml", data_root=tmp_path)
    out = save_config(cfg, tmp_path / "run" / "data_config.yaml")
    assert out.exists() and not list(out.parent.glob(".*tmp"))
    assert load_config(out) == cfg


@pytest.mark.parametrize("body,needle", [
    ("data:\n  type: fmow\n  img_dir: x\n  mean: [0,0,0]\n  std: [1,1,1]\n  colour: red\n", "data.colour: unknown key"),
    ("data:\n  type: fmow\n  img_dir: x\n  mean: abc\n  std: [1,1,1]\n",
     "data.mean: expected a non-empty list of numbers, got 'abc'"),
    ("data:\n  type: fmow\n  img_dir: x\n  mean: [0,0,0]\n  std: [1,1]\n", "data.std: expected 3 values"),
    ("data:\n  type: fmow\n  img_dir: x\n  mean: [0,0,0]\n  std: [1,1,1]\n  bands: [1,2,3]\n",
     "data.bands: not valid for type 'fmow'"),
    ("data:\n  type: imagenet\n  img_dir: x\n", "data.type: expected one of"),
    ("data:\n  img_dir: x\n", "data.type: required key missing"),
    ("data:\n  type: fmow\n  mean: [0,0,0]\n  std: [1,1,1]\n", "data.img_dir: required"),
    ("data:\n  type: naip\n  img_dir: x\n  mean: [0,0,0]\n  std: [1,1,1]\n  bands: [1,2]\n",
     "data.bands: expected 3 bands"),
    ("data:\n  type: naip\n  img_dir: x\n  mean: [0,0,0]\n  std: [1,1,1]\n  length: 1.5\n",
     "data.length: expected an integer, got 1.5"),
    ("data:\n  type: naip\n  img_dir: x\n  mean: [0,0,0]\n  std: [1,1,1]\n  min_valid: 2\n", "data.min_valid"),
    ("data:\n  type: fmow\n  img_dir: x\n  mean: [0,0,0]\n  std: [1,1,1]\nsampler: {}\n", "unknown top-level key"),
    ("data: [1, 2\n", "invalid YAML"),
])
def test_bad_config_names_file_and_key(tmp_path, body, needle):
    path = _write(tmp_path / "bad.yaml", body)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and needle in str(err.value)
    assert isinstance(err.value, ValueError)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")
