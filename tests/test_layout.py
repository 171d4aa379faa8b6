"""The shape the redesign (issue 14) promised, checked on the source: the strategy is Lightning
hooks only (≤ 300 lines), no module imports another module's private names, and the privacy
engine never imports Lightning."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("lit_dpvae", "experiments", "tests") for p in (ROOT / d).rglob("*.py"))


def _imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, [a.name for a in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], node.lineno


def test_no_module_imports_another_modules_private_names():
    found = []
    for path in SOURCES:
        for module, names, line in _imports(path):
            if module.split(".")[0] not in ("lit_dpvae", "tests", "bench_step", "run_grid"):
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                found.append(f"{path.relative_to(ROOT)}:{line} imports {private} from {module}")
    assert not found, "\n".join(found)


def test_the_privacy_engine_never_imports_lightning():
    found = [f"{p.relative_to(ROOT)}:{line} imports {module}"
             for p in sorted((ROOT / "lit_dpvae" / "privacy").rglob("*.py"))
             for module, _, line in _imports(p) if module.split(".")[0] in ("lightning", "pl")]
    assert not found, "\n".join(found)


def test_the_strategy_is_hooks_only():
    source = (ROOT / "lit_dpvae" / "strategy.py").read_text()
    assert len(source.splitlines()) <= 300
    tree = ast.parse(source)
    (strategy,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DPStrategy"]
    methods = [n.name for n in strategy.body if isinstance(n, ast.FunctionDef)]
    # every method is a Lightning Strategy hook/property or a one-line delegation to the objects
    assert not [m for m in methods if m.startswith("_") and m not in (
        "__init__", "_setup_model")], methods
