"""HF interop: logits equal transformers' on tiny random models; import -> export -> import is lossless."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from puzzle.formats import detect_format, export_hf, load_model, load_model_config, save_model
from puzzle.formats.hf import config_from_hf
from puzzle.model.blocks import AttentionConfig, BlockConfig, FFNConfig
from puzzle.model.decoder import build_model
from puzzle.model.presets import LLAMA3_ROPE_SCALING, tiny_llama_config

SMALL_LLAMA3 = dict(LLAMA3_ROPE_SCALING, original_max_position_embeddings=32)  # so scaling changes frequencies


def _hf_config(arch: str, **overrides: object) -> transformers.PretrainedConfig:
    common = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
    common.update(overrides)
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "mistral": transformers.MistralConfig}[arch]
    return cls(**common)


def _save_hf(tmp_path: Path, arch: str, **overrides: object) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    config = _hf_config(arch, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # norms start at 1 and biases at 0: randomise so that their mapping is tested
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", ".bias")):
                p.add_(0.1 * torch.randn_like(p))
    out = tmp_path / arch
    model.save_pretrained(out)
    return model, out


def _max_logit_diff(hf_model: torch.nn.Module, ours: torch.nn.Module, seq: int = 24) -> float:
    ids = torch.randint(0, hf_model.config.vocab_size, (2, seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (hf_model(ids).logits - ours(ids).logits).abs().max().item()


@pytest.mark.parametrize("kv_heads,tied,rope", [
    (4, False, None),          # MHA, untied
    (2, True, None),           # GQA, tied
    (1, False, SMALL_LLAMA3),  # MQA with llama3 rope scaling
])
def test_llama_logits_match_transformers(tmp_path: Path, kv_heads: int, tied: bool, rope: dict | None) -> None:
    rope_parameters = {"rope_theta": 500000.0, **rope} if rope else {"rope_type": "default", "rope_theta": 10000.0}
    hf_model, path = _save_hf(tmp_path, "llama", num_key_value_heads=kv_heads, tie_word_embeddings=tied,
                              rope_parameters=rope_parameters)
    ours = load_model(path)
    assert detect_format(path) == "hf"
    assert ours.config.tie_word_embeddings is tied and (ours.lm_head is None) is tied
    assert ours.config.blocks[0].attention.num_kv_heads == kv_heads
    assert (ours.config.rope_scaling or {}).get("rope_type") == (rope or {}).get("rope_type")
    assert _max_logit_diff(hf_model, ours, seq=48) <= 1e-5


def test_qwen2_logits_match_transformers(tmp_path: Path) -> None:
    hf_model, path = _save_hf(tmp_path, "qwen2", use_sliding_window=False, tie_word_embeddings=True)
    ours = load_model(path)
    assert ours.config.attention_bias and ours.config.source_architecture == "Qwen2ForCausalLM"
    assert _max_logit_diff(hf_model, ours) <= 1e-5


def test_mistral_logits_match_transformers(tmp_path: Path) -> None:
    hf_model, path = _save_hf(tmp_path, "mistral", sliding_window=None)
    assert _max_logit_diff(hf_model, load_model(path)) <= 1e-5


def test_sharded_and_pytorch_bin_fallback(tmp_path: Path) -> None:
    hf_model, path = _save_hf(tmp_path, "llama")
    sharded = tmp_path / "sharded"
    hf_model.save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert _max_logit_diff(hf_model, load_model(sharded)) <= 1e-5
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "config.json").write_text((path / "config.json").read_text())
    torch.save(hf_model.state_dict(), binary / "pytorch_model.bin")
    assert _max_logit_diff(hf_model, load_model(binary)) <= 1e-5


def test_legacy_rope_keys_equal_rope_parameters() -> None:
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    new = config_from_hf({**base, "rope_parameters": {"rope_theta": 5e5, **LLAMA3_ROPE_SCALING}})
    legacy_scaling = {k: v for k, v in LLAMA3_ROPE_SCALING.items() if k != "rope_type"} | {"type": "llama3"}
    legacy = config_from_hf({**base, "rope_theta": 5e5, "rope_scaling": legacy_scaling})
    assert new == legacy and new.rope_theta == 5e5 and new.rope_scaling["factor"] == 8.0


def _every_kind_model() -> torch.nn.Module:
    blocks = [
        BlockConfig(AttentionConfig.gqa(2), FFNConfig.swiglu(96)),
        BlockConfig(AttentionConfig.gqa(4), FFNConfig.linear()),
        BlockConfig(AttentionConfig.linear(), FFNConfig.no_op()),
        BlockConfig(AttentionConfig.no_op(), FFNConfig.swiglu(128)),
        BlockConfig(AttentionConfig.gqa(1), FFNConfig.no_op()),
        BlockConfig(AttentionConfig.no_op(), FFNConfig.no_op()),
    ]
    config = tiny_llama_config(rope_theta=500000.0, rope_scaling=SMALL_LLAMA3).with_blocks(blocks)
    model = build_model(config, seed=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    assert a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_nemotron_import_export_import_is_lossless(tmp_path: Path) -> None:
    model = _every_kind_model()
    first = tmp_path / "first"
    export_hf(model, first, max_shard_size=50_000)
    (first / "puzzle.json").unlink()  # a foreign Nemotron-NAS dir: only config.json describes it
    hf_config = json.loads((first / "config.json").read_text())
    assert hf_config["architectures"] == ["DeciLMForCausalLM"] and hf_config["model_type"] == "nemotron-nas"
    assert len(hf_config["block_configs"]) == 6 and "auto_map" in hf_config
    assert (first / "model.safetensors.index.json").exists()
    assert detect_format(first) == "nemotron-nas"

    imported = load_model(first)
    assert imported.config.blocks == model.config.blocks
    torch.testing.assert_close(imported(torch.arange(10)[None]).logits, model(torch.arange(10)[None]).logits,
                               rtol=0, atol=0)
    second = tmp_path / "second"
    export_hf(imported, second)
    again = load_model(second)
    _assert_same(imported, again)
    assert load_model_config(second) == imported.config


def test_native_round_trip_keeps_tokenizer(tmp_path: Path) -> None:
    model = _every_kind_model().to(torch.bfloat16)
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "tok16.bin").write_bytes(b"\x01\x00\x00\x00" + b"\x00\x00\x00\x00\x01\x00\x00\x00a")
    save_model(model, tmp_path / "native", tokenizer_source=tok_dir / "tok16.bin")
    assert detect_format(tmp_path / "native") == "native"
    assert (tmp_path / "native" / "tok16.bin").exists()
    _assert_same(model, load_model(tmp_path / "native"))
    assert load_model(tmp_path / "native", dtype=torch.float32).embed_tokens.weight.dtype == torch.float32


def test_llama_export_loads_in_stock_transformers(tmp_path: Path) -> None:
    config = tiny_llama_config(num_layers=2, rope_theta=500000.0, rope_scaling=SMALL_LLAMA3)
    model = build_model(config, seed=5)
    export_hf(model, tmp_path / "llama", format="llama")
    hf_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32)
    assert _max_logit_diff(hf_model, model, seq=48) <= 1e-5
    assert load_model(tmp_path / "llama").config == model.config


def test_import_stage_writes_native_parent_and_skips_when_current(tmp_path: Path) -> None:
    from puzzle.cli import main
    from puzzle.stages.importer import run_import

    model = _every_kind_model()
    source = export_hf(model, tmp_path / "src")
    parent = run_import(tmp_path / "run", str(source))
    assert detect_format(parent) == "native"
    _assert_same(load_model(parent), load_model(source))
    stamp = (parent / ".stage.json").read_text()
    weights_mtime = (parent / "model.safetensors").stat().st_mtime_ns
    assert main(["import", str(tmp_path / "run"), str(source)]) == 0  # current: nothing rewritten
    assert (parent / "model.safetensors").stat().st_mtime_ns == weights_mtime
    assert (parent / ".stage.json").read_text() == stamp
    assert main(["export", str(parent), str(tmp_path / "out"), "--format", "nemotron-nas"]) == 0
    _assert_same(load_model(tmp_path / "out"), model)
