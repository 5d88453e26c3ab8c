"""The pretraining step does not wait for the device: losses are checked and logged at print / checkpoint steps,
and a non-finite loss still stops the run before any checkpoint is written."""
from __future__ import annotations

import argparse
import traceback

import pytest
import torch

import engine_pretrain


class ScriptedLoss(torch.nn.Module):
    """Returns ``w * 0 + losses[call]`` (NaN where scripted), with a gradient for the optimizer."""

    def __init__(self, losses):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))
        self.losses, self.calls = losses, 0

    def forward(self, imgs, targets, **kwargs):
        value = self.losses[self.calls]
        self.calls += 1
        return (self.w * self.w).sum() * 0 + value


def _args(**kw):
    base = dict(accum_iter=1, print_freq=100, batch_size=2, mask_ratio=0.75, clip_grad=None, lr=1e-3, min_lr=1e-3,
                warmup_epochs=0, epochs=1, source_size=[32], source_size_scheduler="constant", input_size=32,
                patch_size=16, seed=0, output_dir="out", save_every_steps=0)
    return argparse.Namespace(**{**base, **kw})


def _batches(n):
    return [(torch.zeros(2, 3, 32, 32), torch.ones(2), torch.zeros(2, 3, 64, 64), torch.ones(2))] * n


def _run(model, args, steps, on_step_end=None):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    amp = engine_pretrain.AmpConfig("none", torch.device("cpu"))
    return engine_pretrain.train_one_epoch(model, _batches(steps), opt, torch.device("cpu"), 0, amp, args,
                                           on_step_end=on_step_end)


def test_non_finite_loss_stops_before_the_next_checkpoint_step():
    losses = [1.0, 1.0, 1.0, float("nan"), 1.0, 1.0, 1.0, 1.0]
    saved = []
    with pytest.raises(engine_pretrain.NonFiniteLossError, match="epoch 0, step 3"):
        _run(ScriptedLoss(losses), _args(save_every_steps=5), 8, on_step_end=saved.append)
    assert saved == [0, 1, 2, 3]  # step 4 would save a checkpoint: the flush before it raised


def test_no_item_call_in_the_step_and_the_averages_are_right(monkeypatch):
    calls = []
    original = torch.Tensor.item

    def counting_item(self):
        caller = traceback.extract_stack(limit=2)[0].filename
        if caller.endswith(("engine_pretrain.py", "amp.py", "models_mae.py")):  # the step's own code
            calls.append(caller)
        return original(self)

    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    stats = _run(ScriptedLoss([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), _args(print_freq=100), 6)
    assert not calls
    assert stats["loss"] == pytest.approx(3.5)  # every step's loss reached the meters at the flushes


def test_background_figures_run_off_the_calling_thread_and_report_errors():
    import threading

    from util.visualize import BackgroundFigures

    seen = []
    with BackgroundFigures() as figures:
        for i in range(3):
            figures.submit(lambda i: seen.append((i, threading.current_thread() is threading.main_thread())), i)
    assert seen == [(0, False), (1, False), (2, False)]  # all drawn, in order, not on the training thread

    def broken():
        raise ValueError("bad figure")

    figures = BackgroundFigures()
    figures.submit(broken)
    with pytest.raises(ValueError, match="bad figure"):
        figures.close()
