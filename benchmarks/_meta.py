"""Provenance recorded with every benchmark result: date, machine, torch, command, git commit."""

from __future__ import annotations

import datetime
import platform
import subprocess
import sys

import torch


def metadata() -> dict[str, object]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        commit = ""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": platform.node(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "git_commit": commit or "unknown",
    }
