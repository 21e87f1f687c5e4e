"""Outputs get the modes the umask asks for; a killed writer's temporaries are swept by the next writer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from puzzle.core.artifacts import atomic_dir, write_json
from puzzle.core.tmpfiles import current_umask, tmp_prefix


@pytest.fixture
def umask():
    def set_mask(mask: int) -> None:
        os.umask(mask)
    old = os.umask(0o022)
    yield set_mask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_file_and_dir_follow_the_umask(tmp_path: Path, umask, mask: int) -> None:
    umask(mask)
    assert current_umask() == mask
    write_json(tmp_path / "a.json", {"x": 1})
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "f.txt").write_text("hi")
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~mask


def test_export_and_native_model_dirs_follow_the_umask(tmp_path: Path, umask) -> None:
    from puzzle.formats import export_hf
    from puzzle.formats.native import save_model
    from puzzle.model.decoder import build_model
    from puzzle.model.presets import tiny_llama_config

    umask(0o027)
    model = build_model(tiny_llama_config(num_layers=1))
    for out in (save_model(model, tmp_path / "native"), export_hf(model, tmp_path / "hf")):
        assert Path(out).stat().st_mode & 0o777 == 0o750
        assert {f.stat().st_mode & 0o777 for f in Path(out).iterdir() if f.is_file()} == {0o640}


@pytest.mark.parametrize("mask", [0o027, 0o002])
def test_gguf_export_follows_the_umask(tmp_path: Path, umask, mask: int) -> None:
    pytest.importorskip("gguf")
    from puzzle.formats.gguf_export import export_gguf
    from puzzle.model.decoder import build_model
    from puzzle.model.presets import tiny_llama_config

    umask(mask)  # 0o027 and 0o002 both differ from a fixed 0o644
    out = tmp_path / "m.gguf"
    export_gguf(build_model(tiny_llama_config(num_layers=1)), out)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_killed_writers_temporary_dir_is_swept_by_the_next_write(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    pid = int(dead.stdout)  # a process that has exited
    prefix = tmp_prefix("data").replace(f"-{os.getpid()}.", f"-{pid}.")
    stale = tmp_path / f"{prefix}abc123.tmp"
    (stale / "sub").mkdir(parents=True)
    live = tmp_path / f"{tmp_prefix('data')}xyz.tmp"  # this (live) process's: kept
    live.mkdir()
    other = tmp_path / f"{prefix.replace('.data.', '.other.')}q.tmp"  # another path's: kept
    other.mkdir()
    with atomic_dir(tmp_path / "data") as tmp:
        (tmp / "train.bin").write_bytes(b"\0")
    assert not stale.exists() and live.exists() and other.exists()
    assert (tmp_path / "data" / "train.bin").exists()
