"""Measured costs of a tensor-parallel workload: `measure_workload` run on `w.tensor_parallel` ranks at once,
each timing its shard (`puzzle.runtime.tensor_parallel`) of every stack with the all-reduces inside.

The costs stage spawns the ranks itself (torch.multiprocessing, a file store in a temporary directory;
NCCL on GPUs 0..n-1, gloo on CPU) for each TP workload, rather than asking to be launched under torchrun:
`puzzle run` / `puzzle costs` with a `tensor_parallel: 2` workload then just works on a multi-GPU box from
one plain command, a run may mix degrees (1, 2, 4) without relaunching, and the pipeline keeps costs a
rank-0 stage. Under torchrun the other pipeline ranks wait in a collective meanwhile, which can occupy a few
SMs on their GPUs: for clean TP costs run the costs stage without torchrun.

Every rank runs the same sequence of timings (same seeds, same token draws); each sample is the maximum over
the ranks (a step ends when its slowest rank does), so every rank sees the same numbers and takes the same
decisions (re-timing, out-of-memory); rank 0 returns the body, the others only time.
"""

from __future__ import annotations

import os
import pickle
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from puzzle.core.dtypes import FP8, compute_dtype_name, torch_dtype
from puzzle.core.errors import PuzzleError
from puzzle.core.workloads import Workload
from puzzle.costs.measure import TimeModel, measure_workload, time_engine
from puzzle.model.blocks import AttentionConfig, FFNConfig, ModelConfig
from puzzle.model.decoder import build_model
from puzzle.runtime.tensor_parallel import shard_model, tensor_parallel_engine

if TYPE_CHECKING:
    from puzzle.costs.stage import CostsConfig

# gloo ranks on CPU exist for tests and laptops; more than this only oversubscribes the cores.
MAX_CPU_RANKS = 8


def available_ranks(device: torch.device) -> int:
    """Ranks a TP measurement may use: the visible GPUs (cuda), or MAX_CPU_RANKS gloo processes (cpu)."""
    return torch.cuda.device_count() if device.type == "cuda" else MAX_CPU_RANKS


def check_ranks(w: Workload, device: torch.device, dtype: str = "bfloat16") -> None:
    """One line naming the workload and what stops its measurement: FP8 (not measured with TP yet), or not
    enough devices for its degree (with what was found)."""
    if dtype == FP8:
        raise PuzzleError(f"workload {w.name!r}: costs.dtype=fp8 is not measured with tensor parallelism yet; "
                          "use costs.dtype=bfloat16 for TP workloads")
    have, n = available_ranks(device), w.tensor_parallel
    if n <= have:
        return
    if device.type == "cuda":
        found = f"{have} GPU{'s' if have != 1 else ''}" + (f" ({torch.cuda.get_device_name(0)})" if have else "")
        raise PuzzleError(f"workload {w.name!r}: tensor_parallel={n} needs {n} GPUs to measure; found {found}; "
                          "run the costs stage on a machine with that many, or use costs.mode=estimate")
    raise PuzzleError(f"workload {w.name!r}: tensor_parallel={n} needs {n} ranks; costs.device=cpu allows at most "
                      f"{have} (MAX_CPU_RANKS); lower the degree or measure on GPUs")


def tp_graph_mode(mode: str, device: torch.device) -> str:
    """The runtime's decode mode under TP: CUDA-graph capture of the eager kernels ("manual") unless "none"
    is asked for; the fused regions would skip the all-reduce (`tensor_parallel_engine`)."""
    return "none" if device.type != "cuda" or mode == "none" else "manual"


def _max_over_ranks(samples: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(samples, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _any_rank(flag: bool, device: torch.device) -> bool:
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def tp_timer(rank: int, world: int) -> TimeModel:
    """A `TimeModel` timing this rank's shard of the model on a TP engine, samples agreed over the ranks."""

    def timer(config: ModelConfig, w: Workload, ctx: int, cfg: CostsConfig, device: torch.device,
              gen: torch.Generator) -> tuple[list[float], list[float]]:
        engine = None
        try:  # an out-of-memory model is out of memory on every rank, or the others would wait forever
            # sharded in place: each projection gives way to its slice, never two full models on a rank
            model = build_model(config, device=device, dtype=torch_dtype(compute_dtype_name(cfg.dtype)), seed=0)
            sharded = shard_model(model.eval(), rank, world, inplace=True)
            engine = tensor_parallel_engine(sharded, w.batch_size, max(w.prompt_len, ctx) + 1,
                                            graphs=tp_graph_mode(cfg.graphs, device), bucket=1)  # type: ignore[arg-type]
        except torch.cuda.OutOfMemoryError:
            engine = None
        if _any_rank(engine is None, device):
            engine = None
            torch.cuda.empty_cache()
            raise torch.cuda.OutOfMemoryError(f"a rank of {world} ran out of memory building {config.num_layers} layers")
        prefill, decode = time_engine(engine, config.vocab_size, w, ctx, cfg, device, gen)
        return _max_over_ranks(prefill, device), _max_over_ranks(decode, device)

    return timer


def _worker(rank: int, world: int, tmp: str, args: tuple[Any, ...]) -> None:
    model, atts, ffns, w, cfg, ctx, device_type = args
    os.environ.pop("TORCHELASTIC_RUN_ID", None)  # a torchrun parent's: this group is not torchrun's
    if rank:  # rank 0 reports progress; the others only time
        sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    cuda = device_type == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:  # the ranks share the cores: oversubscribed threads would time the scheduler, not the model
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{tmp}/store", rank=rank,
                            world_size=world, device_id=device if cuda else None)
    try:
        body = measure_workload(model, atts, ffns, w, cfg, ctx, device, tp_timer(rank, world))
        if rank == 0:
            Path(tmp, "result.pkl").write_bytes(pickle.dumps(body))
    except PuzzleError as e:  # one line for the parent; the raise ends the other ranks
        Path(tmp, f"error{rank}.txt").write_text(str(e))
        raise
    finally:
        dist.destroy_process_group()


def measure_tensor_parallel(model: ModelConfig, atts: list[AttentionConfig], ffns: list[FFNConfig], w: Workload,
                            cfg: CostsConfig, ctx: int, device: torch.device) -> dict[str, Any]:
    """`measure_workload`'s body for a TP workload, timed on `w.tensor_parallel` spawned ranks (module doc)."""
    check_ranks(w, device, cfg.dtype)
    with tempfile.TemporaryDirectory(prefix="puzzle-tp-costs-") as tmp:
        try:
            mp.spawn(_worker, args=(w.tensor_parallel, tmp, (model, atts, ffns, w, cfg, ctx, device.type)),
                     nprocs=w.tensor_parallel, join=True)
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            errors = sorted(Path(tmp).glob("error*.txt"))
            if errors:
                raise PuzzleError(errors[0].read_text()) from None
            raise PuzzleError(f"workload {w.name!r}: a tensor-parallel costs rank failed: "
                              f"{str(e).strip().splitlines()[-1]}") from None
        return pickle.loads(Path(tmp, "result.pkl").read_bytes())
