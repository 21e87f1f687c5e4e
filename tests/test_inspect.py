"""`puzzle inspect`: a 70B-scale Nemotron-NAS config on the meta device, in seconds, with exact counts."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from puzzle.cli import main
from puzzle.formats import export_hf, load_model
from puzzle.model.decoder import build_model
from puzzle.model.presets import tiny_llama_config

HIDDEN, HEADS, VOCAB, LAYERS = 8192, 64, 128256, 80


def _nemotron_block(i: int) -> dict:
    """A 51B-like mix: GQA with varying groups, linear and no-op attention; SwiGLU widths, linear, no-op FFNs."""
    att = {"n_heads_in_group": [8, 16, 32, 64][i % 4], "no_op": False, "replace_with_linear": False}
    if i % 7 == 3:
        att = {"n_heads_in_group": None, "no_op": True, "replace_with_linear": False}
    elif i % 11 == 5:
        att = {"n_heads_in_group": None, "no_op": False, "replace_with_linear": True}
    ffn = {"ffn_mult": [5.25, 2.625, 1.3125][i % 3], "no_op": False, "replace_with_linear": False}
    if i % 13 == 6:
        ffn = {"ffn_mult": None, "no_op": True, "replace_with_linear": False}
    elif i % 17 == 8:
        ffn = {"ffn_mult": None, "no_op": False, "replace_with_linear": True}
    return {"attention": att, "ffn": ffn}


def _expected_params(blocks: list[dict]) -> tuple[int, int]:
    """Independent count from the Nemotron-NAS schema: (parameters, bf16 KV bytes per token)."""
    d = HIDDEN // HEADS
    total, kv_bytes = 2 * VOCAB * HIDDEN + HIDDEN, 0
    for b in blocks:
        att, ffn = b["attention"], b["ffn"]
        if att["replace_with_linear"]:
            total += HIDDEN + HIDDEN * HIDDEN
        elif not att["no_op"]:
            kv = HEADS // att["n_heads_in_group"]
            total += HIDDEN + 2 * HIDDEN * HEADS * d + 2 * HIDDEN * kv * d
            kv_bytes += 2 * kv * d * 2
        if ffn["replace_with_linear"]:
            total += HIDDEN + HIDDEN * HIDDEN
        elif not ffn["no_op"]:
            size = int(2 * ffn["ffn_mult"] * HIDDEN / 3)
            size = size if size % 256 == 0 else size + 256 - size % 256
            total += HIDDEN + 3 * HIDDEN * size
    return total, kv_bytes


def test_inspect_80_layer_nemotron_config_on_meta(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blocks = [_nemotron_block(i) for i in range(LAYERS)]
    config = {
        "architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas", "vocab_size": VOCAB,
        "hidden_size": HIDDEN, "num_attention_heads": HEADS, "num_hidden_layers": LAYERS,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "block_configs": blocks,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    start = time.perf_counter()
    assert main(["inspect", str(path), "--json"]) == 0
    elapsed = time.perf_counter() - start
    report = json.loads(capsys.readouterr().out)
    assert elapsed < 10, f"inspect took {elapsed:.1f}s"
    params, kv_bytes = _expected_params(blocks)
    assert report["totals"]["params"] == params
    assert report["totals"]["kv_bytes_per_token_bf16"] == kv_bytes
    assert report["totals"]["bytes_bf16"] == 2 * params
    assert len(report["layers"]) == LAYERS
    assert {r["attention"] for r in report["layers"]} == {"gqa", "linear", "no_op"}
    assert {r["ffn"] for r in report["layers"]} == {"swiglu", "linear", "no_op"}
    # The meta model is the one that would be created: its per-layer numel matches the report.
    meta = load_model(path, device="meta")
    assert [sum(p.numel() for p in layer.parameters()) for layer in meta.layers] == [
        r["params"] for r in report["layers"]]
    assert meta.config.param_count() == params

    assert main(["inspect", str(path)]) == 0  # the table
    table = capsys.readouterr().out
    assert f"{params:,}" in table and table.count("\n") > LAYERS


def test_inspect_model_dir_and_builtin(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = build_model(tiny_llama_config(num_layers=3), seed=0)
    export_hf(model, tmp_path / "m")
    assert main(["inspect", str(tmp_path / "m"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "nemotron-nas"
    assert report["totals"]["params"] == sum(p.numel() for p in model.parameters())
    assert main(["inspect"]) == 0
    assert "total parameters" in capsys.readouterr().out


def test_inspect_gguf_parses_the_file_once(tmp_path: Path, capsys: pytest.CaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = pytest.importorskip("gguf")
    from gguf_helpers import write_tiny_llama

    path = write_tiny_llama(tmp_path / "tiny.gguf", "Q8_0")
    made = []
    real = gguf.GGUFReader

    def counting(*args, **kwargs):
        made.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", counting)
    assert main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(made) == 1
    assert report["gguf_architecture"] == "llama" and report["gguf_tensor_types"]["Q8_0"] > 0
    assert report["config"]["hidden_size"] == 256 and len(report["layers"]) == 2
    assert main(["inspect", str(path)]) == 0 and "GGUF architecture llama" in capsys.readouterr().out
    assert len(made) == 2  # one more call, one more parse
