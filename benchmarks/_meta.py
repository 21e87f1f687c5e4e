"""Provenance recorded with every benchmark result: date, machine, torch, command, git commit (+ dirty state)."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=False, cwd=ROOT).stdout
    except OSError:
        return ""


def git_state() -> dict[str, object]:
    """HEAD, whether the working tree differs from it, and a hash of that difference (tracked + untracked files
    under src/ and benchmarks/), so a result run from uncommitted code still names exactly what ran."""
    saved = os.environ.get("PUZZLE_GIT_STATE_FILE")
    if saved and Path(saved).is_file():  # a copy whose .git is missing or stale (a GPU machine): trust the saved state
        return {**json.loads(Path(saved).read_text()), "git_state_from": f"saved before the run ({saved})"}
    commit = _git("rev-parse", "HEAD").strip()
    diff = _git("diff", "HEAD")
    untracked = _git("ls-files", "--others", "--exclude-standard", "src", "benchmarks").split()
    digest = hashlib.sha256(diff.encode())
    for name in sorted(untracked):
        path = ROOT / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    dirty = bool(diff.strip() or untracked)
    return {"git_commit": commit if len(commit) == 40 else "unknown", "dirty": dirty, "diff_sha256": digest.hexdigest() if dirty else None,
            "uncommitted_files": sorted({*_git("diff", "HEAD", "--name-only").split(), *untracked})}


def metadata() -> dict[str, object]:
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": platform.node(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        **git_state(),
    }


if __name__ == "__main__":  # save the state for a run on a copy of the tree without .git
    print(json.dumps(git_state(), indent=1))
