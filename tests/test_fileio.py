"""pipeline.fileio: the one atomic writer (temp file, fsync, rename), and the rule that nothing else renames."""

from __future__ import annotations

import ast
import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import fileio
from pipeline.fileio import atomic_write, atomic_write_bytes, atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[1]


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_success_writes_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "result.bin"  # missing parent is created
    assert atomic_write(target, lambda f: f.write(b"new bytes")) == target
    assert target.read_bytes() == b"new bytes"
    assert _names(tmp_path / "sub") == ["result.bin"]
    atomic_write(target, lambda f: f.write(b"replaced"))  # over an existing file
    assert target.read_bytes() == b"replaced"
    assert _names(tmp_path / "sub") == ["result.bin"]


def test_new_file_gets_umask_permissions_not_mkstemp_private(tmp_path):
    target = atomic_write_bytes(tmp_path / "shared.txt", b"x")
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~fileio._umask()
    old = os.umask(0o022)
    os.umask(old)
    assert fileio._umask() == old


def test_exception_midway_keeps_old_file_and_removes_temp(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old content")
    seen_temp = []

    def half_then_fail(f):
        f.write(b"half of the new con")
        f.flush()
        seen_temp.extend(p.name for p in tmp_path.iterdir() if p.name != "result.json")
        raise RuntimeError("killed midway")

    with pytest.raises(RuntimeError, match="killed midway"):
        atomic_write(target, half_then_fail)
    assert len(seen_temp) == 1 and seen_temp[0].startswith(".result.json.") and seen_temp[0].endswith(".tmp")
    assert target.read_text() == "old content"
    assert _names(tmp_path) == ["result.json"]


def test_keyboard_interrupt_also_cleans_up(tmp_path):
    def interrupted(f):
        f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "never.txt", interrupted)
    assert _names(tmp_path) == []


def test_fsync_of_file_before_rename(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def recording_fsync(fd):
        calls.append(("fsync", stat.S_ISDIR(os.fstat(fd).st_mode), os.fstat(fd).st_size))
        real_fsync(fd)

    def recording_replace(src, dst):
        calls.append(("replace", Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    atomic_write_text(tmp_path / "marker.done", "12345\n")
    # the temp file (not a directory) is fsynced with all its data, before the rename makes it visible
    assert calls[0] == ("fsync", False, 6)
    assert calls[1] == ("replace", "marker.done")
    assert ("fsync", True) in [c[:2] for c in calls[2:]]  # then the folder, so the rename is durable


def test_text_and_json_helpers(tmp_path):
    atomic_write_text(tmp_path / "a.md", "caf\u00e9\r\n")
    assert (tmp_path / "a.md").read_bytes() == "caf\u00e9\r\n".encode()  # utf-8, no newline translation
    atomic_write_text(tmp_path / "b.txt", "caf\u00e9", encoding="latin-1")
    assert (tmp_path / "b.txt").read_bytes() == b"caf\xe9"
    obj = {"a": [1, 2], "b": "x"}
    atomic_write_json(tmp_path / "c.json", obj)
    assert (tmp_path / "c.json").read_text() == json.dumps(obj, indent=1)
    atomic_write_json(tmp_path / "d.json", obj, indent=None)
    assert (tmp_path / "d.json").read_text() == json.dumps(obj)


def test_numpy_savez_through_a_file_object_keeps_the_name(tmp_path):
    target = tmp_path / "hierarchy.npz"
    atomic_write(target, lambda f: np.savez(f, x=np.arange(3)))
    assert _names(tmp_path) == ["hierarchy.npz"]  # no ".npz" appended, no temp left
    with np.load(target) as z:
        assert z["x"].tolist() == [0, 1, 2]


def test_fileio_imports_only_the_standard_library():
    tree = ast.parse((REPO / "pipeline" / "fileio.py").read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert roots - {"__future__"} <= set(sys.stdlib_module_names), roots


def _renames(source: str) -> list[tuple[int, str]]:
    """Line and text of every rename-like call: os.replace/os.rename/shutil.move, any ``.rename(...)``,
    and ``.replace(x)`` with one argument (``Path.replace``; ``str.replace`` needs two)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        attr, owner = node.func.attr, node.func.value
        owner_name = owner.id if isinstance(owner, ast.Name) else ""
        if (attr in ("rename", "renames") or (owner_name == "os" and attr == "replace")
                or (owner_name == "shutil" and attr == "move")
                or (attr == "replace" and len(node.args) + len(node.keywords) == 1)):
            found.append((node.lineno, ast.unparse(node)))
    return found


def test_rename_detector_catches_the_known_forms():
    code = "os.replace(a, b)\nos.rename(a, b)\ntmp.replace(path)\np.rename(q)\nshutil.move(a, b)\n" \
           "s.replace('|', ' ')\n"
    assert [line for line, _ in _renames(code)] == [1, 2, 3, 4, 5]


def test_no_rename_outside_fileio():
    """Every write-then-rename goes through pipeline.fileio, so the atomic-write rule stays in one place."""
    offenders = []
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        if path.name == "fileio.py" and path.parent.name == "pipeline":
            continue
        offenders += [f"{path.relative_to(REPO)}:{line}: {text}" for line, text in _renames(path.read_text())]
    assert not offenders, "use pipeline.fileio.atomic_write instead of renaming by hand:\n" + "\n".join(offenders)
