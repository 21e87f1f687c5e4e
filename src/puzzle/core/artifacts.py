"""Run-directory artifacts: atomic writes, content hashes, and 'is this stage current?' stamps.

Every stage writes its outputs through these helpers so that a crash or kill never leaves a half-written
file: data goes to a temporary file in the same directory, is fsynced, and is renamed into place (atomic on
POSIX); the directory is fsynced after the rename so that the rename itself survives a power loss. A directory
is replaced by swapping it with the new one in one step (Linux renameat2 RENAME_EXCHANGE), so its path never
goes missing.
A stage records a stamp (`<dir>/.stage.json`) holding the hash of its inputs and config; when the stamp
matches, the stage has nothing to do.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from puzzle.core.errors import PuzzleError
from puzzle.core.tmpfiles import match_umask, sweep_stale, tmp_prefix

STAMP = ".stage.json"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(path.name), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    match_umask(tmp_path)  # mkstemp makes it 0600
    try:
        yield tmp_path
        fsync_path(tmp_path)  # the data is on disk before the name points at it
        os.replace(tmp_path, path)
        fsync_path(path.parent)  # the rename is on disk
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def fsync_path(path: str | Path) -> None:
    """fsync a file or a directory by name (a no-op for directories where the OS cannot open them, e.g. Windows)."""
    path = Path(path)
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except (IsADirectoryError, PermissionError):
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PuzzleError(f"{path} does not exist; run the stage that writes it first") from None
    except json.JSONDecodeError as e:
        raise PuzzleError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); delete it and rerun") from None


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors, written atomically; tensors are made contiguous CPU copies (shared storage is split)."""
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=metadata)


def load_tensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise PuzzleError(f"{path} does not exist")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as e:  # the types safetensors raises for a damaged file
        raise PuzzleError(f"{path} is not a readable safetensors file ({e}); it may be truncated: re-create it") from None


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory under a temporary name; it replaces `path` only when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path.parent, path.name)  # left by a killed writer of the same directory
    tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix(path.name), suffix=".tmp", dir=path.parent))
    match_umask(tmp)  # mkdtemp makes it 0700
    try:
        yield tmp
        replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(src: str | Path, dst: str | Path) -> None:
    """Make the complete directory `src` (same filesystem) appear as `dst`, durably.

    Everything under `src` is fsynced first. An existing `dst` is swapped with `src` in one step and then
    deleted, so `dst` names the old or the new directory at every moment; only where the swap is not available
    (not Linux, or a filesystem without RENAME_EXCHANGE) is it moved aside and `src` renamed in, a short window
    in which `dst` is missing.
    """
    src, dst = Path(src), Path(dst)
    _fsync_tree(src)
    if not dst.exists():
        os.replace(src, dst)
    elif _exchange(src, dst):
        shutil.rmtree(src, ignore_errors=True)  # `src` now names the old directory
    else:
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    fsync_path(dst.parent)


def _fsync_tree(root: Path) -> None:
    """fsync every file, then every directory bottom-up (a directory's entries are durable once it is synced)."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            if not os.path.islink(os.path.join(dirpath, name)):
                fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths with renameat2(RENAME_EXCHANGE); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no libc to load, or a libc older than glibc 2.28
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # the kernel or filesystem lacks the flag
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def hash_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_json(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=_json_default).encode()).hexdigest()


def hash_paths(paths: list[str | Path]) -> str:
    """One hash over files (and directories, recursively, skipping hidden temporaries)."""
    h = hashlib.sha256()
    for p in sorted(Path(p) for p in paths):
        files = sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")) if p.is_dir() else [p]
        for f in files:
            h.update(str(f.relative_to(p.parent)).encode())
            h.update(hash_file(f).encode())
    return h.hexdigest()


def fingerprint_files(path: str | Path, recursive: bool = False) -> list[list[Any]]:
    """[name relative to `path`, size, mtime_ns] of the files in directory `path` (or of the file itself), sorted;
    hidden names (temporaries, work directories, stamps) skipped, [] when missing. Cheap change detection:
    multi-GB weights are not hashed."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        found = path.rglob("*") if recursive else path.iterdir()
        files = [f for f in found if f.is_file() and not any(
            part.startswith(".") for part in f.relative_to(path).parts)]
    else:
        return []
    root = path.parent if path.is_file() else path
    return sorted([str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns] for f in files)


def stage_is_current(out_dir: str | Path, inputs_hash: str) -> bool:
    stamp = Path(out_dir) / STAMP
    if not stamp.exists():
        return False
    try:
        return json.loads(stamp.read_text()).get("inputs_hash") == inputs_hash
    except json.JSONDecodeError:
        return False


def mark_stage_done(out_dir: str | Path, stage: str, inputs_hash: str, **info: Any) -> None:
    write_json(Path(out_dir) / STAMP, {"stage": stage, "inputs_hash": inputs_hash, **info})


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")
