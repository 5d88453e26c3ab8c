#!/usr/bin/env python
"""The launchers' flag reference as Markdown, generated from their ``-h`` (argparse) definitions.

    python tools/flag_reference.py            # print it
    python tools/flag_reference.py --write    # (re)write docs/flags.md, the file README.md links to
    python tools/flag_reference.py --check    # exit 1 when docs/flags.md differs from the parsers

``tests/test_original_readme.py`` fails when ``docs/flags.md`` is not exactly :func:`render`'s output, so a changed
flag or help text is followed by ``--write``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

LAUNCHERS = ("main_pretrain.py", "main_linprobe.py", "main_segment.py", "main_eval.py", "main_embed.py", "main_predict.py")
FLAGS_FILE = _REPO / "docs" / "flags.md"
HEADER = ("# Flag reference\n\n"
          "Generated from the launchers' parsers by `python tools/flag_reference.py --write` (do not edit by hand;\n"
          "a test fails when this file and the parsers disagree). `python main_pretrain.py -h` prints the same text.\n"
          "Flags marked unset (`None`) take the documented value when left out.\n")


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


def render() -> str:
    """The whole of ``docs/flags.md``: the header, then one section per launcher present in the repository."""
    parts = [HEADER]
    for title in LAUNCHERS:
        if not (_REPO / title).is_file():
            continue
        module = importlib.import_module(title[:-3])
        parts.append(f"## `{title}`\n\n{flag_table(module.get_args_parser())}\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"write {FLAGS_FILE.relative_to(_REPO)}")
    mode.add_argument("--check", action="store_true", help=f"exit 1 when {FLAGS_FILE.relative_to(_REPO)} is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        FLAGS_FILE.parent.mkdir(parents=True, exist_ok=True)
        FLAGS_FILE.write_text(text, encoding="utf-8")
        print(f"wrote {FLAGS_FILE.relative_to(_REPO)}")
    elif args.check:
        current = FLAGS_FILE.read_text(encoding="utf-8") if FLAGS_FILE.is_file() else ""
        if current != text:
            print(f"error: {FLAGS_FILE.relative_to(_REPO)} is stale: run python tools/flag_reference.py --write",
                  file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
