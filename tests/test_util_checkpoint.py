"""Tests for util/checkpoint.py: atomic save, weights_only loading with the legacy allow-list, URLs, errors."""
from __future__ import annotations

import argparse
import pathlib
import pickle

import pytest
import torch

from util import checkpoint as ckpt
from util.checkpoint import (CheckpointError, args_to_plain, describe_state_dict_mismatch, find_latest_checkpoint,
                             load_checkpoint, save_checkpoint, url_cache_path)


class ExplodesWhenPickled:
    def __reduce__(self):
        raise RuntimeError("boom while pickling")


class CustomThing:
    """A user class: not on the allow-list."""

    def __init__(self) -> None:
        self.x = 1


class OpensAFile:
    """Unpickling this would call builtins.open (code execution); it must be refused before that happens."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def _payload() -> dict:
    return {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "epoch": 3}


def test_save_roundtrip_and_plain_weights_only(tmp_path):
    path = tmp_path / "sub" / "checkpoint-3.pth"
    args = argparse.Namespace(output_dir=pathlib.Path("/out"), input_size=(224, 224), lr=1e-3)
    save_checkpoint({**_payload(), "args": args}, path)
    # plain torch.load with weights_only works: args was stored as plain data
    raw = torch.load(path, weights_only=True)
    assert raw["args"] == {"output_dir": "/out", "input_size": [224, 224], "lr": 1e-3}
    assert torch.equal(raw["model"]["w"], torch.arange(6.0).reshape(2, 3))
    assert raw["epoch"] == 3


def test_atomic_save_keeps_previous_file_on_failure(tmp_path):
    path = tmp_path / "checkpoint-latest.pth"
    save_checkpoint(_payload(), path)
    before = path.read_bytes()
    bad = {"model": {"w": torch.zeros(1000)}, "extra": ExplodesWhenPickled()}
    with pytest.raises(RuntimeError, match="boom while pickling"):
        save_checkpoint(bad, path)
    assert path.read_bytes() == before
    assert load_checkpoint(path)["epoch"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-latest.pth"]  # no temp file left


def test_saved_file_has_normal_permissions(tmp_path):
    path = save_checkpoint(_payload(), tmp_path / "c.pth")
    from util.io import _umask

    mask = _umask()
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_legacy_namespace_and_paths_load_with_allow_list(tmp_path):
    path = tmp_path / "legacy.pth"
    args = argparse.Namespace(output_dir=pathlib.PosixPath("/tmp/run"), log_dir=pathlib.PurePosixPath("logs"),
                              win=pathlib.PureWindowsPath("C:/data"), input_size=(224, 448), blr=1.5e-4,
                              eval_scale=[56, 112], model="mae_vit_large_patch16", resume=None)
    torch.save({**_payload(), "args": args}, path)  # like the original scripts
    with pytest.raises(pickle.UnpicklingError):  # proves the allow-list is what makes it load
        torch.load(path, weights_only=True)
    out = load_checkpoint(path)
    assert out["args"] == {"output_dir": "/tmp/run", "log_dir": "logs", "win": "C:\\data", "input_size": [224, 448],
                           "blr": 1.5e-4, "eval_scale": [56, 112], "model": "mae_vit_large_patch16", "resume": None}
    assert torch.equal(out["model"]["w"], torch.arange(6.0).reshape(2, 3))


def test_disallowed_global_is_refused_with_names(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({**_payload(), "thing": CustomThing()}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "CustomThing" in str(info.value) and str(path) in str(info.value)


def test_code_executing_global_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil2.pth"
    torch.save({"model": {}, "x": OpensAFile(str(marker))}, path)
    with pytest.raises(CheckpointError, match=r"(io|builtins)\.open"):
        load_checkpoint(path)
    assert not marker.exists()


def test_file_url(tmp_path):
    path = tmp_path / "dir with space" / "c.pth"
    save_checkpoint(_payload(), path)
    out = load_checkpoint(path.as_uri())
    assert out["epoch"] == 3


def test_http_url_downloads_into_torch_home_cache(tmp_path, monkeypatch):
    src = tmp_path / "src.pth"
    save_checkpoint(_payload(), src)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    calls = []

    def fake_download(url, dst, progress=True):
        calls.append(url)
        pathlib.Path(dst).write_bytes(src.read_bytes())

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    url = "https://example.invalid/weights/scalemae-test.pth"
    assert load_checkpoint(url)["epoch"] == 3
    cached = url_cache_path(url)
    assert cached.parent == tmp_path / "th" / "hub" / "checkpoints" and cached.name.endswith("-scalemae-test.pth")
    assert cached.is_file()
    assert load_checkpoint(url)["epoch"] == 3
    assert calls == [url]  # second load reused the cache


def test_url_cache_is_keyed_by_the_full_url_and_verified(tmp_path, monkeypatch):
    """Two URLs with the same file name get their own files; #sha256=/#size= are checked (a wrong one is an error
    and leaves nothing cached)."""
    import hashlib

    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    save_checkpoint({**_payload(), "epoch": 1}, a)
    save_checkpoint({**_payload(), "epoch": 2}, b)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    sources = {"https://h.invalid/a/ckpt.pth": a, "https://h.invalid/b/ckpt.pth": b}

    def fake_download(url, dst, progress=True):
        pathlib.Path(dst).write_bytes(sources[url].read_bytes())

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    assert load_checkpoint("https://h.invalid/a/ckpt.pth")["epoch"] == 1
    assert load_checkpoint("https://h.invalid/b/ckpt.pth")["epoch"] == 2  # not the cached a/ckpt.pth
    good = hashlib.sha256(b.read_bytes()).hexdigest()
    assert load_checkpoint(f"https://h.invalid/b/ckpt.pth#sha256={good}")["epoch"] == 2
    with pytest.raises(CheckpointError, match="does not match sha256=00"):
        load_checkpoint("https://h.invalid/b/ckpt.pth#sha256=00ff")
    assert not url_cache_path("https://h.invalid/b/ckpt.pth").exists()
    with pytest.raises(CheckpointError, match="size=5"):
        load_checkpoint("https://h.invalid/a/ckpt.pth#size=5")


def test_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(tmp_path / "nope.pth")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "text"])
def test_corrupt_file_error_names_file(tmp_path, damage):
    path = tmp_path / f"{damage}.pth"
    save_checkpoint({"model": {"w": torch.randn(256, 256)}}, path)
    data = path.read_bytes()
    # "text": a first byte 'c' is pickle's GLOBAL opcode, so torch names "orrupt." as a global: still corrupt, not unsafe
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"not a checkpoint" * 10, "empty": b"",
                      "text": b"corrupt\n"}[damage])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "corrupt" in message.replace(str(path), "")
    assert "refusing" not in message and "run code" not in message


def test_non_dict_checkpoint_rejected(tmp_path):
    path = tmp_path / "t.pth"
    torch.save(torch.zeros(2), path)
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint(path)


def test_args_to_plain_types():
    class Color:  # arbitrary object -> repr
        def __repr__(self) -> str:
            return "Color()"

    ns = argparse.Namespace(p=pathlib.Path("/a/b"), t=(1, (2, 3)), d={"k": pathlib.Path("x"), 1: 2},
                            dev=torch.device("cpu"), n=torch.tensor(2.5), s={3, 1}, o=Color(),
                            inner=argparse.Namespace(z=1))
    assert args_to_plain(ns) == {"p": "/a/b", "t": [1, [2, 3]], "d": {"k": "x", "1": 2}, "dev": "cpu", "n": 2.5,
                                 "s": [1, 3], "o": "Color()", "inner": {"z": 1}}
    assert args_to_plain(None) == {}
    with pytest.raises(TypeError):
        args_to_plain(5)


def test_find_latest_checkpoint(tmp_path):
    assert find_latest_checkpoint(tmp_path / "missing") is None
    assert find_latest_checkpoint(tmp_path) is None
    for name in ["checkpoint-2.pth", "checkpoint-10.pth", "checkpoint-9.pth", ".checkpoint-11.pth.abc.tmp", "log.txt"]:
        (tmp_path / name).write_bytes(b"x")
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10.pth"
    (tmp_path / "checkpoint-latest.pth").write_bytes(b"x")
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-latest.pth"


def test_describe_state_dict_mismatch():
    model = {"a": torch.zeros(2, 3), "b": torch.zeros(4), "head.weight": torch.zeros(10, 4)}
    ck = {"a": torch.zeros(2, 3), "head.weight": torch.zeros(62, 4), "decoder.x": torch.zeros(1)}
    msg = describe_state_dict_mismatch(model, ck)
    assert "missing keys (1): b" in msg
    assert "unexpected keys (1): decoder.x" in msg
    assert "head.weight: checkpoint (62, 4) vs model (10, 4)" in msg
    assert describe_state_dict_mismatch(model, dict(model)) == ""
    many = describe_state_dict_mismatch({f"k{i}": torch.zeros(1) for i in range(30)}, {}, limit=5)
    assert "missing keys (30)" in many and "and 25 more" in many
