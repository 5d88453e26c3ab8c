"""README.md's Python examples run exactly as written: every ```python block of the README, each in a fresh
namespace and a fresh working folder that holds what a checkout's root holds for it (``config/``).

The blocks carry their own ``assert`` lines (shapes, CRS, GSD, res), so a changed API or behaviour fails here and
the README cannot drift from the code.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)


def python_blocks() -> list[tuple[int, str]]:
    """(line number, source) of every ```python block of README.md."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in FENCE.finditer(text)]


def test_readme_has_the_four_python_examples():
    """The README holds the same kind of place found across two GSDs ("Apply a model") and the three scripting tasks
    of its "Python" section (a config -> dataset, a window -> pixels + labels + res, features at a GSD)."""
    sources = [src for _, src in python_blocks()]
    assert len(sources) == 4
    assert "main_embed" in sources[0] and "search(" in sources[0] and '"--gsd", "0.5", "1"' in sources[0]
    assert "load_config(" in sources[1] and "build_pretrain_dataset(" in sources[1]
    assert "WindowSpec(" in sources[2] and '["res"]' in sources[2]
    assert "input_res=" in sources[3] and "util.gsd" in sources[3]


@pytest.mark.parametrize("line, source", [pytest.param(n, src, id=f"README.md:{n}") for n, src in python_blocks()])
def test_readme_python_block_runs(line, source, tmp_path, monkeypatch):
    os.symlink(REPO / "config", tmp_path / "config")
    monkeypatch.chdir(tmp_path)
    code = compile("\n" * (line - 1) + source, str(REPO / "README.md"), "exec")  # tracebacks name README lines
    exec(code, {"__name__": "__readme__"})  # noqa: S102 - the point of the test
