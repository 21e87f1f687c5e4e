"""The `import` stage: read the parent (any supported format) into RUN_DIR/parent/ in native form.

Skipped when RUN_DIR/parent/ is current: its stamp holds a fingerprint of the source (file names, sizes and
modification times; hashing a 140 GB parent on every run would cost minutes).
"""

from __future__ import annotations

import sys
from pathlib import Path

from puzzle.core.artifacts import hash_json, mark_stage_done, stage_is_current
from puzzle.core.errors import PuzzleError
from puzzle.core.notices import clear_warnings, warn
from puzzle.core.rundir import RunDir
from puzzle.formats import detect_format, load_model, save_model
from puzzle.formats.tokenizers import has_tokenizer, load_tokenizer

STAGE = "import"


def source_fingerprint(parent_path: str | Path) -> str:
    path = Path(parent_path).resolve()
    if not path.exists():
        raise PuzzleError(f"parent {path} does not exist; pass a model directory, a .gguf or a llama2.c .bin")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    if path.is_file():  # a llama2.c model: its tokenizer beside it counts too
        files += sorted(path.parent.glob("tok*.bin"))
    return hash_json({
        "source": str(path),
        "files": [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files],
    })


def run_import(run_dir: Path | RunDir, parent_path: str) -> Path:
    """Write run_dir/parent/ (native) from `parent_path`; returns that directory. Does nothing when current."""
    run = RunDir(run_dir)
    out = run.parent
    fingerprint = source_fingerprint(parent_path)
    if stage_is_current(out, fingerprint):
        print(f"import: {out} is current; nothing to do", file=sys.stderr)
        return out
    fmt = detect_format(parent_path)
    model = load_model(parent_path)
    # A tokenizer that is there but does not load is an error, not a parent without one.
    clear_warnings(run.root, STAGE)
    tokenizer = load_tokenizer(parent_path) if has_tokenizer(parent_path) else None
    if tokenizer is None:
        warn(run.root, STAGE, f"{parent_path} has no tokenizer (tokenizer.model, tokenizer.json or tok*.bin); "
                             "the data stage needs data.tokenizer, and children are written without one")
    save_model(model, out, tokenizer_source=tokenizer)
    mark_stage_done(out, STAGE, fingerprint, source=str(Path(parent_path).resolve()), source_format=fmt,
                    params=model.config.param_count())
    print(f"import: wrote {out} from {parent_path} ({fmt}, {model.config.num_layers} layers)", file=sys.stderr)
    return out
