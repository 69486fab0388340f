"""Every name the code cites in single backquotes (`name`, `module.name`, `file.py`) in its docstrings and comments
exists: a module, a function, a class, a method, a field or a constant of ar2mdm, or a module of the libraries it
builds on (double backquotes quote anything else: values, commands, another library's names). A renamed function
leaves no docstring pointing at nothing."""

import ast
import io
import re
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = ["precompute", "train", "student", "shared", "schemas"]
EXTERNAL = {"torch", "transformers", "vllm", "np", "numpy", "pa", "pyarrow", "pq", "typer", "datasets", "F", "nn"}
CITED = re.compile(r"(?<![`\w])`([A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)*)(?:\(\))?`(?!`)")


def python_files() -> list[Path]:
    return [p for d in PACKAGE + ["benchmarks", "scripts"] for p in sorted((REPO / d).rglob("*.py"))]


def defined_names() -> set[str]:
    """Every name ar2mdm defines: modules and packages, functions, classes, methods, fields, assignments."""
    names = set(PACKAGE) | {"ar2mdm", "benchmarks", "scripts", "tests"}
    for p in python_files():
        names.add(p.stem)
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
            elif isinstance(node, ast.Assign):
                names.update(t.id for t in node.targets if isinstance(t, ast.Name))
            elif isinstance(node, ast.alias):
                names.add((node.asname or node.name).split(".")[-1])
    return names


def docs_and_comments(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every docstring and comment of a file."""
    out = []
    src = path.read_text()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                out.append((getattr(node, "lineno", 1), doc))
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            out.append((tok.start[0], tok.string))
    return out


def test_every_cited_name_resolves():
    names = defined_names()
    missing = []
    for path in python_files():
        for line, text in docs_and_comments(path):
            for cited in CITED.findall(text.replace("``", "")):
                parts = cited.removesuffix(".py").split(".")
                if parts[0] in EXTERNAL:
                    continue
                if not all(part in names for part in parts):
                    missing.append(f"{path.relative_to(REPO)}:{line}: `{cited}`")
    assert not missing, "cited names that do not exist:\n" + "\n".join(missing)
