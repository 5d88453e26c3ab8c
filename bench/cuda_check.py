#!/usr/bin/env python
"""Correctness checks of the accelerator paths, in one short process (run before ``bench/run.py --suite gpu``).

    python bench/cuda_check.py [--device cuda] [--skip-compile]

Prints one JSON object:

* ``golden``: every ``tests/data/golden_*.pt`` fixture on the device in fp32 with TF32 off, reference and fast
  decoder: max error of the loss and predictions against SPEC section 4's tolerance (``ok``);
* ``compile``: the tiny model, one inductor-compiled forward + backward against eager on the device (loss and
  gradient errors), and the graph-break count of ``torch._dynamo.explain``;
* ``gpu_pipeline``: the device-side pipeline (nvJPEG on CUDA) against the CPU pipeline on synthetic JPEGs: max and
  mean absolute difference of the normalised targets (the decoder difference), and whether the res values are equal.

Runs on CPU as well (``--device cpu``), where everything must match to float rounding.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def _golden(device) -> dict:
    import torch

    import models_mae
    from conftest import norm_layer_from_string

    out = {}
    for path in sorted((REPO / "tests" / "data").glob("golden_*.pt")):
        record = torch.load(path, weights_only=True)
        kwargs = dict(record["kwargs"])
        kwargs["norm_layer"] = norm_layer_from_string(kwargs.get("norm_layer", "LayerNorm(eps=1e-6)"))
        inp, exp = record["inputs"], record["outputs"]
        for fast in (False, True):
            model = models_mae.MaskedAutoencoderViT(**kwargs)
            model.load_state_dict(record["state_dict"], strict=True)
            model.to(device).train().set_fast_decoder(fast)
            loss, preds, mask, *_ = model(
                inp["imgs"].to(device), inp["targets"].to(device), mask_ratio=inp["mask_ratio"],
                input_res=inp["input_res"].to(device), target_res=inp["target_res"].to(device),
                noise=inp["noise"].to(device))
            errs = {"loss_rel": abs(loss.item() - exp["loss"].item()) / abs(exp["loss"].item())}
            ok = errs["loss_rel"] <= 1e-5 and torch.equal(mask.cpu(), exp["mask"])
            for name, a, e in zip(("pred_high", "pred_low", "pred_all"), preds, exp["pred"]):
                err = (a.float().cpu() - e.float()).abs().max().item()
                errs[name] = err
                ok = ok and err <= 1e-5 + 1e-5 * e.abs().max().item()
            out[f"{path.stem}/{'fast' if fast else 'reference'}"] = {"ok": ok, **errs}
    return out


def _compile(device) -> dict:
    import torch

    import models_mae
    from conftest import TINY_MAE
    from util.accel import CompiledWithFallback

    torch.manual_seed(0)
    model = models_mae.MaskedAutoencoderViT(**TINY_MAE).to(device)
    model.set_fast_decoder(device.type == "cpu")
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(2, 3, 64, 64, generator=g).to(device)
    targets = torch.randn(2, 3, 128, 128, generator=g).to(device)
    noise = torch.rand(2, 16, generator=g).to(device)
    explained = torch._dynamo.explain(model)(imgs, targets, noise=noise, loss_only=True)
    loss = model(imgs, targets, noise=noise, loss_only=True)
    loss.backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    compiled = CompiledWithFallback(model)
    t0 = time.time()
    loss_c = compiled(imgs, targets, noise=noise, loss_only=True)
    loss_c.backward()
    grad_err = max((p.grad - eager[n]).abs().max().item() for n, p in model.named_parameters() if n in eager)
    return {"graph_breaks": explained.graph_break_count, "graphs": explained.graph_count,
            "compile_failed": compiled.failed, "compile_s": time.time() - t0,
            "loss_rel": abs(loss_c.item() - loss.item()) / abs(loss.item()), "max_grad_err": grad_err,
            "ok": compiled.failed is None and explained.graph_break_count == 0
            and abs(loss_c.item() - loss.item()) <= 1e-5 * abs(loss.item())}


def _pipeline(device) -> dict:
    import argparse as ap

    import numpy as np
    import torch
    from PIL import Image

    from dataloaders.builders import build_pretrain_dataset, build_pretrain_sampler
    from dataloaders.gpu_pipeline import build_gpu_pipeline_loader
    from dataloaders.seeding import SeededDataset, SeededSampler

    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        for i in range(8):
            folder = Path(tmp) / f"c{i % 2}"
            folder.mkdir(exist_ok=True)
            img = rng.integers(0, 255, (300 + 20 * i, 260, 3), dtype=np.uint8)
            img = np.asarray(Image.fromarray(img).resize((130, 150 + 10 * i)).resize((260, 300 + 20 * i)))
            Image.fromarray(img).save(folder / f"img_{i}_rgb.jpg", quality=90)
        cfg = {"data": {"type": "fmow", "img_dir": tmp, "mean": [0.4, 0.4, 0.4], "std": [0.2, 0.2, 0.2]}}
        args = ap.Namespace(input_size=112, target_size=[224], scale_min=0.2, scale_max=1.0, base_resolution=2.5,
                            world_size=1, rank=0, seed=0, batch_size=4, num_workers=0)
        batches, _, _ = build_gpu_pipeline_loader(args, cfg, device)
        ds = build_pretrain_dataset(cfg, input_size=112, target_size=224, seed=0)
        loader = torch.utils.data.DataLoader(SeededDataset(ds, 0), sampler=SeededSampler(
            build_pretrain_sampler(ds, cfg, seed=0)), batch_size=4, drop_last=True)
        diffs, res_equal = [], True
        for (_, in_res, tgt, t_res), (_, r_in, r_tgt, r_t) in zip(batches, loader):
            diffs.append((tgt.cpu() - r_tgt).abs())
            res_equal = res_equal and torch.equal(t_res, r_t) and torch.allclose(in_res, r_in)
        d = torch.cat([x.flatten() for x in diffs])
        return {"max_abs_diff": d.max().item(), "mean_abs_diff": d.mean().item(), "res_equal": res_equal,
                "ok": res_equal and (d.max().item() < 1e-4 if device.type == "cpu" else True)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--skip-compile", action="store_true")
    args = parser.parse_args()
    import torch

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__}
    report["golden"] = _golden(device)
    report["gpu_pipeline"] = _pipeline(device)
    if not args.skip_compile:
        report["compile"] = _compile(device)
    ok = all(v["ok"] for v in report["golden"].values()) and report["gpu_pipeline"]["ok"] \
        and report.get("compile", {"ok": True})["ok"]
    report["ok"] = ok
    print(json.dumps(report, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
