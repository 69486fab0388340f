"""The student package imports nothing else of ar2mdm: `kdtrain export` ships its modules as they are, and the
exported folder must load where ar2mdm is not installed."""

import ast
import subprocess
import sys
from pathlib import Path

import ar2mdm.student
from ar2mdm.train.export import copy_sources, sources

PACKAGE = Path(ar2mdm.student.__file__).parent


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(level, module) of every import in a file: level 0 for absolute imports."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(0, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or ""))
    return found


def test_the_student_modules_import_only_each_other_relatively():
    names = {p.stem for p in PACKAGE.glob("*.py")}
    for path in PACKAGE.glob("*.py"):
        for level, module in imports_of(path):
            assert not module.startswith("ar2mdm"), f"{path.name} imports {module}"
            if level:
                assert level == 1 and module.split(".")[0] in names, f"{path.name}: from {'.' * level}{module}"


def test_every_module_of_the_package_is_exported():
    assert {p.name for p in sources()} == {p.name for p in PACKAGE.glob("*.py")} - {"__init__.py"}


def test_the_exported_modules_run_where_ar2mdm_cannot_be_imported(tmp_path):
    pkg = tmp_path / "exported"
    pkg.mkdir()
    copy_sources(pkg)
    (pkg / "__init__.py").write_text("")
    code = """
import sys
class NoAr2mdm:
    def find_spec(self, name, path=None, target=None):
        if name == "ar2mdm" or name.startswith("ar2mdm."):
            raise ImportError("ar2mdm is not installed here")
sys.meta_path.insert(0, NoAr2mdm())
import torch
from exported.model import Student, StudentConfig
from exported.block_sampler import block_generate
from exported.modeling_ar2mdm import Ar2mdmForMaskedLM
m = Student(StudentConfig(vocab_size=12, hidden_size=16, num_heads=2, num_kv_heads=1, shift=True, block_size=4)).eval()
x, f = block_generate(m, torch.tensor([[1, 2, 3]]), 6, seeds=[0])
print(x.shape[1], int(f[0]) >= 2)
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["9", "True"]
