"""``--compile``: the model traces as one graph (no graph break in the encoder/decoder step, reference and fast
decoder), one compiled training step equals eager, and a compiler failure falls back to eager with a warning that
names the real error while the model's own errors still propagate."""
from __future__ import annotations

import argparse

import pytest
import torch
import torch._inductor.config

import models_vit
from conftest import DATA_DIR

REPO = DATA_DIR.parent.parent
from util.accel import CompiledWithFallback, apply_model_options, maybe_compile, use_fast_decoder


def _inputs(n=2, side=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    grid = side // 16
    res = torch.tensor([0.5, 2.0])
    return dict(imgs=torch.randn(n, 3, side, side, generator=g),
                targets=torch.randn(n, 3, 32 * grid, 32 * grid, generator=g),
                noise=torch.rand(n, grid * grid, generator=g), input_res=res, target_res=res)


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("ckpt", [None, "heads"])
def test_training_step_traces_without_graph_breaks(tiny_mae, fast, ckpt):
    model = tiny_mae()
    model.set_fast_decoder(fast)
    if ckpt:
        model.set_grad_checkpointing(True, scope=ckpt)
    kw = _inputs()
    explained = torch._dynamo.explain(model)(kw.pop("imgs"), kw.pop("targets"), loss_only=True, **kw)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_knn_features_and_classifier_trace_without_graph_breaks(tiny_mae):
    model = tiny_mae().eval()
    explained = torch._dynamo.explain(model)(torch.randn(2, 3, 64, 64), input_res=1.5, knn_feats=True)
    assert explained.graph_break_count == 0, explained.break_reasons
    vit = models_vit.VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2,
                                       num_classes=3).eval()
    explained = torch._dynamo.explain(vit)(torch.randn(2, 3, 32, 32), input_res=torch.tensor([1.0, 2.0]))
    assert explained.graph_break_count == 0, explained.break_reasons


def test_compiled_training_step_equals_eager(tiny_mae):
    """One inductor-compiled forward + backward (mode default, the CPU launch configuration: fast decoder) against
    eager: loss and every gradient within the golden fixture's tolerances."""
    model = tiny_mae()
    apply_model_options(model, argparse.Namespace(fast_decoder="auto", grad_checkpointing=None), "cpu")
    assert model.fast_decoder
    kw = _inputs()
    loss = model(kw["imgs"], kw["targets"], noise=kw["noise"], input_res=kw["input_res"],
                 target_res=kw["target_res"], loss_only=True)
    loss.backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    compiled = maybe_compile(model, argparse.Namespace(compile=True, compile_mode="default"))
    with torch._inductor.config.patch(compile_threads=1):  # no worker pool: faster on CI's 2 cores
        loss_c = compiled(kw["imgs"], kw["targets"], noise=kw["noise"], input_res=kw["input_res"],
                          target_res=kw["target_res"], loss_only=True)
        loss_c.backward()
    assert compiled.failed is None
    assert abs(loss_c.item() - loss.item()) <= 1e-5 * abs(loss.item())
    for name, g in eager.items():
        p = dict(model.named_parameters())[name]
        tol = 1e-5 + 1e-5 * g.abs().max().item()
        assert (p.grad - g).abs().max().item() <= 10 * tol, name


def _failing_backend(gm, example_inputs):
    raise RuntimeError("the backend cannot lower aten.frobnicate")


def test_compiler_failure_falls_back_to_eager_naming_the_error(tiny_mae, capsys):
    model = tiny_mae()
    wrapped = CompiledWithFallback(model, backend=_failing_backend)
    kw = _inputs()
    out = wrapped(kw["imgs"], kw["targets"], noise=kw["noise"], loss_only=True)
    expected = model(kw["imgs"], kw["targets"], noise=kw["noise"], loss_only=True)
    assert torch.equal(out, expected)
    printed = capsys.readouterr().out
    assert printed.count("WARNING: torch.compile") == 1
    assert "RuntimeError: the backend cannot lower aten.frobnicate" in printed and "running eager" in printed
    wrapped(kw["imgs"], kw["targets"], noise=kw["noise"], loss_only=True)  # eager from now on, no second warning
    assert "WARNING" not in capsys.readouterr().out
    # attribute reads reach the model (kNN feature extraction reads embed_dim / cls_token)
    assert wrapped.embed_dim == model.embed_dim and wrapped.cls_token is model.cls_token
    assert list(wrapped.module.state_dict()) == list(model.state_dict())


def test_model_errors_propagate_without_a_compile_warning(tiny_mae, capsys):
    wrapped = CompiledWithFallback(tiny_mae(), backend="eager")
    with pytest.raises(ValueError, match="targets must be"):
        wrapped(torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64))
    assert "WARNING" not in capsys.readouterr().out and wrapped.failed is None


