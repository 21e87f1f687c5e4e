"""Processes whose gloo group outlives teardown (FSDP2) exit without finalizing the interpreter, others normally.

Finalizing while gloo's worker threads live aborted such processes (SIGABRT, "terminate called without an
active exception") in about one run in five of test_uptrain_distributed's FSDP case under load.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("dist_exit_worker.py")


@pytest.mark.parametrize(("mode", "lingers"), [("fsdp", True), ("plain", False)])
def test_exit_path_after_gloo_teardown(tmp_path: Path, mode: str, lingers: bool) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(WORKER), mode], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"lingering={lingers}" in proc.stdout
    # finalization (atexit) is skipped exactly when the group lingers: both ranks, or neither
    assert proc.stdout.count("finalized") == (0 if lingers else 2)
