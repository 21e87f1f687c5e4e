"""The multi-GPU benchmarks run end to end on CPU over gloo (tiny models): what they compare and record holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pipeline_helpers import make_parent, run_config
from puzzle.pipeline import load_run_config, run_pipeline

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}


def _run(args: list[str], cwd: Path, timeout: int = 240) -> str:
    proc = subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_gkd_ranks_two_processes_follow_the_one_process_trajectory(tmp_path: Path) -> None:
    common = ["--parent", "tiny", "--global-batch", "8", "--seq", "32", "--steps", "8", "--log-every", "2"]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    _run([sys.executable, str(BENCH / "gkd_ranks.py"), *common, "--micro", "4", "--out", str(one)], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
          str(BENCH / "gkd_ranks.py"), *common, "--micro", "4", "--parallel", "ddp", "--reference", str(one),
          "--out", str(two)], tmp_path)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert (a["world_size"], a["grad_accum"], b["world_size"], b["grad_accum"]) == (1, 2, 2, 1)  # same global batch
    assert [r["rank"] for r in b["ranks"]] == [0, 1] and all(r["steps"] == 8 for r in b["ranks"])
    vs = b["vs_reference"]
    assert vs["steps_compared"] == 8 and vs["loss_max_rel_diff"] < 1e-5 and vs["kl_max_rel_diff"] < 1e-5
    assert abs(b["tokens_per_s_per_gpu"] * 2 - b["tokens_per_s"]) < 1


def test_library_ranks_compares_entries_and_records_each_rank(tmp_path: Path) -> None:
    parent, corpus = make_parent(tmp_path / "parent")
    data = run_config(parent, corpus, tmp_path / "base")
    run_pipeline(load_run_config(data), until="data", log=lambda msg: None)
    out = tmp_path / "res" / "library_ranks.json"
    _run([sys.executable, str(BENCH / "library_ranks.py"), "--base", str(tmp_path / "base"), "--ranks", "2",
          "--skip-kill", "--out", str(out), "progress=false"], tmp_path)
    res = json.loads(out.read_text())
    assert res["vs_one_gpu"]["same_entries"] and res["vs_one_gpu"]["val_nmse_after_max_abs_diff"] < 1e-6
    one, two = res["ranks_1"], res["ranks_2"]
    assert one["entries"] == two["entries"] > 0 and one["trained_tokens"] == two["trained_tokens"] > 0
    assert [r["rank"] for r in two["ranks"]] == [0, 1] and sum(r["items"] for r in two["ranks"]) == two["entries"]
    assert abs(res["scaling_efficiency"] - res["speedup"] / 2) <= 1e-3  # each rounded to 3 places on its own
    assert (tmp_path / "res" / "library_ranks_logs" / "ranks2.log").exists()


def test_decode_profile_reports_steps_at_a_context_against_the_roofline(tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    _run([sys.executable, str(BENCH / "decode_profile.py"), "--tiny", "--variants", "fused", "--batches", "1",
          "--itl", "2x64", "--profile", "2x64", "--out", str(out)], tmp_path)
    res = json.loads(out.read_text())["variants"]["fused"]
    step = res["at_context"]["2x64"]
    assert step["step_s"] > 0 and step["roofline"]["ratio_to_floor"] == step["step_s"] / step["roofline"]["floor_s"]
    prof = res["profiles"]["2x64"]
    assert prof["kernels"] and prof["kernel_sum_us"] == sum(k["us_per_step"] for k in prof["kernels"])
