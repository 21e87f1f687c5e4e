"""`RunDir`: every artifact path of a run directory, named once.

Stages ask it for their inputs and outputs instead of joining string literals, so a newcomer finds the
whole layout here:

    RUN/
      config.json                 the run's config (`puzzle run` writes it; single-stage commands start from it)
      warnings.json               fallbacks a stage took (puzzle.core.notices)
      parent/                     import: the parent in the native format
      data/                       data: manifest.json, train.bin, valid.bin, test.bin
      library/                    library: library.json, layer_NNNN/<entry>.json + .safetensors per trained variant
      scores/                     score: scores.json, scores.csv, layers/layer_NNNN.json
      costs/                      costs: <device>-<workload>.json per workload
      search/                     search: solutions.json, solutions.csv, verify.json
      refine/                     refine (opt-in): library/ (coupled BLD of the chosen pairs, the library format),
                                  scores.json (re-scored rows), solutions.json (the search on them), layers/
      children/<name>/            realize: an HF Nemotron-NAS directory (config.json, ...); uptrained/ holds its GKD
                                  result (an HF directory + training_log.json)
      eval/                       eval: eval.json
      report.md, report/          report: the report and its plots
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    root: Path

    # File names inside a stage's directory, for stages that write into a temporary directory and rename it.
    MANIFEST = "manifest.json"
    LIBRARY_INDEX = "library.json"
    LIBRARY_SUMMARY = "summary.csv"  # every entry's nMSE before / after BLD (the terminal shows the worst)
    MODEL_CONFIG = "config.json"
    UPTRAINED = "uptrained"
    TRAINING_LOG = "training_log.json"

    def __init__(self, root: str | Path | RunDir) -> None:
        object.__setattr__(self, "root", root.root if isinstance(root, RunDir) else Path(root))

    @staticmethod
    def split_file(split: str) -> str:
        return f"{split}.bin"

    @staticmethod
    def model_config(model_dir: Path) -> Path:
        """The config of a model directory (the parent, a child, an uptrained child)."""
        return Path(model_dir) / RunDir.MODEL_CONFIG

    @staticmethod
    def uptrained_of(child_dir: Path) -> Path:
        return Path(child_dir) / RunDir.UPTRAINED

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
        return self.data / self.MANIFEST

    def data_split(self, split: str) -> Path:
        return self.data / self.split_file(split)

    @property
    def library(self) -> Path:
        return self.root / "library"

    @property
    def library_index(self) -> Path:
        return self.library / self.LIBRARY_INDEX

    def library_entry_files(self) -> list[Path]:
        """The sidecar of every trained library entry (layer_NNNN/<entry>.json)."""
        return sorted(self.library.glob("layer*/*.json"))

    @property
    def scores(self) -> Path:
        return self.root / "scores"

    @property
    def scores_file(self) -> Path:
        return self.scores / "scores.json"

    @property
    def scores_csv(self) -> Path:
        return self.scores / "scores.csv"

    def score_layer(self, layer: int) -> Path:
        """One layer's scores, written as soon as the layer is done (a resumed score skips it)."""
        return self.scores / "layers" / f"layer_{layer:04d}.json"

    @property
    def costs(self) -> Path:
        return self.root / "costs"

    def costs_file(self, device_key: str, workload: str) -> Path:
        return self.costs / f"{device_key}-{workload}.json"

    def costs_files(self) -> list[Path]:
        return sorted(self.costs.glob("*.json"))

    @property
    def search(self) -> Path:
        return self.root / "search"

    @property
    def solutions(self) -> Path:
        return self.search / "solutions.json"

    @property
    def solutions_csv(self) -> Path:
        return self.search / "solutions.csv"

    @property
    def verify(self) -> Path:
        return self.search / "verify.json"

    @property
    def refine(self) -> Path:
        return self.root / "refine"

    @property
    def refine_library(self) -> Path:
        return self.refine / "library"

    @property
    def refine_scores(self) -> Path:
        return self.refine / "scores.json"

    @property
    def refine_solutions(self) -> Path:
        return self.refine / "solutions.json"

    def solutions_in_use(self) -> Path:
        """The solutions the children were realized from: refine/solutions.json when the run's config
        (config.json) enables refine and the file exists, else search/solutions.json. What the report and the
        summary describe, so that they speak of the children realize built."""
        config = json.loads(self.config.read_text()) if self.config.is_file() else {}
        enabled = bool((config.get("refine") or {}).get("enabled", False))
        return self.refine_solutions if enabled and self.refine_solutions.is_file() else self.solutions

    def refine_score_layer(self, layer: int) -> Path:
        """One layer's re-scored rows, written as soon as the layer is done (a resumed refine skips it)."""
        return self.refine / "layers" / f"layer_{layer:04d}.json"

    @property
    def children(self) -> Path:
        return self.root / "children"

    def child(self, name: str) -> Path:
        return self.children / name

    def child_dirs(self) -> list[Path]:
        """Every directory under children/ (hidden temporaries left out), realized or not."""
        if not self.children.is_dir():
            return []
        return sorted(p for p in self.children.glob("*") if p.is_dir() and not p.name.startswith("."))

    def uptrained(self, name: str) -> Path:
        return self.uptrained_of(self.child(name))

    def training_log(self, name: str) -> Path:
        return self.uptrained(name) / self.TRAINING_LOG

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
