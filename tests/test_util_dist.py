"""Tests for util/dist.py: launcher detection (mocked process group) and one real 2-process gloo run."""
from __future__ import annotations

import argparse
import builtins
import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ranks import clean_env as rank_env, run_ranks
from util import dist as du

REPO = Path(__file__).resolve().parents[1]
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
                "SLURM_LOCALID", "SLURM_NODELIST", "SLURM_JOB_NODELIST", "OMPI_COMM_WORLD_RANK",
                "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK")


@pytest.fixture
def clean_env():
    """Remove launcher variables and restore os.environ and builtins.print afterwards."""
    saved = dict(os.environ)
    for name in _LAUNCH_VARS:
        os.environ.pop(name, None)
    try:
        yield os.environ
    finally:
        os.environ.clear()
        os.environ.update(saved)
        builtins.print = du.ORIGINAL_PRINT


@pytest.fixture
def fake_pg(monkeypatch):
    """Record init_process_group calls instead of starting a process group."""
    calls = []
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: calls.append(kw))
    return calls


def _args(**kw) -> argparse.Namespace:
    base = dict(device="cpu", dist_on_itp=False, dist_url="env://", local_rank=-1)
    base.update(kw)
    return argparse.Namespace(**base)


def test_single_process_without_env(clean_env, fake_pg):
    args = _args()
    du.init_distributed_mode(args)
    assert (args.distributed, args.rank, args.world_size, args.gpu, args.dist_backend) == (False, 0, 1, 0, "gloo")
    assert fake_pg == [] and not du.is_dist_avail_and_initialized()
    assert builtins.print is du.ORIGINAL_PRINT
    assert (du.get_rank(), du.get_world_size(), du.is_main_process()) == (0, 1, True)
    assert du.all_reduce_mean(3.5) == 3.5
    t = torch.arange(6).reshape(3, 2)
    assert du.gather_tensors_variable(t) is t
    du.barrier()
    du.cleanup()


def test_torchrun_env(clean_env, fake_pg):
    clean_env.update(RANK="3", WORLD_SIZE="8", LOCAL_RANK="1", MASTER_ADDR="10.0.0.1", MASTER_PORT="1234")
    args = _args()
    du.init_distributed_mode(args)
    assert (args.distributed, args.rank, args.world_size, args.gpu, args.dist_backend) == (True, 3, 8, 1, "gloo")
    assert fake_pg == [dict(backend="gloo", init_method="env://", world_size=8, rank=3)]
    assert builtins.print is not du.ORIGINAL_PRINT  # non-master silenced


def test_launch_local_rank_from_cli(clean_env, fake_pg):
    clean_env.update(RANK="1", WORLD_SIZE="2", MASTER_ADDR="h", MASTER_PORT="1")
    args = _args(local_rank=5)
    du.init_distributed_mode(args)
    assert (args.rank, args.gpu) == (1, 5)


def test_world_size_one_env_is_not_distributed(clean_env, fake_pg):
    clean_env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    args = _args()
    du.init_distributed_mode(args)
    assert args.distributed is False and fake_pg == []


def test_slurm_env(clean_env, fake_pg):
    clean_env.update(SLURM_PROCID="5", SLURM_NTASKS="8", SLURM_LOCALID="1", SLURM_NODELIST="gpu[003-004,9],cpu1")
    args = _args()
    du.init_distributed_mode(args)
    assert (args.distributed, args.rank, args.world_size, args.gpu) == (True, 5, 8, 1)
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("gpu003", "29500")
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("5", "8", "1")
    assert fake_pg[0]["rank"] == 5 and fake_pg[0]["world_size"] == 8


def test_itp_env(clean_env, fake_pg):
    clean_env.update(OMPI_COMM_WORLD_RANK="2", OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_LOCAL_RANK="0",
                     MASTER_ADDR="m", MASTER_PORT="7", RANK="99", WORLD_SIZE="100")  # ITP wins over RANK
    args = _args(dist_on_itp=True)
    du.init_distributed_mode(args)
    assert (args.rank, args.world_size, args.gpu) == (2, 4, 0)
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("2", "4")


def test_env_errors(clean_env, fake_pg):
    clean_env.update(RANK="x", WORLD_SIZE="2")
    with pytest.raises(ValueError, match="RANK"):
        du.init_distributed_mode(_args())
    clean_env.update(RANK="1", WORLD_SIZE="2")
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        du.init_distributed_mode(_args())
    clean_env.update(RANK="2", WORLD_SIZE="2")
    with pytest.raises(ValueError, match="rank 2"):
        du.init_distributed_mode(_args())
    assert fake_pg == []


@pytest.mark.parametrize("nodelist, host", [
    ("node7", "node7"), ("gpu[003-005,9],cpu1", "gpu003"), ("a1,b[2-3]", "a1"), ("n[1-2]-ib[3-4]", "n1-ib3"),
    ("x[07]", "x07"),
])
def test_first_host_from_nodelist(nodelist, host):
    assert du.first_host_from_nodelist(nodelist) == host


_WORKER = textwrap.dedent("""
    import argparse, json, sys
    import torch
    from util import dist as du
    args = argparse.Namespace(device="cpu", dist_on_itp=False, dist_url="env://", local_rank=-1)
    du.init_distributed_mode(args)
    r = args.rank
    rows = [3, 5][r]
    t = torch.arange(rows * 2, dtype=torch.float32).reshape(rows, 2) + 100 * r
    g = du.gather_tensors_variable(t)
    empty_first = du.gather_tensors_variable(torch.full(([0, 4][r],), r, dtype=torch.long))
    flags = du.gather_tensors_variable(torch.tensor([r == 1]))
    mean = du.all_reduce_mean(float(r + 1))
    print("SILENCED_LINE")
    print("FORCED_LINE", force=True)
    out = dict(rank=r, distributed=args.distributed, world=du.get_world_size(), gathered=g.tolist(),
               empty_first=empty_first.tolist(), flags=flags.tolist(), flags_dtype=str(flags.dtype), mean=mean)
    sys.stdout.write("RESULT " + json.dumps(out) + "\\n")
    du.cleanup()
""")


def test_real_two_process_gloo(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = rank_env(PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ranks = run_ranks([str(script)], cwd=tmp_path, env=env, timeout=90)
    for code, out in ranks:
        assert code == 0, out
    outs = [out for _, out in ranks]
    results = [json.loads(next(line[7:] for line in out.splitlines() if line.startswith("RESULT "))) for out in outs]
    expected = ([[float(2 * i), float(2 * i + 1)] for i in range(3)] +
                [[100.0 + 2 * i, 101.0 + 2 * i] for i in range(5)])
    for r, res in enumerate(results):
        assert res["rank"] == r and res["distributed"] is True and res["world"] == 2
        assert res["gathered"] == expected  # 8 rows, rank order, no padding
        assert res["empty_first"] == [1, 1, 1, 1]
        assert res["flags"] == [False, True] and res["flags_dtype"] == "torch.bool"
        assert res["mean"] == pytest.approx(1.5)
    assert "SILENCED_LINE" in outs[0] and "SILENCED_LINE" not in outs[1]
    assert "FORCED_LINE" in outs[1]
