"""GGUF export: a homogeneous model as `llama` reads back through our GGUF import to the same weights (Q8_0:
within its quantization error) with the same tokenizer and chat template; a child as llama.cpp's `deci` layout
(per-layer head counts and FFN sizes, linear attention as attn_output, no-op parts absent); refusals name layers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")  # the optional `gguf` extra; without it the module skips, not errors

from gguf_helpers import write_tiny_llama
from puzzle.cli import main
from puzzle.core.errors import PuzzleError
from puzzle.formats import load_model, save_model
from puzzle.formats.gguf import (
    LAYER_NAMES,
    TOP_NAMES,
    GGUFTokenizer,
    _halves_from_interleaved,
    _our_key,
    load_gguf,
)
from puzzle.formats.gguf_export import export_gguf, gguf_name, gguf_tensors, interleave_rope_rows
from puzzle.formats.gguf_tokenizer import bpe_pre_tokenizer
from puzzle.model.blocks import AttentionConfig, BlockConfig, FFNConfig
from puzzle.model.decoder import build_model
from puzzle.model.presets import tiny_llama_config


def _field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def test_rope_row_interleave_is_the_inverse_of_the_import() -> None:
    w = torch.randn(4 * 16, 8)
    assert torch.equal(_halves_from_interleaved(interleave_rope_rows(w, 4), 4), w)
    assert not torch.equal(interleave_rope_rows(w, 4), w)


def test_every_name_the_import_knows_exports_back_to_itself() -> None:
    stems = [*TOP_NAMES, *(f"blk.7.{stem}" for stem in LAYER_NAMES)]
    for name in (f"{stem}.{suffix}" for stem in stems for suffix in ("weight", "bias")):
        assert gguf_name(_our_key(name)) == name
    # Every weight of an untied model with q/k/v biases has a name, and it imports back to its key.
    model = build_model(tiny_llama_config(num_layers=2, tie_word_embeddings=False, attention_bias=True))
    keys = list(model.state_dict())
    assert any(k.endswith("q_proj.bias") for k in keys) and "lm_head.weight" in keys
    assert sorted(_our_key(name) for name in gguf_tensors(model)) == sorted(keys)
    # deci: linear attention is read as attn_output; a linear FFN has no place in llama.cpp.
    assert gguf_name("layers.1.attention.op.linear_attn.weight") == "blk.1.attn_output.weight"
    assert gguf_name("layers.1.ffn.op.linear_mlp.weight") is None


@pytest.mark.parametrize("kind", ["f16", "bf16", "q8_0"])
def test_llama_round_trip_through_our_import(tmp_path: Path, kind: str) -> None:
    source = write_tiny_llama(tmp_path / "src.gguf", "F32", tied=False)
    model = load_gguf(source)
    out = tmp_path / f"out-{kind}.gguf"
    info = export_gguf(model, out, tokenizer_source=GGUFTokenizer(source), gguf_type=kind)
    assert info["architecture"] == "llama" and info["tokenizer"] == "gpt2 (gpt-2)"
    back = load_gguf(out)
    assert back.config.blocks == model.config.blocks and back.config.rope_theta == model.config.rope_theta
    theirs = back.state_dict()
    for key, w in model.state_dict().items():
        err = (theirs[key] - w).abs().max().item()
        if w.ndim == 1:
            assert err == 0, key  # norms stay F32
        else:  # f16 / bf16 rounding, Q8_0: half a step of each 32-value block's scale (absmax / 127)
            bound = {"f16": 1e-3, "bf16": 8e-3}.get(kind) or w.abs().max().item() / 127 * 0.51
            assert err <= bound * max(1.0, w.abs().max().item()), (key, err)
    src, ours = gguf.GGUFReader(source), gguf.GGUFReader(out)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template",
                "tokenizer.ggml.eos_token_id"):
        assert _field(ours, key) == _field(src, key), key
    types = {t.name: t.tensor_type.name for t in ours.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.attn_q.weight"] == kind.upper()


def _child():
    cfg = tiny_llama_config(num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=256,
                            vocab_size=96)
    blocks = [BlockConfig(AttentionConfig.gqa(1), FFNConfig.swiglu(96)),  # any size: GGUF stores the sizes
              BlockConfig(AttentionConfig.linear(), FFNConfig.swiglu(256)),
              BlockConfig(AttentionConfig.no_op(), FFNConfig.no_op()),
              BlockConfig(AttentionConfig.no_op(), FFNConfig.swiglu(128))]
    torch.manual_seed(0)
    return build_model(cfg.with_blocks(blocks))


def test_child_as_deci_layout(tmp_path: Path) -> None:
    model = _child()
    out = tmp_path / "child.gguf"
    assert export_gguf(model, out, gguf_type="f16")["architecture"] == "deci"
    r = gguf.GGUFReader(out)
    assert _field(r, "general.architecture") == "deci"
    assert _field(r, "deci.attention.head_count") == [4, 4, 0, 0]
    assert _field(r, "deci.attention.head_count_kv") == [1, 0, 0, 0]
    assert _field(r, "deci.feed_forward_length") == [96, 256, 0, 128]
    assert _field(r, "tokenizer.ggml.model") == "no_vocab"
    names = {t.name: t for t in r.tensors}
    assert not any(n.startswith("blk.2.") for n in names)  # the identity layer owns nothing
    assert "blk.3.attn_norm.weight" not in names and "blk.1.attn_q.weight" not in names
    state = model.state_dict()

    def read(name: str) -> torch.Tensor:
        t = names[name]
        return torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(tuple(reversed(t.shape.tolist()))))

    linear = state["layers.1.attention.op.linear_attn.weight"]
    assert torch.allclose(read("blk.1.attn_output.weight"), linear, atol=1e-3)
    k = _halves_from_interleaved(read("blk.0.attn_k.weight"), 1)  # one KV head in layer 0
    assert torch.allclose(k, state["layers.0.attention.op.k_proj.weight"], atol=1e-3)
    assert torch.allclose(read("blk.3.ffn_down.weight"), state["layers.3.ffn.op.down_proj.weight"], atol=1e-3)


def test_children_llama_cpp_cannot_run_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = _child()
    blocks = list(model.config.blocks)
    blocks[0] = BlockConfig(AttentionConfig.gqa(2), FFNConfig.linear())
    blocks[1] = BlockConfig(AttentionConfig.linear(), FFNConfig.no_op())
    bad = build_model(model.config.with_blocks(blocks))
    with pytest.raises(PuzzleError, match=r"llama.cpp cannot serve it: layer 0 \(linear FFN\); layer 1 "
                                          r"\(attention without an FFN\)"):
        export_gguf(bad, tmp_path / "bad.gguf")
    assert not (tmp_path / "bad.gguf").exists()
    save_model(bad, tmp_path / "bad")
    assert main(["export", str(tmp_path / "bad"), str(tmp_path / "bad.gguf"), "--format", "gguf"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "layer 0 (linear FFN)" in err and not (tmp_path / "bad.gguf").exists()


def test_cli_writes_q8_0_with_the_models_tokenizer(tmp_path: Path) -> None:
    source = write_tiny_llama(tmp_path / "src.gguf", "F32")
    assert main(["export", str(source), str(tmp_path / "m.gguf"), "--format", "gguf", "--gguf-type", "q8_0"]) == 0
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    assert _field(r, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert _field(r, "tokenizer.ggml.pre") == "gpt-2"
    back = load_model(tmp_path / "m.gguf")
    assert back.config.tie_word_embeddings and back.config.blocks == load_gguf(source).config.blocks


def test_pre_tokenizer_names() -> None:
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert bpe_pre_tokenizer({"pre_tokenizer": byte_level}) == "gpt-2"
    smollm = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    assert bpe_pre_tokenizer({"pre_tokenizer": smollm}) == "smollm"
    llama3 = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"
                                               "\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
         "behavior": "Isolated"}, {**byte_level, "use_regex": False}]}
    assert bpe_pre_tokenizer({"pre_tokenizer": llama3}) == "llama-bpe"
    assert bpe_pre_tokenizer({"pre_tokenizer": {"type": "Whitespace"}}) is None


def test_llama3_rope_factors_are_what_llama_cpp_divides_by(tmp_path: Path) -> None:
    from dataclasses import replace

    from puzzle.formats.gguf_export import llama3_rope_factors
    from puzzle.model.decoder import rope_inverse_frequencies
    from puzzle.model.presets import LLAMA3_ROPE_SCALING

    cfg = tiny_llama_config(hidden_size=256, num_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE_SCALING)
    plain = rope_inverse_frequencies(replace(cfg, rope_scaling=None))
    factors = torch.from_numpy(llama3_rope_factors(cfg))  # llama.cpp: freq = base freq / factor
    assert torch.allclose(plain / factors, rope_inverse_frequencies(cfg), rtol=1e-5)
    assert factors.min() == 1.0 and factors.max() == 8.0  # both ends of the scaling are present at head_dim 128
    export_gguf(build_model(cfg), tmp_path / "l3.gguf")
    stored = {t.name: t for t in gguf.GGUFReader(tmp_path / "l3.gguf").tensors}["rope_freqs.weight"]
    assert np.allclose(np.array(stored.data), factors.numpy())
