"""Import hygiene: no module outside tests reaches into another project module's private names, and the homes of the
``res`` rules and of weights -> encoder (util/gsd.py, util/weights.py) stay below the models and the data loaders."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP = {"tests", ".venv", "build", ".git"}


def _sources() -> list[Path]:
    return [p for p in sorted(ROOT.rglob("*.py")) if not SKIP & set(p.relative_to(ROOT).parts)]


def _project_modules() -> set[str]:
    """Top-level names importable from the repository (modules, packages) plus bench's script modules."""
    names = {p.stem for p in ROOT.glob("*.py")} | {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    return names | {p.stem for p in (ROOT / "bench").glob("*.py")} | {"layers", "tools"}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_imports(path: Path, project: set[str]) -> list[str]:
    """``from <project module> import _x`` and ``<project module alias>._x`` uses in one file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found, aliases = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            ours = node.level > 0 or (node.module or "").split(".")[0] in project
            for a in node.names:
                if ours and _is_private(a.name):
                    found.append(f"{node.lineno}: from {'.' * node.level}{node.module or ''} import {a.name}")
                elif ours:
                    aliases.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in project:
                    aliases.add(a.asname or a.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                and _is_private(node.attr):
            found.append(f"{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_cross_module_private_imports():
    project = _project_modules()
    offenders = [f"{p.relative_to(ROOT)}:{hit}" for p in _sources() for hit in private_imports(p, project)]
    assert not offenders, "make the name public in its home module: " + "; ".join(offenders)


def test_the_scanner_finds_a_private_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from models_mae import _hidden\nimport util.dist as d\nd._secret()\nfrom .x import _y\n")
    assert len(private_imports(bad, {"models_mae", "util"})) == 3


def test_rule_homes_import_neither_models_nor_data_loaders():
    forbidden = {"models_mae", "models_vit", "models_seg", "dataloaders", "engine_pretrain", "engine_finetune",
                 "engine_segment", "main_pretrain", "main_linprobe", "main_segment"}
    for rel in ("util/gsd.py", "util/weights.py"):
        tree = ast.parse((ROOT / rel).read_text(encoding="utf-8"))
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not imported & forbidden, (rel, imported & forbidden)


LAUNCHERS = {"main_pretrain", "main_linprobe", "main_segment", "main_eval", "main_infer", "main_embed", "main_predict", "engine_pretrain",
             "engine_finetune", "engine_segment"}
MODELS = {"models_mae", "models_vit", "models_seg"}
# what each layer of the house may not import (the arrows point down only): util < dataloaders < harness < launchers
FORBIDDEN = {
    "util": {"dataloaders", "harness", "layers"} | MODELS | LAUNCHERS,
    "dataloaders": {"harness"} | MODELS | LAUNCHERS,
    "harness": LAUNCHERS,
    "inference": LAUNCHERS,
}


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports (absolute imports, at any depth in the file)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return names | {(n.module or "").split(".")[0] for n in ast.walk(tree)
                    if isinstance(n, ast.ImportFrom) and n.level == 0}


def upward_imports() -> list[str]:
    """Every import that points up the house: ``file: module``."""
    found = []
    for layer, forbidden in FORBIDDEN.items():
        for path in sorted((ROOT / layer).rglob("*.py")):
            for name in sorted(imported_modules(path) & forbidden):
                found.append(f"{path.relative_to(ROOT)}: {name}")
    return found


def test_layers_import_only_downwards():
    """util/ imports neither the data loaders, the run scaffolding, the models nor the launchers; dataloaders/
    imports no models, harness or launchers; harness/ imports no launcher or engine."""
    assert not upward_imports(), upward_imports()


def test_the_layer_scanner_sees_a_nested_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from dataloaders.config import load_config\n    import models_vit as m\n")
    assert imported_modules(bad) >= {"dataloaders", "models_vit"}
