"""Bad input: one line naming the problem and the fix, exit code 2, no traceback, no half-written output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from puzzle.cli import main
from puzzle.formats import export_hf
from puzzle.model.decoder import build_model
from puzzle.model.presets import tiny_llama_config

LLAMA = {"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


def _fails_cleanly(argv: list[str], capsys: pytest.CaptureFixture, *words: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


def _write_config(tmp_path: Path, data: dict) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(data))
    return d


def test_missing_path(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _fails_cleanly(["inspect", str(tmp_path / "nope")], capsys, "does not exist")
    _fails_cleanly(["import", str(tmp_path / "run"), str(tmp_path / "nope")], capsys, "does not exist")
    assert not (tmp_path / "run" / "parent").exists()


def test_dir_with_no_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    _fails_cleanly(["inspect", str(tmp_path / "empty")], capsys, "holds no model")
    config_only = _write_config(tmp_path, LLAMA)
    _fails_cleanly(["export", str(config_only), str(tmp_path / "out")], capsys, "no weights")
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = export_hf(build_model(tiny_llama_config(num_layers=2), seed=0), tmp_path / "m")
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    _fails_cleanly(["import", str(tmp_path / "run"), str(src)], capsys, "truncated", "model.safetensors")
    assert not (tmp_path / "run" / "parent").exists()


def test_truncated_llama2c(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import struct

    path = tmp_path / "model.bin"
    path.write_bytes(struct.pack("<7i", 64, 172, 5, 8, 4, 512, 512) + b"\0" * 1000)
    _fails_cleanly(["inspect", str(path)], capsys, "not a llama2.c")


def test_unknown_architecture(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    d = _write_config(tmp_path, {**LLAMA, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    _fails_cleanly(["inspect", str(d)], capsys, "GPT2LMHeadModel", "LlamaForCausalLM", "DeciLMForCausalLM")


@pytest.mark.parametrize("overrides,words", [
    ({"num_attention_heads": 5}, ("num_attention_heads=5", "hidden_size=32")),
    ({"num_key_value_heads": 3}, ("num_key_value_heads=3", "num_attention_heads=4")),
])
def test_heads_do_not_divide(tmp_path: Path, capsys: pytest.CaptureFixture, overrides: dict, words: tuple) -> None:
    _fails_cleanly(["inspect", str(_write_config(tmp_path, {**LLAMA, **overrides}))], capsys, *words)


def test_mistral_sliding_window(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    d = _write_config(tmp_path, {**LLAMA, "architectures": ["MistralForCausalLM"], "sliding_window": 16,
                                 "max_position_embeddings": 64})
    _fails_cleanly(["inspect", str(d)], capsys, "sliding_window=16", "null")


def test_block_config_with_unknown_keys(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    block = {"attention": {"n_heads_in_group": 2, "no_op": False, "replace_with_linear": False, "flash": True},
             "ffn": {"ffn_mult": 2.0, "no_op": False, "replace_with_linear": False}}
    d = _write_config(tmp_path, {**LLAMA, "architectures": ["DeciLMForCausalLM"], "block_configs": [block, block]})
    _fails_cleanly(["inspect", str(d)], capsys, "flash")


def test_cli_process_exit_code_and_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.run([sys.executable, "-m", "puzzle.cli", "inspect", str(tmp_path / "missing")],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr and "does not exist" in proc.stderr
