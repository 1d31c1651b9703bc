"""No function of the package, the scripts or the benchmarks over 80 lines: a reader follows each on
one screen."""

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
FOLDERS = (ROOT / "src" / "entroprl", ROOT / "scripts", ROOT / "benchmarks")
LIMIT = 80


def long_functions(folder: Path, limit: int = LIMIT) -> list[str]:
    """`module.function (lines)` for each function longer than `limit` lines, its docstring not
    counted."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            lines = node.end_lineno - node.lineno + 1
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                lines -= first.end_lineno - first.lineno + 1
            if lines > limit:
                found.append(f"{path.stem}.{node.name} ({lines} lines)")
    return found


def test_no_function_is_over_80_lines():
    assert [f for folder in FOLDERS for f in long_functions(folder)] == []


def test_the_length_counts_the_code_not_the_docstring(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(6))
    (tmp_path / "m.py").write_text(f'def f():\n    """one\n    two"""\n{body}\n')
    assert long_functions(tmp_path, limit=7) == []
    assert long_functions(tmp_path, limit=6) == ["m.f (7 lines)"]
