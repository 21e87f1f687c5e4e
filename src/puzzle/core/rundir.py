"""`RunDir`: every artifact path of a run directory, named once.

Stages ask it for their inputs and outputs instead of joining string literals, so a newcomer finds the
whole layout here:

    RUN/
      config.json                 the run's config (`puzzle run` writes it; single-stage commands start from it)
      warnings.json               fallbacks a stage took (puzzle.core.notices)
      parent/                     import: the parent in the native format
      data/                       data: manifest.json, train.bin, valid.bin, test.bin
      library/                    library: library.json, one safetensors + sidecar per trained variant
      scores/                     score: scores.json, scores.csv, layers/layer_NNNN.json
      costs/                      costs: <device>-<workload>.json per workload
      search/                     search: solutions.json, solutions.csv, verify.json
      children/<name>/            realize: an HF Nemotron-NAS directory; uptrained/ holds its GKD result
      eval/                       eval: eval.json
      report.md, report/          report: the report and its plots
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    def __fspath__(self) -> str:
        return str(self.root)

    # ---- run-wide files ----
    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def warnings(self) -> Path:
        return self.root / "warnings.json"

    # ---- one directory per stage ----
    @property
    def parent(self) -> Path:
        return self.root / "parent"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def data_manifest(self) -> Path:
        return self.data / "manifest.json"

    def data_split(self, split: str) -> Path:
        return self.data / f"{split}.bin"

    @property
    def library(self) -> Path:
        return self.root / "library"

    @property
    def library_index(self) -> Path:
        return self.library / "library.json"

    @property
    def scores(self) -> Path:
        return self.root / "scores"

    @property
    def scores_file(self) -> Path:
        return self.scores / "scores.json"

    @property
    def costs(self) -> Path:
        return self.root / "costs"

    def costs_file(self, device_key: str, workload: str) -> Path:
        return self.costs / f"{device_key}-{workload}.json"

    @property
    def search(self) -> Path:
        return self.root / "search"

    @property
    def solutions(self) -> Path:
        return self.search / "solutions.json"

    @property
    def verify(self) -> Path:
        return self.search / "verify.json"

    @property
    def children(self) -> Path:
        return self.root / "children"

    def child(self, name: str) -> Path:
        return self.children / name

    def uptrained(self, name: str) -> Path:
        return self.child(name) / "uptrained"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def eval_file(self) -> Path:
        return self.eval / "eval.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def plots(self) -> Path:
        return self.root / "report"
