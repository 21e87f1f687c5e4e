"""The library stage of a real run on 1 GPU and on N GPUs (torchrun, NCCL), and a rank killed mid-stage.

Starts from a run directory whose import and data stages are done (`puzzle run CONFIG --until data`) and runs
`puzzle library` three times on copies of it:
  one     `python -m puzzle.cli library RUN`, one GPU
  ranks   `torchrun --standalone --nproc-per-node N -m puzzle.cli library RUN`
  killed  the same N-rank command; once the first entries are written one worker is SIGKILLed, torchrun must
          stop the job (non-zero exit), and the same command again must keep every finished entry byte for
          byte and complete the library
and records wall times, trained tokens/s (total and per GPU), scaling efficiency, each rank's items and peak
memory (library.json's `ranks`), and how far the N-rank entries are from the one-GPU ones (same entry set;
validation NMSE after BLD, max abs and relative difference).

    puzzle run configs/smollm2-135m-h200.yaml parent=... run_dir=/root/runs/base --until data
    python benchmarks/library_ranks.py --base /root/runs/base --ranks 2 --out library_ranks.json [key=value ...]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import metadata
from bld_throughput import compare_entries, val_nmse_by_entry

from puzzle.core.artifacts import write_json


def library_command(run: Path, ranks: int, overrides: list[str]) -> list[str]:
    cli = ["-m", "puzzle.cli", "library", str(run), *overrides]
    if ranks == 1:
        return [sys.executable, *cli]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), *cli]


def fresh_copy(base: Path, dest: Path) -> Path:
    """The base run without any library, so every mode trains from scratch."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(base, dest, ignore=shutil.ignore_patterns("library", "scores", "costs", "search", "children"))
    return dest


def run_timed(command: list[str], env: dict[str, str], log: Path) -> tuple[int, float]:
    start = time.perf_counter()
    with open(log, "w") as out:
        rc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, check=False).returncode
    return rc, time.perf_counter() - start


def entries(library: Path) -> dict[str, float]:
    """The finished library's validation nMSE after BLD per entry (bld_throughput's keys)."""
    return val_nmse_by_entry(json.loads((library / "library.json").read_text())["entries"])


def snapshot(library: Path) -> dict[str, str]:
    """sha256 of every finished entry file (sidecar JSON and its weights)."""
    return {str(p.relative_to(library)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(library.glob("layer*/*")) if not p.name.startswith(".")}


def workers_of(pid: int) -> list[int]:
    """The processes whose parent is `pid` (torchrun's workers), read from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def summary(run: Path, wall: float) -> dict[str, Any]:
    index = json.loads((run / "library" / "library.json").read_text())
    tokens = sum(int(e["metrics"].get("tokens") or 0) for e in index["entries"])
    stage = max((r["wall_s"] for r in index.get("ranks") or []), default=None)  # in-stage: no start-up, no loading
    return {"wall_s": round(wall, 2), "stage_wall_s": stage, "entries": len(index["entries"]), "trained_tokens": tokens,
            "trained_tokens_per_s": round(tokens / wall, 1), "ranks": index.get("ranks")}


def kill_one_rank(command: list[str], env: dict[str, str], log: Path, library: Path, find_s: float, end_s: float,
                  poll_s: float = 0.05) -> tuple[int | None, int]:
    """Start a torchrun library job; once a first entry is on disk (or after find_s), SIGKILL one worker (the
    highest pid: one rank only, so the agent must notice and stop the job itself); wait up to end_s for the agent.
    Returns (the killed pid or None, the agent's exit code)."""
    with open(log, "w") as out:
        agent = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        victim, deadline = None, time.monotonic() + find_s
        try:
            while not list(library.glob("layer*/*.json")) and agent.poll() is None and time.monotonic() < deadline:
                time.sleep(poll_s)
            workers = workers_of(agent.pid)
            if workers and agent.poll() is None:
                victim = max(workers)
                os.kill(victim, signal.SIGKILL)
            agent.wait(timeout=end_s)
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
    return victim, agent.returncode


def kill_and_restart(base: Path, work: Path, ranks: int, overrides: list[str], env: dict[str, str],
                     logs: Path) -> dict[str, Any]:
    run = fresh_copy(base, work / "killed")
    library = run / "library"
    command = library_command(run, ranks, overrides)
    victim, first_exit = kill_one_rank(command, env, logs / "killed_first.log", library, find_s=300, end_s=300)
    finished = {p.stem for p in library.glob("layer*/*.json")}
    kept = {k: v for k, v in snapshot(library).items() if Path(k).stem in finished}
    index_before = (library / "library.json").exists()  # must not be: the stage had not finished
    rc, wall = run_timed(command, env, logs / "killed_restart.log")
    after = snapshot(library) if rc == 0 else {}
    result = {"killed_pid": victim, "first_exit_code": first_exit, "finished_before_restart": len(finished),
              "index_before_restart": index_before,
              "restart_exit_code": rc, "restart_wall_s": round(wall, 2),
              "finished_entries_unchanged": bool(kept) and all(after.get(k) == v for k, v in kept.items()),
              "entries_after_restart": len(entries(library)) if rc == 0 else None}
    result["ok"] = (victim is not None and first_exit != 0 and not index_before and rc == 0
                    and result["finished_entries_unchanged"])
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, required=True, help="run directory with import and data done")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None, help="where the copies go (default: beside --base)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--skip-kill", action="store_true")
    ap.add_argument("overrides", nargs="*", help="library config key=value for every mode (e.g. progress=false)")
    args = ap.parse_args()
    work = args.work or args.base.parent / f"{args.base.name}-library-ranks"
    logs = args.out.parent / f"{args.out.stem}_logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    out: dict[str, Any] = {"meta": metadata(), "benchmark": "library_ranks", "base": str(args.base),
                           "ranks": args.ranks}
    walls: dict[int, float] = {}
    found: dict[int, dict[str, float]] = {}
    for n in (1, args.ranks):
        run = fresh_copy(args.base, work / f"ranks{n}")
        rc, wall = run_timed(library_command(run, n, args.overrides), env, logs / f"ranks{n}.log")
        if rc != 0:
            out[f"ranks_{n}"] = {"exit_code": rc, "log": (logs / f"ranks{n}.log").read_text()[-2000:]}
            write_json(args.out, out)
            return 1
        walls[n], found[n] = wall, entries(run / "library")
        out[f"ranks_{n}"] = summary(run, wall)
        print(f"{n} rank(s): {out[f'ranks_{n}']}", flush=True)
    n = args.ranks
    speedup = walls[1] / walls[n]
    out["speedup"] = round(speedup, 3)
    out["scaling_efficiency"] = round(speedup / n, 3)
    stage = [out[f"ranks_{k}"]["stage_wall_s"] for k in (1, n)]
    out["stage_speedup"] = round(stage[0] / stage[1], 3) if all(stage) else None
    out["per_gpu_tokens_per_s"] = {str(k): round(out[f"ranks_{k}"]["trained_tokens_per_s"] / k, 1) for k in (1, n)}
    out["vs_one_gpu"] = {**compare_entries(found[n], found[1]),
                         "val_nmse_after_mean_one": sum(found[1].values()) / max(len(found[1]), 1)}
    print(f"speed-up {speedup:.2f}x on {n} GPUs; entries vs one GPU: {out['vs_one_gpu']}", flush=True)
    write_json(args.out, out)
    if not args.skip_kill:
        out["kill_restart"] = kill_and_restart(args.base, work, n, args.overrides, env, logs)
        print(f"kill/restart: {out['kill_restart']}", flush=True)
        write_json(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
