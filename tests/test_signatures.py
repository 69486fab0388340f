"""Settings travel by keyword: no function of the package takes more than five positional parameters, and no call
passes more than five positional arguments (records and wide calls are built by keyword)."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MOST = 5


def test_no_wide_positional_signatures_or_calls():
    wide = []
    for d in ("precompute", "train", "student", "shared", "schemas"):
        for p in sorted((REPO / d).rglob("*.py")):
            for node in ast.walk(ast.parse(p.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names = [a.arg for a in node.args.posonlyargs + node.args.args]
                    n = len(names) - (names[:1] in (["self"], ["cls"]))
                    if n > MOST:
                        wide.append(f"{p.relative_to(REPO)}:{node.lineno} def {node.name}: {n} positional")
                elif isinstance(node, ast.Call):
                    n = sum(not isinstance(a, ast.Starred) for a in node.args)
                    if n > MOST:
                        wide.append(
                            f"{p.relative_to(REPO)}:{node.lineno} {ast.unparse(node.func)}(...): {n} positional"
                        )
    assert not wide, "\n".join(wide)
