"""main_embed.py on folders of plain images (issue 20): blocks of ``--batch_size`` images sharded over ranks and
resumed after a kill under the same block-store rules as rasters. Tiny MAE, five PNGs of a few dozen px."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.tiling import BlockStore
from tests.test_inference import launch

SIZE = 32


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict:
    """Five RGB PNGs of different sizes, a tiny MAE checkpoint and the one-process reference output."""
    pytest.importorskip("pyarrow", reason="GeoParquet needs pyarrow (install_requires)")
    import models_mae
    from PIL import Image

    root = tmp_path_factory.mktemp("photos")
    torch.manual_seed(0)
    ckpt = root / "mae.pth"
    torch.save({"model": models_mae.MODELS["mae_vit_tiny_patch16"]().state_dict(),
                "args": {"model": "mae_vit_tiny_patch16"}}, ckpt)
    folder = root / "photos"
    folder.mkdir()
    rng = np.random.default_rng(7)
    for i, side in enumerate((32, 48, 64, 40, 32)):
        Image.fromarray(rng.integers(0, 256, (side, side + 8 * i, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    single = root / "single.parquet"
    proc = launch(argv(ckpt, folder, single))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": root, "ckpt": ckpt, "folder": folder, "single": single}


def argv(ckpt: Path, folder: Path, out: Path, *extra: str) -> list[str]:
    """Blocks of 2 images: 3 blocks for the 5 images (rank 0 takes blocks 0 and 2, rank 1 block 1)."""
    return ["--input", str(folder), "--checkpoint_path", str(ckpt), "--input_size", str(SIZE), "--scale", "255",
            "--gsd", "0.5", "--output", str(out), "--device", "cpu", "--batch_size", "2", *extra]


def test_two_processes_equal_one(photos, tmp_path):
    import geopandas as gpd

    out = tmp_path / "ddp.parquet"
    proc = launch(argv(photos["ckpt"], photos["folder"], out), torchrun=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote 5 image embeddings") == 1  # rank 0 writes the file
    a, b = gpd.read_parquet(photos["single"]), gpd.read_parquet(out)
    assert list(a["source"]) == [str(photos["folder"] / f"p{i}.png") for i in range(5)]  # in file order
    cols = ["source", "tile", "height", "width", "gsd", "gsd_read", "res"]
    assert a[cols].equals(b[cols])
    for col in ("embedding_cls", "embedding_mean"):
        np.testing.assert_allclose(np.stack(a[col]), np.stack(b[col]), atol=1e-5, rtol=1e-5)
    assert not (tmp_path / "ddp.parquet.blocks").exists()


def test_resume_after_sigkill_gives_the_same_file(photos, tmp_path):
    out = tmp_path / "resumed.parquet"
    args = argv(photos["ckpt"], photos["folder"], out)
    killed = launch(args, env={"SCALEMAE_FAULT": "after_rename:2:g*.npz"})  # killed after its second block
    assert killed.returncode == -9, killed.stderr[-2000:]
    blocks = out.parent / f"{out.name}.blocks"
    assert not out.exists() and sorted(p.name for p in blocks.glob("*.npz")) == [
        "g00-t00000-r0000000.npz", "g00-t00000-r0000001.npz"]
    manifest = json.loads((blocks / BlockStore.MANIFEST).read_text())
    assert manifest["images"] == 5 and manifest["images_per_block"] == 2
    resumed = launch(args + ["--debug"], env={"SCALEMAE_FAULT": "after_rename:1:g00-t00000-r000000[01].npz"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]  # finished blocks are not written again (no kill)
    assert "resuming: 2 of 3 blocks of 2 images already done" in resumed.stdout
    assert out.read_bytes() == photos["single"].read_bytes()
    assert not blocks.exists()


def test_other_settings_are_refused_and_bad_images_are_one_line(photos, tmp_path, capsys):
    """A block folder of a run with other settings is refused (not mixed in); an unreadable image is one line
    before any block is written (every rank reads the headers first)."""
    import harness
    import main_embed

    def error_line(args: list[str]) -> str:
        with pytest.raises(SystemExit) as exc:
            harness.run(main_embed.main, main_embed.get_args_parser(), args)
        text = capsys.readouterr().err
        lines = [ln for ln in text.splitlines() if ln.startswith("error:")]
        assert exc.value.code == 2 and len(lines) == 1 and "Traceback" not in text, text
        return lines[0]

    BlockStore(tmp_path / "o.parquet.blocks").open({"images_per_block": 3})
    line = error_line(argv(photos["ckpt"], photos["folder"], tmp_path / "o.parquet"))
    assert "holds the blocks of a run with other settings" in line and "--overwrite" in line, line
    assert sorted(p.name for p in (tmp_path / "o.parquet.blocks").iterdir()) == [BlockStore.MANIFEST]
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in photos["folder"].iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    (bad / "p9.png").write_bytes(b"not a png")
    line = error_line(argv(photos["ckpt"], bad, tmp_path / "b.parquet"))
    assert f"{bad / 'p9.png'}: not a readable image" in line, line
    assert not (tmp_path / "b.parquet").exists() and not (tmp_path / "b.parquet.blocks").exists()
