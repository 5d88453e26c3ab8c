"""util.cpu_memory: with the 'reuse' setting a repeated step stops page-faulting its large buffers back in."""
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from util.cpu_memory import keep_freed_memory

REPO = Path(__file__).resolve().parent.parent

# Two buffers above glibc's largest dynamic mmap threshold (32 MiB), allocated, touched and freed per "step".
_STEP_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    sys.path.insert(0, {repo!r})
    from util.cpu_memory import keep_freed_memory
    if sys.argv[1] == "reuse":
        assert keep_freed_memory()
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    counts = []
    for _ in range(12):
        f0 = faults()
        a = torch.ones(10 * 2**20); b = torch.ones(12 * 2**20)
        float(a.sum() + b.sum())
        del a, b
        counts.append(faults() - f0)
    print(counts)
""")


def _fault_counts(mode: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", _STEP_SCRIPT.format(repo=str(REPO)), mode], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    return [int(v) for v in out.strip().strip("[]").split(",")]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the setting only exists with glibc (Linux)")
def test_reuse_stops_page_faults_of_repeated_large_buffers():
    system, reuse = _fault_counts("system"), _fault_counts("reuse")
    pages = (22 * 2**20 * 4) // 4096  # the two buffers, in 4 KiB pages
    # glibc's default returns both buffers to the kernel every step: each step faults them in again
    assert min(system[2:]) > pages // 2, system
    # kept in the heap, most steps reuse the same pages (the heap still grows now and then while it settles)
    assert statistics.median(reuse[2:]) < pages // 20, reuse
    assert sum(reuse[2:]) < 0.3 * sum(system[2:]), (reuse, system)


def test_keep_freed_memory_reports_whether_it_applied():
    # True on glibc (CI, Linux); on other platforms nothing is changed and False is returned
    assert keep_freed_memory() is sys.platform.startswith("linux")
