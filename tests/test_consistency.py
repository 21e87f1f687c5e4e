"""Names that agree with what the files are: inspect's architecture, uptrain's messages, exported configs."""

from __future__ import annotations

import json
from pathlib import Path

from puzzle.cli import main
from puzzle.formats import export_hf
from puzzle.formats.native import save_model
from puzzle.model.decoder import build_model
from puzzle.model.presets import tiny_llama_config


def test_inspect_names_the_architecture_the_files_are(tmp_path: Path, capsys) -> None:
    model = build_model(tiny_llama_config(num_layers=2), seed=0)  # imported from a LlamaForCausalLM
    export_hf(model, tmp_path / "child")
    assert main(["inspect", str(tmp_path / "child")]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "(nemotron-nas, DeciLMForCausalLM)" in first and "LlamaForCausalLM)" not in first
    save_model(model, tmp_path / "native")
    assert main(["inspect", str(tmp_path / "native")]) == 0
    assert "(native, from LlamaForCausalLM)" in capsys.readouterr().out.splitlines()[0]


def test_exported_configs_leave_out_a_null_rope_scaling(tmp_path: Path) -> None:
    model = build_model(tiny_llama_config(num_layers=1), seed=0)
    for fmt in ("llama", "nemotron-nas"):
        config = json.loads((export_hf(model, tmp_path / fmt, format=fmt) / "config.json").read_text())
        assert "rope_scaling" not in config and config["rope_parameters"]["rope_type"] == "default"
