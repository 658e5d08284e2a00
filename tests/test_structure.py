"""The house rules of src/busseg: module and function sizes, no reaching into private names."""

import ast
from pathlib import Path

import busseg

PACKAGE = Path(busseg.__file__).parent
MAX_MODULE_LINES = 800
MAX_FUNCTION_LINES = 120


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_no_module_over_800_lines():
    too_long = {str(p.relative_to(PACKAGE)): n for p in _modules()
                if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines: {too_long}"


def test_no_function_over_120_lines():
    too_long = {}
    for p in _modules():
        tree = ast.parse(p.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_long[f"{p.relative_to(PACKAGE).as_posix()} {node.name}"] = n
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines: {too_long}"


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_imports(path: Path) -> list[str]:
    """``from busseg... import _name`` lines (dunder names such as __version__ are public)."""
    found = []
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
                node.module == "busseg" or node.module.startswith("busseg.")):
            found += [f"{path.relative_to(PACKAGE)}: from {node.module} import {a.name}"
                      for a in node.names if _private(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            found += [f"{path.relative_to(PACKAGE)}: from {'.' * node.level}{node.module or ''} "
                      f"import {a.name}" for a in node.names if _private(a.name)]
    return found


def test_no_private_imports_between_modules():
    found = [hit for p in _modules() for hit in _private_imports(p)]
    assert not found, "imports of another module's private names:\n" + "\n".join(found)
