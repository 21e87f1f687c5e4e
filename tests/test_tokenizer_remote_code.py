"""A Nemotron-NAS export (config.json with remote-code `auto_map`) yields its tokenizer without asking on stdin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from puzzle.demo.tokenizer import train_tokenizer
from puzzle.formats import export_hf
from puzzle.model.decoder import build_model
from puzzle.model.presets import tiny_llama_config

TEXT = "The cat sat on the mat. The dog sat on the log.\n" * 30


def _export(tmp_path: Path) -> Path:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(TEXT)
    tok = train_tokenizer(corpus, tmp_path / "tok", vocab_size=300)
    model = build_model(tiny_llama_config(num_layers=2, vocab_size=300), seed=0)
    out = tmp_path / "child"
    export_hf(model, out, tokenizer_source=tok)
    return out


def test_nemotron_nas_tokenizer_loads_without_prompt(tmp_path: Path) -> None:
    child = _export(tmp_path)
    assert "auto_map" in (child / "config.json").read_text()  # the case that made transformers ask
    code = ("import sys; from puzzle.formats.tokenizers import load_tokenizer; "
            "import json; t = load_tokenizer(sys.argv[1]); "
            "print(json.dumps([t.encode('The cat sat'), t.bos_id, t.vocab_size]))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    # stdin is an open pipe nobody writes to: a trust prompt would wait on it (transformers waits 15 s) and
    # be killed by the timeout below.
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code, str(child)], stdin=subprocess.PIPE, capture_output=True,
                          text=True, timeout=60, env=env, check=False)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "custom code" not in proc.stdout + proc.stderr and "trust_remote_code" not in proc.stdout + proc.stderr
    assert elapsed < 14, f"tokenizer load took {elapsed:.1f}s: something waited for input"
    ids, bos, vocab = json.loads(proc.stdout.strip().splitlines()[-1])
    assert ids and bos == 1 and vocab > 256  # byte-level BPE: 256 bytes, specials and some merges
    # and no remote module was imported or copied into the HF modules cache for it
    assert "modeling_decilm" not in proc.stderr
