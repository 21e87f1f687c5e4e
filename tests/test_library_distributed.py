"""`torchrun --nproc-per-node 2` (gloo, CPU) builds the same set of library entries as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("library_dist_worker.py")


def _entries(library_dir: Path) -> set[tuple]:
    data = json.loads((library_dir / "library.json").read_text())
    return {(e["layer"], e["kind"], json.dumps(e["attention"]), json.dumps(e["ffn"]), e["file"])
            for e in data["entries"]}


def test_two_ranks_match_one_process(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    single = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "one")], env=env, check=False,
                            capture_output=True, text=True, timeout=120)
    assert single.returncode == 0, single.stderr
    dist = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", str(WORKER), str(tmp_path / "two")], env=env, check=False,
                          capture_output=True, text=True, timeout=180)
    assert dist.returncode == 0, dist.stderr[-3000:]
    one, two = _entries(tmp_path / "one"), _entries(tmp_path / "two")
    assert one == two and len(one) == 3 * (4 + 5)
    # both ranks really trained: the work split put trained entries on each of them
    ranks = {json.loads(p.read_text())["metrics"]["wave_items"] for p in (tmp_path / "two").rglob("layer*/*.json")}
    assert ranks  # sidecars exist for every entry
    sums = {json.loads(p.read_text())["metrics"]["wave_items"] for p in (tmp_path / "one").rglob("layer*/*.json")}
    assert max(ranks) < max(sums)  # each rank trained only part of the items
    # library.json records what each rank did: the split covers every item once, and each rank trained tokens
    per_rank = json.loads((tmp_path / "two" / "library.json").read_text())["ranks"]
    assert [r["rank"] for r in per_rank] == [0, 1]
    assert sum(r["items"] for r in per_rank) == len(two)
    assert all(r["trained_tokens"] > 0 and r["wall_s"] > 0 and r["peak_memory_gib"] is None for r in per_rank)
    solo = json.loads((tmp_path / "one" / "library.json").read_text())["ranks"]
    assert len(solo) == 1 and solo[0]["trained_tokens"] == sum(r["trained_tokens"] for r in per_rank)
