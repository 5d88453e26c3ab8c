"""Running a script as several local gloo ranks, for the tests that check distributed behaviour end to end."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

# variables a launcher (torchrun, SLURM, MPI) sets: a test's ranks must not inherit the ones of the pytest process
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
               "SLURM_NTASKS", "SLURM_LOCALID", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
               "OMPI_COMM_WORLD_LOCAL_RANK")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for MASTER_PORT)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(argv: Sequence[str], cwd: Path, env: Mapping[str, str], world: int = 2, timeout: float = 240
              ) -> list[tuple[int, str]]:
    """Start ``python argv...`` once per rank (RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* set, launcher variables of this
    process dropped) and wait for all: ``[(exit status, stdout+stderr)]`` by rank. A rank that outlives ``timeout``
    kills them all and fails the calling test with what the ranks had printed."""
    import pytest

    base = {k: v for k, v in env.items() if k not in LAUNCH_VARS}
    base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world))
    procs = [subprocess.Popen([sys.executable, *argv], cwd=cwd, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(world)]
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"{world}-rank run of {' '.join(argv)} outlived {timeout} s")
    return [(p.returncode, out) for p, out in zip(procs, outputs)]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without launcher variables, one intra-op thread, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    return env
