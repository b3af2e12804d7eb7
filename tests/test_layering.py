"""Dependencies point one way: gateway → middleware, never back (DESIGN §1, STYLE 2.2)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = ("gateway", "redis", "examples")


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level > 1:
            names.append("." * node.level + (node.module or ""))  # climbing out of the package
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "middleware").rglob("*.py")), ids=lambda p: p.name)
def test_middleware_never_imports_the_gateway_or_redis(path: Path) -> None:
    bad = [name for name in _imports(path) if name.split(".")[0] in FORBIDDEN or name.startswith("..")]
    assert bad == [], f"{path.name} imports {bad}"


def test_the_layering_check_sees_imports() -> None:
    assert "middleware.problem" in _imports(ROOT / "gateway" / "app.py")
