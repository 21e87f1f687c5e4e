"""Durable atomic writes: files and directories are fsynced, and a replaced directory never goes missing."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from puzzle.core import artifacts
from puzzle.core.artifacts import atomic_dir, atomic_path, write_json


def _record_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(st_dev, st_ino) of every fsynced descriptor, in call order."""
    seen: list[tuple[int, int]] = []
    real = os.fsync

    def spy(fd: int) -> None:
        st = os.fstat(fd)
        seen.append((st.st_dev, st.st_ino))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return seen


def _inode(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino


def test_atomic_path_fsyncs_the_file_before_the_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced = _record_fsyncs(monkeypatch)
    target = tmp_path / "out" / "a.json"
    write_json(target, {"a": 1})
    assert target.read_text().strip() == '{\n  "a": 1\n}'
    file, parent = _inode(target), _inode(target.parent)
    assert file in synced and parent in synced
    assert synced.index(file) < synced.index(parent), "the data must be durable before the rename is"


def test_atomic_path_failure_leaves_no_file(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert list(tmp_path.iterdir()) == []


def _exchange_works(tmp_path: Path) -> bool:
    a, b = tmp_path / "probe-a", tmp_path / "probe-b"
    a.mkdir()
    b.mkdir()
    try:
        return artifacts._exchange(a, b)
    finally:
        os.rmdir(a)
        os.rmdir(b)


def _old_dir(tmp_path: Path) -> Path:
    child = tmp_path / "child"
    (child / "sub").mkdir(parents=True)
    (child / "old.txt").write_text("old")
    (child / "sub" / "w.bin").write_bytes(b"old")
    return child


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RENAME_EXCHANGE is Linux-only")
def test_atomic_dir_replaces_without_a_missing_moment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not _exchange_works(tmp_path):
        pytest.skip("this filesystem has no RENAME_EXCHANGE")
    child = _old_dir(tmp_path)
    real_replace, real_exchange = os.replace, artifacts._exchange

    def replace(src: str | Path, dst: str | Path) -> None:
        real_replace(src, dst)
        assert child.is_dir(), f"{child} was missing after os.replace({src}, {dst})"

    def exchange(a: Path, b: Path) -> bool:
        ok = real_exchange(a, b)
        assert child.is_dir() and (child / "new.txt").exists()
        return ok

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(artifacts, "_exchange", exchange)
    with atomic_dir(child) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in child.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["child"], "the old directory and temporaries are gone"


def test_atomic_dir_fallback_without_exchange(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(artifacts, "_exchange", lambda a, b: False)
    child = _old_dir(tmp_path)
    with atomic_dir(child) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in child.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["child"]


def test_atomic_dir_failure_keeps_the_old_directory(tmp_path: Path) -> None:
    child = _old_dir(tmp_path)
    with pytest.raises(RuntimeError), atomic_dir(child) as tmp:
        (tmp / "new.txt").write_text("half")
        raise RuntimeError
    assert sorted(p.name for p in child.iterdir()) == ["old.txt", "sub"]
    assert (child / "sub" / "w.bin").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["child"]


def test_atomic_dir_fsyncs_what_it_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced = _record_fsyncs(monkeypatch)
    child = _old_dir(tmp_path)
    with atomic_dir(child) as tmp:
        (tmp / "deep").mkdir()
        (tmp / "deep" / "w.bin").write_bytes(b"new")  # written without the atomic helpers
    for p in (child / "deep" / "w.bin", child / "deep", child):
        assert _inode(p) in synced, p
    assert synced[-1] == _inode(tmp_path), "the parent is synced last, after the swap"