def test_switches():
    assert use_fast_decoder("auto", "cpu") and not use_fast_decoder("auto", "cuda")
    assert use_fast_decoder("on", "cuda") and not use_fast_decoder("off", "cpu")
    with pytest.raises(ValueError, match="--fast_decoder"):
        use_fast_decoder("fast", "cpu")
    model = torch.nn.Linear(2, 2)
    assert maybe_compile(model, argparse.Namespace(compile=False)) is model


@pytest.fixture
def light_compile(monkeypatch):
    """``torch.compile`` with dynamo's ``eager`` backend (the model is traced into graphs, no code generation),
    counting calls: the launcher wiring is what is tested here, inductor's numerics above."""
    real, calls = torch.compile, []

    def compile_(model, **kwargs):
        calls.append(kwargs.get("mode"))
        return real(model, backend="eager")

    monkeypatch.setattr(torch, "compile", compile_)
    return calls


def test_pretrain_launcher_compiles_training_and_knn(tmp_path, light_compile, capsys):
    import json

    import main_pretrain

    out = tmp_path / "run"
    argv = ["--config", "config/demo.yaml", "--model", "mae_vit_tiny_patch16", "--input_size", "32", "--batch_size",
            "8", "--epochs", "1", "--warmup_epochs", "1", "--device", "cpu", "--num_workers", "0", "--output_dir",
            str(out), "--log_dir", str(out), "--print_freq", "4", "--data_override", "data.length=32",
            "--eval_dataset", "demo", "--eval_scale", "32", "--knn_eval_freq", "1", "--compile", "--compile_mode",
            "max-autotune-no-cudagraphs"]
    import os

    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        result = main_pretrain.main(main_pretrain.get_args_parser().parse_args(argv))
    finally:
        os.chdir(cwd)
    assert light_compile == ["max-autotune-no-cudagraphs"]  # one wrapper serves training and kNN
    assert "WARNING: torch.compile" not in capsys.readouterr().out
    assert "knn_epoch0" in result and "knn_epoch1" in result
    assert json.loads((out / "log.txt").read_text().splitlines()[-1])["train_loss"] > 0
    state = torch.load(out / "checkpoint-latest.pth", weights_only=True)["model"]
    assert "patch_embed.proj.weight" in state  # saved from the unwrapped model: the original's keys


def test_linprobe_launcher_compiles(tmp_path, light_compile):
    import main_linprobe
    from dataloaders.synthetic import make_scene_folder

    make_scene_folder(tmp_path / "train", 2, per_class=8, size=32, seed=0)
    make_scene_folder(tmp_path / "val", 2, per_class=4, size=32, seed=1)
    (tmp_path / "train.yaml").write_text("data:\n  type: resisc\n  img_dir: train\n  mean: [0.5, 0.5, 0.5]\n"
                                         "  std: [0.2, 0.2, 0.2]\n")
    out = tmp_path / "probe"
    argv = ["--config", str(tmp_path / "train.yaml"), "--eval_dataset", "resisc", "--eval_path",
            str(tmp_path / "val"), "--model", "vit_tiny_patch16", "--input_size", "32", "--eval_scale", "32",
            "--device", "cpu", "--num_workers", "0", "--batch_size", "8", "--epochs", "1", "--finetune",
            "--allow_random_init", "--output_dir", str(out), "--log_dir", str(out), "--compile"]
    result = main_linprobe.main(main_linprobe.get_args_parser().parse_args(argv))
    assert light_compile == ["default"]
    assert result["history"] and "head.1.weight" in torch.load(out / "checkpoint-latest.pth",
                                                                  weights_only=True)["model"]


def test_segment_launcher_compiles(tmp_path, light_compile, capsys):
    import main_segment
    from dataloaders.seg_synthetic import make_building_scenes

    scenes = make_building_scenes(tmp_path / "scenes", n_train=1, n_val=1, size=64, count=3)
    out = tmp_path / "seg"
    argv = ["--config", str(scenes["config"]), "--model", "vit_tiny_patch16", "--allow_random_init", "--input_size",
            "32", "--batch_size", "2", "--epochs", "1", "--head_channels", "8", "--aux_channels", "0", "--device",
            "cpu", "--num_workers", "0", "--print_freq", "100", "--output_dir", str(out), "--log_dir", str(out),
            "--data_override", "data.length=2", "data.size=32", "--compile"]
    result = main_segment.main(main_segment.get_args_parser().parse_args(argv))
    assert light_compile == ["default"]  # one wrapper serves training and evaluation
    assert "WARNING: torch.compile" not in capsys.readouterr().out
    assert result["history"] and result["eval"]["scales"]
    state = torch.load(out / "checkpoint-latest.pth", weights_only=True)["model"]
    assert "backbone.patch_embed.proj.weight" in state  # saved from the unwrapped model
