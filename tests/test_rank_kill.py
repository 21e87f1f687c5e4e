"""BLD under torchrun (2 ranks, gloo): one rank killed mid-stage ends the job; the same command again keeps every
entry either rank had finished and completes the library."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline_helpers import NUM_LAYERS, make_parent, run_config, snapshot, write_yaml
from puzzle.pipeline import load_run_config, run_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from library_ranks import kill_one_rank  # kills one of torchrun's workers, found through /proc

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds torchrun's workers through /proc")


def _entries(library: Path) -> dict[str, Path]:
    return {str(p.relative_to(library)): p for p in sorted(library.glob("layer*/*.json"))}


def test_a_rank_killed_mid_library_then_a_restart_loses_no_finished_entry(tmp_path: Path) -> None:
    parent_src = make_parent(tmp_path / "parent")
    run = tmp_path / "run"
    data = run_config(*parent_src, run)
    # One variant per wave per rank (each written as soon as it is trained) and enough tokens that the stage
    # takes seconds, so the kill lands between the first finished entry and the last.
    data["library"].update(max_items_per_wave=1, tokens_per_variant=12288)
    config = write_yaml(tmp_path / "run.yaml", data)
    run_pipeline(load_run_config(data), until="data", log=lambda msg: None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "puzzle.cli", "run", str(config), "--until", "library"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    library = run / "library"
    log = tmp_path / "killed.log"
    victim, first_exit = kill_one_rank(command, env, log, library, find_s=90, end_s=120, poll_s=0.02)
    assert victim is not None, f"no worker to kill (the stage ended first?):\n{log.read_text()[-3000:]}"
    assert first_exit != 0, "the job went on after one of its ranks was killed"

    total = NUM_LAYERS * 8
    finished = _entries(library)
    assert 0 < len(finished) < total, log.read_text()[-3000:]
    assert not (library / "library.json").exists()
    kept = {name: v for name, v in snapshot(library).items()
            if name in finished or name.removesuffix(".safetensors") + ".json" in finished}

    proc = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=300)  # run it again
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    after = snapshot(library)
    assert {name: after[name] for name in kept} == kept, "finished entries were retrained or rewritten"
    index = json.loads((library / "library.json").read_text())
    assert len(index["entries"]) == total == len(_entries(library))
