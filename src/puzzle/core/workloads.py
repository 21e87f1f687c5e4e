"""Named inference workloads: batch size, prompt length, generated length (the paper's Table 3 scenarios)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from puzzle.core.config import check_moved_keys, from_dict, read_yaml, saved_run_config
from puzzle.core.errors import PuzzleError


@dataclass(frozen=True)
class Workload:
    name: str
    batch_size: int
    prompt_len: int
    gen_len: int
    # GPUs the model is split over (Megatron tensor parallelism, `puzzle.runtime.tensor_parallel`): the costs
    # stage times it on that many spawned ranks (`puzzle.costs.tensor_parallel`) or estimates one GPU's share;
    # the search prices its memory per GPU; eval and the search's measured check do not time it (one GPU).
    tensor_parallel: int = 1

    def __post_init__(self) -> None:
        for field_name in ("batch_size", "prompt_len", "gen_len", "tensor_parallel"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or value <= 0:
                raise PuzzleError(f"workload {self.name!r}: {field_name} must be a positive integer, got {value!r}")

    @property
    def max_seq_len(self) -> int:
        return self.prompt_len + self.gen_len

    @property
    def output_tokens(self) -> int:
        return self.batch_size * self.gen_len

    def to_dict(self) -> dict[str, object]:
        d: dict[str, object] = {"name": self.name, "batch_size": self.batch_size, "prompt_len": self.prompt_len,
                                "gen_len": self.gen_len}
        if self.tensor_parallel != 1:  # absent at 1, so existing artifacts and cache keys stay as they were
            d["tensor_parallel"] = self.tensor_parallel
        return d


# The paper's scenarios (Table 3) at a large batch, plus single-stream chat.
DEFAULT_WORKLOADS: tuple[Workload, ...] = (
    Workload("chatbot", 256, 128, 128),
    Workload("text-generation", 256, 128, 1024),
    Workload("summarization", 64, 2048, 128),
    Workload("long-generation", 64, 2048, 2048),
    Workload("batch1", 1, 128, 128),
)


def workload_by_name(name: str, workloads: tuple[Workload, ...] | list[Workload] = DEFAULT_WORKLOADS) -> Workload:
    for w in workloads:
        if w.name == name:
            return w
    raise PuzzleError(f"unknown workload {name!r}; known: {[w.name for w in workloads]}")


def check_workloads(workloads: list[Workload] | tuple[Workload, ...], where: str = "workloads") -> None:
    """A run's workloads: at least one, each name once."""
    if not workloads:
        raise PuzzleError(f"{where} is empty; name at least one workload, e.g. "
                          "{name: chat, batch_size: 1, prompt_len: 128, gen_len: 128}")
    names = [w.name for w in workloads]
    if len(set(names)) != len(names):
        raise PuzzleError(f"{where} names a workload twice ({names}); give each a distinct name")


def resolve_workloads(names: list[str], workloads: list[Workload] | tuple[Workload, ...] = DEFAULT_WORKLOADS
                      ) -> list[Workload]:
    """Workloads by name: those of the run (its top-level `workloads:`) first, then the built-in ones."""
    known = list(workloads) + [w for w in DEFAULT_WORKLOADS if w.name not in {k.name for k in workloads}]
    return [workload_by_name(n, known) for n in names]


def run_workloads(run_dir: str | Path, path: str | Path | None = None) -> list[Workload]:
    """The workloads of a run for a single-stage command: a YAML config's top-level `workloads:` if it has them,
    else the run's saved config's (RUN/config.json), else the built-in ones."""
    data = read_yaml(path) if path is not None else {}
    if "workloads" not in data:
        data = saved_run_config(run_dir)
    check_moved_keys(data)
    if "workloads" not in data:
        return list(DEFAULT_WORKLOADS)
    items = data["workloads"]
    if not isinstance(items, list):
        raise PuzzleError(f"workloads: expected a list of workloads, got {items!r}")
    workloads = [from_dict(Workload, w, where=f"workloads[{i}]") for i, w in enumerate(items)]
    check_workloads(workloads)
    return workloads
