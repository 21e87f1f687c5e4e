"""Named inference workloads: batch size, prompt length, generated length (the paper's Table 3 scenarios)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from puzzle.core.errors import PuzzleError


@dataclass(frozen=True)
class Workload:
    name: str
    batch_size: int
    prompt_len: int
    gen_len: int

    def __post_init__(self) -> None:
        for field_name in ("batch_size", "prompt_len", "gen_len"):
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
        return {"name": self.name, "batch_size": self.batch_size, "prompt_len": self.prompt_len, "gen_len": self.gen_len}


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


def resolve_workloads(names: list[str], run_dir: Path | None = None) -> list[Workload]:
    """Workloads by name: those defined in the run's costs files first (custom shapes), then the defaults."""
    known: list[Workload] = []
    if run_dir is not None:
        from puzzle.costs.stage import read_costs_file  # a damaged costs file is an error naming it, never skipped

        for path in sorted((Path(run_dir) / "costs").glob("*.json")):
            spec = read_costs_file(path)["workload"]
            if spec.get("name") not in {w.name for w in known}:
                known.append(Workload(**spec))
    known += [w for w in DEFAULT_WORKLOADS if w.name not in {k.name for k in known}]
    return [workload_by_name(n, known) for n in names]
