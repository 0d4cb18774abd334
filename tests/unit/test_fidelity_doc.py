"""docs/kubevirt-fidelity.md names a test for every rule: each named test must exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "kubevirt-fidelity.md"


def _functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}


def test_every_test_the_fidelity_table_names_exists() -> None:
    text = DOC.read_text()
    refs = re.findall(r"`(?:tests/(?:e2e|unit)/)?(test_\w+\.py)(?:::(\w+))?`", text)
    assert len(refs) > 40
    files = {p.name: p for p in (ROOT / "tests").rglob("test_*.py")}
    missing = []
    for file, func in refs:
        if file not in files:
            missing.append(file)
        elif func and func not in _functions(files[file]):
            missing.append(f"{file}::{func}")
    assert not missing, f"the fidelity table names tests that do not exist: {missing}"
