#!/usr/bin/env python
"""Print the launchers' flag reference as Markdown, generated from their ``-h`` (argparse) definitions.

    python tools/flag_reference.py > /tmp/flags.md     # the README's "Flag reference" section is this output
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))


def flag_table(parser: argparse.ArgumentParser) -> str:
    """One Markdown table per argument group: flag(s) and the ``-h`` text (which states each default once)."""
    out = []
    for group in parser._action_groups:  # noqa: SLF001 - argparse has no public accessor for groups
        rows = []
        for action in group._group_actions:  # noqa: SLF001
            if isinstance(action, argparse._HelpAction):  # noqa: SLF001
                continue
            flags = ", ".join(f"`{s}`" for s in action.option_strings)
            text = (action.help or "").replace("%%", "%").replace("|", "\\|")
            rows.append(f"| {flags} | {text} |")
        if rows and group.title not in ("options", "optional arguments", "positional arguments"):
            out.append(f"*{group.title}*\n\n| flag | meaning |\n|---|---|\n" + "\n".join(rows))
    return "\n\n".join(out)


def main() -> None:
    import importlib

    for title in ("main_pretrain.py", "main_linprobe.py", "main_segment.py"):
        if not (_REPO / title).is_file():
            continue
        module = importlib.import_module(title[:-3])
        print(f"#### `{title}`\n")
        print(flag_table(module.get_args_parser()))
        print()


if __name__ == "__main__":
    main()
