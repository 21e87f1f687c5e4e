"""GKD under `torchrun --nproc-per-node 2` (gloo, CPU) matches the single-process run on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

WORKER = Path(__file__).parent / "gkd_dist_worker.py"


def _run(cmd: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _torchrun(tmp_path: Path, mode: str) -> dict:
    out = tmp_path / f"{mode}.json"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
          str(WORKER), str(out), mode, "2", str(tmp_path / f"work-{mode}")], tmp_path)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("single")
    out = tmp / "single.json"
    _run([sys.executable, str(WORKER), str(out), "auto", "4", str(tmp / "work")], tmp)
    return json.loads(out.read_text())


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_gkd_matches_single_process(tmp_path: Path, single: dict, mode: str) -> None:
    multi = _torchrun(tmp_path, mode)
    assert multi["world_size"] == 2 and multi["mode"] == mode
    assert single["world_size"] == 1 and single["mode"] == "none"
    assert [r["rank"] for r in multi["ranks"]] == [0, 1] and all(r["steps"] == 4 for r in multi["ranks"])
    for key in ("loss", "kl", "cosine"):
        a = [r[key] for r in single["train"]]
        b = [r[key] for r in multi["train"]]
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6), key
    a = [v["kl"] for v in single["valid"]]
    b = [v["kl"] for v in multi["valid"]]
    assert b == pytest.approx(a, rel=1e-4, abs=1e-6)
    # the step-2 checkpoint resumes exactly under two ranks: under FSDP each rank wrote and reads its own shards,
    # under DDP rank 0 wrote the (identical) state and both ranks read it
    ckpt = tmp_path / f"work-{mode}" / "checkpoint"
    shard_keys = [len(safe_open(ckpt / f"rank{r}.safetensors", "pt").keys()) for r in range(2)]
    assert shard_keys[1] == shard_keys[0] if mode == "fsdp" else shard_keys[1] < shard_keys[0], shard_keys
    assert not [p for p in ckpt.iterdir() if p.suffix not in (".json", ".safetensors")], "no pickle files"
    again = _torchrun(tmp_path, mode)
    assert again["resumed_from"] == 2
    assert [r["loss"] for r in again["train"]] == pytest.approx([r["loss"] for r in multi["train"]], rel=1e-6)
