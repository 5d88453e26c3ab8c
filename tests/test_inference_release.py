"""main_embed.py on a checkpoint in the released file's layout (issue 20: "works from the released checkpoint").

The release (``scalemae-vitlarge-800.pth``) is the original ``save_model`` dict: ``model`` (the whole pretraining
model, decoder and both FCN heads included: ``decoder_depth=3``, ``fcn_layers=2``, ``independent_fcn_head``),
``optimizer``, ``epoch``, ``scaler`` and ``args`` as a pickled ``argparse.Namespace`` holding ``pathlib`` paths.
Downloading it is not possible in tests; this file has that layout at ViT-Tiny width, so the loading path (the
allow-listed unpickling, the decoder dropped, the encoder's size read from the tensors) is the release's."""
from __future__ import annotations

import argparse
from pathlib import PosixPath

import numpy as np
import pytest
import torch
from affine import Affine

import main_embed
from tests.raster_reference import fake_values, write_tile

SIZE = 32


def test_released_layout_gives_the_encoders_embeddings(tmp_path):
    pytest.importorskip("pyarrow", reason="GeoParquet needs pyarrow (install_requires)")
    import geopandas as gpd

    import models_mae
    import models_vit
    from util.gsd import window_res
    from util.weights import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(0)
    mae = models_mae.MaskedAutoencoderViT(img_size=64, embed_dim=192, depth=12, num_heads=3, decoder_embed_dim=64,
                                          decoder_depth=3, decoder_num_heads=4, fcn_dim=64, fcn_layers=2,
                                          independent_fcn_head=True)
    original_args = argparse.Namespace(model="mae_vit_tiny_patch16", input_size=64, output_dir=PosixPath("output"),
                                       log_dir=PosixPath("output"), base_resolution=2.5, epochs=800)
    release = tmp_path / "release_layout.pth"
    torch.save({"model": mae.state_dict(), "optimizer": {"state": {}, "param_groups": []}, "epoch": 799,
                "scaler": {"scale": 65536.0}, "args": original_args}, release)  # pickled Namespace, as the original
    arr = fake_values(3, 64, 96, seed=4)
    raster = write_tile(tmp_path / "utm.tif", arr, Affine(0.5, 0, 500000.0, 0, -0.5, 4200000.0), "EPSG:32610")
    out = tmp_path / "emb.parquet"
    main_embed.main(main_embed.get_args_parser().parse_args(
        ["--input", str(raster), "--checkpoint_path", str(release), "--input_size", str(SIZE), "--scale", "3000",
         "--gsd", "0.5", "--output", str(out), "--device", "cpu"]))
    gdf = gpd.read_parquet(out)
    assert len(gdf) == 2 * 3 and len(gdf["embedding_cls"].iloc[0]) == 192

    # the same windows through the encoder directly: the release's encoder tensors, ImageNet normalisation
    enc = models_vit.VisionTransformer(img_size=64, embed_dim=192, depth=12, num_heads=3, num_classes=0)
    models_vit.load_mae_checkpoint(enc, str(release))
    enc.eval()
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    for _, row in gdf.iterrows():
        pixels = torch.from_numpy(arr[:, row["row"]:row["row"] + SIZE, row["col"]:row["col"] + SIZE] / 3000.0)
        x = ((pixels.float() - mean) / std)[None]
        with torch.no_grad():
            tokens = enc.forward_features(x, torch.tensor([window_res(SIZE, SIZE, 1.0) * row["res"]]))
        np.testing.assert_allclose(np.asarray(row["embedding_cls"]), tokens[0, 0].numpy(), atol=2e-5)
        np.testing.assert_allclose(np.asarray(row["embedding_mean"]), tokens[0, 1:].mean(0).numpy(), atol=2e-5)
