"""Tests for util/metrics.py: SmoothedValue, MetricLogger.log_every, JsonlLogger."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

from util import dist as du
from util.metrics import JsonlLogger, MetricLogger, SmoothedValue


def test_smoothed_value_window_and_global():
    v = SmoothedValue(window_size=3, fmt="{median:.1f}|{avg:.2f}|{global_avg:.2f}|{max:.0f}|{value:.0f}")
    for x in [1.0, 10.0, 2.0, 4.0]:
        v.update(x)
    v.update(6.0, n=2)
    assert list(v.deque) == [2.0, 4.0, 6.0]
    assert v.median == 4.0 and v.avg == 4.0 and v.max == 6.0 and v.value == 6.0
    assert v.global_avg == pytest.approx((1 + 10 + 2 + 4 + 12) / 6)
    assert str(v) == "4.0|4.00|4.83|6|6"
    v.synchronize_between_processes()  # no process group: unchanged
    assert v.count == 6
    assert math.isnan(SmoothedValue().global_avg)


def test_metric_logger_update_and_access():
    ml = MetricLogger(delimiter=" | ")
    ml.update(loss=torch.tensor(0.5), lr=1e-3, skipped=None)
    ml.update(loss=1.5)
    assert ml.loss.global_avg == pytest.approx(1.0)
    assert "skipped" not in ml.meters
    assert ml.global_averages() == {"loss": pytest.approx(1.0), "lr": pytest.approx(1e-3)}
    assert str(ml).startswith("loss: ") and " | lr: " in str(ml)
    with pytest.raises(AttributeError, match="nope"):
        ml.nope
    with pytest.raises(ValueError, match="scalar"):
        ml.update(bad=torch.zeros(2))


def test_log_every_prints_progress(capsys):
    ml = MetricLogger()
    items = list(range(5))
    seen = []
    for x in ml.log_every(items, print_freq=2, header="Epoch: [0]", batch_size=4):
        ml.update(loss=float(x))
        seen.append(x)
    assert seen == items
    out = capsys.readouterr().out.strip().splitlines()
    progress = [line for line in out if re.search(r"\[\d/5\]", line)]
    assert [re.search(r"\[(\d)/5\]", line).group(1) for line in progress] == ["0", "2", "4"]
    for line in progress:
        assert line.startswith("Epoch: [0]") and "eta: " in line and "time: " in line and "data: " in line
        assert "img/s: " in line and "loss: " in line
    assert "Total time" in out[-1]


def test_log_every_without_len(capsys):
    ml = MetricLogger()
    assert list(ml.log_every((i for i in range(3)), print_freq=1)) == [0, 1, 2]
    out = capsys.readouterr().out
    assert "[2]" in out and "eta" not in out and "img/s" not in out


def test_jsonl_logger(tmp_path, monkeypatch):
    log = JsonlLogger(tmp_path / "run")
    log.log({"epoch": 0, "train_loss": torch.tensor(0.25), "path": tmp_path})
    log.log({"epoch": 1, "train_loss": 0.125})
    lines = (tmp_path / "run" / "log.txt").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"epoch": 0, "train_loss": 0.25, "path": str(tmp_path)},
                                                     {"epoch": 1, "train_loss": 0.125}]
    monkeypatch.setattr(du, "is_main_process", lambda: False)
    log.log({"epoch": 2})
    assert len((tmp_path / "run" / "log.txt").read_text().splitlines()) == 2
    JsonlLogger(None).log({"epoch": 0})  # no output dir: no-op


def test_end_of_update_logs_scalars_calls_the_hook_and_reports_the_stop():
    from types import SimpleNamespace

    from util.metrics import end_of_update

    logged, hooked = [], []

    class Writer:
        def add_scalar(self, tag, value, x):
            logged.append((tag, value, x))

    stop = SimpleNamespace(agreed=False)
    assert end_of_update(Writer(), 2, 5, 10, {"loss": 1.5, "lr": 0.1}, hooked.append, stop) is False
    assert logged == [("train/loss", 1.5, 2500), ("train/lr", 0.1, 2500)] and hooked == [5]
    stop.agreed = True
    assert end_of_update(None, 0, 1, 4, {"loss": 1.0}, None, stop) is True
    assert end_of_update(None, 0, 1, 4, {"loss": 1.0}) is False
