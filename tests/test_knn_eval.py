"""kNN evaluation: exact bank across ranks, multiscale table and reports, --eval_only on a bare checkpoint."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import TensorDataset

import main_pretrain
import models_mae
from util.knn_eval import ShardSampler, eval_res, evaluate_knn, extract_features, format_table, save_knn_report


class Encoder(torch.nn.Module):
    """Stand-in with the knn_feats interface: the feature is the mean colour plus the res it was given."""

    embed_dim = 4

    def forward(self, x, input_res=None, knn_feats=False):
        assert knn_feats
        return torch.cat([x.mean(dim=(2, 3)), torch.full((x.shape[0], 1), float(input_res))], dim=1)


def labelled_set(n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    imgs = torch.randn(n, 3, 16, 16, generator=g) * 0.1 + labels.view(-1, 1, 1, 1).float()
    return TensorDataset(imgs, labels)


def _gather_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ds = labelled_set(7)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, sampler=ShardSampler(ds))
    feats, labels = extract_features(Encoder(), loader, 16, 1.0, torch.device("cpu"))
    if rank == 0:
        torch.save({"feats": feats, "labels": labels}, out)
    dist.destroy_process_group()


def test_bank_is_exactly_the_dataset_under_two_ranks(tmp_path):
    """7 samples over 2 ranks (4 + 3): the gathered bank has 7 rows, each sample once, no padding."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "bank.pt"
    mp.start_processes(_gather_worker, args=(2, port, str(out)), nprocs=2, join=True, start_method="fork")
    bank = torch.load(out, weights_only=True)
    ds = labelled_set(7)
    assert bank["feats"].shape == (7, 4)
    expected = torch.cat([ds.tensors[0].mean(dim=(2, 3)), torch.ones(7, 1)], dim=1)
    order = [0, 2, 4, 6, 1, 3, 5]  # rank 0 then rank 1 shards
    torch.testing.assert_close(bank["feats"], expected[order])
    assert bank["labels"].tolist() == ds.tensors[1][order].tolist()


def test_multiscale_table_and_reports(tmp_path):
    train, val = labelled_set(30, 0), labelled_set(9, 1)
    result = evaluate_knn(Encoder(), train, val, scales=(8, 16), ks=(1, 5), eval_gsd=True, base_resolution=2.0,
                          batch_size=4)
    assert list(result["scales"]) == [8, 16]
    assert result["bank_size"] == 30 and result["num_queries"] == 9
    assert result["scales"][8]["res"] == pytest.approx(2.0 * 224 / 8)
    assert result["scales"][16]["k"][1]["top1"] == 100.0  # classes separate by colour
    table = format_table(result)
    assert len(table.splitlines()) == 2 + 2 + 1 and "| mean |" in table  # header, rule, one row per scale, mean
    paths = save_knn_report(result, tmp_path)
    assert json.loads(paths["json"].read_text())["bank_size"] == 30
    assert paths["png"].stat().st_size > 1000
    assert eval_res(56, 1.0, False) == 1.0 and eval_res(56, 1.0, True) == 4.0


def test_eval_only_infers_the_architecture_from_shapes(tmp_path, capsys):
    """README's kNN command without --model: a bare {'model': sd} checkpoint identifies its factory."""
    torch.manual_seed(0)
    ckpt = tmp_path / "bare.pth"
    torch.save({"model": models_mae.mae_vit_tiny_patch16(img_size=32).state_dict()}, ckpt)
    out = tmp_path / "eval"
    args = main_pretrain.get_args_parser().parse_args(
        ["--resume", str(ckpt), "--eval_only", "--eval_dataset", "demo", "--eval_scale", "32", "64",
         "--device", "cpu", "--num_workers", "0", "--output_dir", str(out), "--knn_ks", "5", "20"])
    result = main_pretrain.main(args)
    printed = capsys.readouterr().out
    assert "the checkpoint is mae_vit_tiny_patch16" in printed
    assert set(result["scales"]) == {32, 64} and set(result["scales"][32]["k"]) == {5, 20}
    assert (out / "knn.json").is_file() and (out / "knn.png").is_file()


def test_eval_only_with_the_wrong_model_names_the_shapes(tmp_path):
    ckpt = tmp_path / "bare.pth"
    torch.save({"model": models_mae.mae_vit_tiny_patch16(img_size=32).state_dict()}, ckpt)
    args = main_pretrain.get_args_parser().parse_args(
        ["--resume", str(ckpt), "--eval_only", "--eval_dataset", "demo", "--model", "mae_vit_base_patch16",
         "--device", "cpu", "--num_workers", "0", "--output_dir", str(tmp_path / "e")])
    with pytest.raises(SystemExit, match=r"checkpoint \(1, 1, 192\) vs model \(1, 1, 768\)"):
        main_pretrain.main(args)
