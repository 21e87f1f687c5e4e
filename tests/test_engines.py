"""Serving engines: an exported child checked against each engine's loading rules (written from the engines' sources,
as `puzzle.formats.engines` cites them), which must fail at exactly the layers the engine table names; the config's
fields engines read (attribute access to block_configs, ffn_mult, torch_dtype, null global sizes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from puzzle.cli import main
from puzzle.formats import export_hf, load_model_config, save_model
from puzzle.formats.engines import ENGINES, servability, unservable_layers
from puzzle.formats.hf import config_from_hf, config_to_nemotron
from puzzle.model.blocks import AttentionConfig, BlockConfig, FFNConfig
from puzzle.model.decoder import build_model
from puzzle.model.presets import tiny_llama_config

H, HEADS, D = 64, 4, 16

SERVED_BY_ALL = [BlockConfig(AttentionConfig.gqa(2), FFNConfig.swiglu(512)),
                 BlockConfig(AttentionConfig.gqa(1), FFNConfig.swiglu(256)),
                 BlockConfig(AttentionConfig.no_op(), FFNConfig.no_op()),
                 BlockConfig(AttentionConfig.gqa(4), FFNConfig.swiglu(256))]
MIXED = [BlockConfig(AttentionConfig.gqa(2), FFNConfig.swiglu(200)),  # size ffn_mult cannot express
         BlockConfig(AttentionConfig.linear(), FFNConfig.swiglu(256)),
         BlockConfig(AttentionConfig.gqa(2), FFNConfig.linear()),
         BlockConfig(AttentionConfig.gqa(2), FFNConfig.no_op()),  # attention without an FFN
         BlockConfig(AttentionConfig.no_op(), FFNConfig.no_op())]  # FFN-free last layer


def _export(tmp_path: Path, blocks: list[BlockConfig]) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    cfg = tiny_llama_config(num_layers=len(blocks), hidden_size=H, num_heads=HEADS, vocab_size=64)
    model = build_model(cfg.with_blocks(blocks))
    return export_hf(model, tmp_path / "child", dtype=torch.bfloat16), model


def _weights(out: Path, layer: int) -> dict[str, tuple[int, ...]]:
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        prefix = f"model.layers.{layer}."
        return {k[len(prefix):]: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith(prefix)}  # noqa: SIM118 (safe_open has no __contains__)


def _ffn_mult_size(mult: float, hidden: int) -> int:
    """DeciLM's size rule, the same in vLLM, SGLang, TensorRT-LLM and llama.cpp's converter."""
    n = int(2 * mult * hidden / 3)
    return n if n % 256 == 0 else n + 256 - n % 256


def _attention_params(kv: int) -> dict[str, tuple[int, ...]]:
    return {"input_layernorm.weight": (H,), "self_attn.q_proj.weight": (HEADS * D, H),
            "self_attn.k_proj.weight": (kv * D, H), "self_attn.v_proj.weight": (kv * D, H),
            "self_attn.o_proj.weight": (H, HEADS * D)}


def _mlp_params(size: int) -> dict[str, tuple[int, ...]]:
    return {"post_attention_layernorm.weight": (H,), "mlp.gate_proj.weight": (size, H),
            "mlp.up_proj.weight": (size, H), "mlp.down_proj.weight": (H, size)}


def _vllm_or_sglang(cfg, i: int, sglang: bool) -> dict[str, tuple[int, ...]]:
    """The parameters DeciLMDecoderLayer creates (vLLM / SGLang nemotron_nas.py): attention unless attention.no_op,
    its KV heads from n_heads_in_group; an MLP unless ffn.no_op, its size from ffn_mult (vLLM: when the block has
    the attribute, as a BlockConfig object always does). replace_with_linear is never read."""
    block, params = cfg.block_configs[i], {}
    if not block.attention.no_op:
        params |= _attention_params(cfg.num_attention_heads // block.attention.n_heads_in_group)
    if not block.ffn.no_op:
        use_mult = sglang or hasattr(block.ffn, "ffn_mult")
        size = _ffn_mult_size(block.ffn.ffn_mult, cfg.hidden_size) if use_mult else block.ffn.intermediate_size
        params |= _mlp_params(size)
    return params


def _trtllm(cfg, i: int) -> dict[str, tuple[int, ...]]:
    """NemotronNASDecoderLayer (TensorRT-LLM, PyTorch backend): num_key_value_heads per layer (0 when
    n_heads_in_group is null); LinearAttention / LinearMLP for replace_with_linear; GatedMLP sized by ffn_mult."""
    assert cfg.torch_dtype is not None  # every module is created with dtype=config.torch_dtype
    block, params = cfg.block_configs[i], {}
    group = block.attention.n_heads_in_group
    kv = cfg.num_attention_heads // group if group else 0
    if not block.attention.no_op:
        if block.attention.replace_with_linear:
            params |= {"input_layernorm.weight": (H,), "self_attn.linear_attn.weight": (H, H)}
        else:
            params |= _attention_params(kv)
    if not block.ffn.no_op:
        if block.ffn.replace_with_linear:
            params |= {"post_attention_layernorm.weight": (H,), "mlp.linear_mlp.weight": (H, H)}
        else:
            params |= _mlp_params(_ffn_mult_size(block.ffn.ffn_mult, cfg.hidden_size))
    return params


def _llama_cpp(raw: dict, i: int) -> dict[str, tuple[int, ...]]:
    """convert_hf_to_gguf.py DeciModel on config.json (dicts) + deci.cpp: null n_heads_in_group is linear attention
    when replace_with_linear, else no attention; FFN length 0 when absent (our GGUF export writes the exact size);
    only HF names gguf-py maps are converted (mlp.linear_mlp is not); an FFN-free layer skips the rest of the layer
    (its attention output and, in the last layer, the output-row selection are lost)."""
    block, params = raw["block_configs"][i], {}
    att, ffn = block["attention"], block["ffn"]
    n_head = raw["num_attention_heads"] if att["n_heads_in_group"] is not None or att["replace_with_linear"] else 0
    n_ff = 0 if ffn["ffn_mult"] is None or ffn["replace_with_linear"] else ffn["intermediate_size"]
    if n_ff == 0 and (n_head > 0 or i == raw["num_hidden_layers"] - 1):
        raise ValueError("FFN-free layer: the graph `continue`s past its attention output")
    if ffn["replace_with_linear"]:
        raise ValueError("Can not map tensor mlp.linear_mlp.weight")
    if att["n_heads_in_group"] is not None:
        params |= _attention_params(raw["num_attention_heads"] // att["n_heads_in_group"])
    elif n_head:
        params |= {"input_layernorm.weight": (H,), "self_attn.linear_attn.weight": (H, H)}  # -> attn_output
    if n_ff:
        params |= _mlp_params(n_ff)
    return params


def _failing_layers(out: Path, engine: str) -> set[int]:
    """Layers whose checkpoint weights do not fill exactly what the engine builds (or where it raises)."""
    cfg = AutoConfig.from_pretrained(str(out), trust_remote_code=True)
    raw = json.loads((out / "config.json").read_text())
    build = {"vllm": lambda i: _vllm_or_sglang(cfg, i, False), "sglang": lambda i: _vllm_or_sglang(cfg, i, True),
             "trtllm": lambda i: _trtllm(cfg, i), "llama.cpp": lambda i: _llama_cpp(raw, i)}[engine]
    failing = set()
    for i in range(cfg.num_hidden_layers):
        try:
            if build(i) != _weights(out, i):  # vLLM: KeyError / unloaded; SGLang: skipped = silently wrong
                failing.add(i)
        except (TypeError, ValueError, KeyError, ZeroDivisionError):
            failing.add(i)
    return failing


@pytest.mark.parametrize("engine", ["vllm", "sglang", "trtllm", "llama.cpp"])
@pytest.mark.parametrize("blocks", [SERVED_BY_ALL, MIXED], ids=["served", "mixed"])
def test_engine_rules_fail_exactly_where_the_table_says(tmp_path: Path, engine: str, blocks) -> None:
    out, model = _export(tmp_path, blocks)
    assert _failing_layers(out, engine) == set(unservable_layers(engine, model.config))


def test_table_names_the_mixed_childs_layers(tmp_path: Path) -> None:
    cfg = tiny_llama_config(num_layers=len(MIXED), hidden_size=H, num_heads=HEADS).with_blocks(MIXED)
    table = servability(cfg)
    assert not any(e["ok"] for n, e in table.items() if n != "transformers") and table["transformers"]["ok"]
    assert table["vllm"]["layers"] == {0: "FFN size 200: ffn_mult gives multiples of 256 only",
                                       1: "linear attention", 2: "linear FFN"}
    assert table["trtllm"]["layers"] == {0: "FFN size 200: ffn_mult gives multiples of 256 only"}
    assert table["llama.cpp"]["layers"] == {2: "linear FFN", 3: "attention without an FFN", 4: "FFN-free last layer"}
    biased = tiny_llama_config(attention_bias=True).with_blocks(SERVED_BY_ALL)
    assert servability(biased)["vllm"]["model"] == "q/k/v bias" and servability(biased)["llama.cpp"]["ok"]
    no_attention = tiny_llama_config(num_layers=1).with_blocks([BlockConfig(AttentionConfig.linear(),
                                                                            FFNConfig.swiglu(256))])
    assert servability(no_attention)["trtllm"]["ok"] and servability(no_attention)["sglang"]["model"]


def test_transformers_runs_the_mixed_child_as_we_do(tmp_path: Path) -> None:
    out, model = _export(tmp_path, MIXED)
    theirs = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.randint(0, 64, (1, 12))
    ours = build_model(model.config)
    ours.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    with torch.no_grad():
        assert torch.allclose(theirs(ids).logits, ours.eval()(ids).logits, atol=1e-4)


def test_block_configs_are_objects_that_serialise_as_written(tmp_path: Path) -> None:
    out, _ = _export(tmp_path, MIXED)
    raw = json.loads((out / "config.json").read_text())
    cfg = AutoConfig.from_pretrained(str(out), trust_remote_code=True)
    assert cfg.block_configs[1].attention.replace_with_linear and cfg.block_configs[4].ffn.no_op
    assert cfg.block_configs[0]["ffn"]["intermediate_size"] == 200 and cfg.block_configs[0].get("nope", 7) == 7
    assert cfg.to_dict()["block_configs"] == raw["block_configs"]
    assert json.loads(cfg.to_json_string())["block_configs"] == raw["block_configs"]
    cfg.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["block_configs"] == raw["block_configs"]
    assert raw["torch_dtype"] == raw["dtype"] == "bfloat16" and cfg.torch_dtype == torch.bfloat16
    assert raw["intermediate_size"] is None and raw["num_key_value_heads"] is None


def test_reexport_keeps_imported_ffn_mult() -> None:
    """A real Nemotron-NAS config says ffn_mult 1.0 where the size (5632 at hidden 8192) maps back to 1.03125."""
    block = {"attention": {"n_heads_in_group": 8, "no_op": False, "replace_with_linear": False},
             "ffn": {"ffn_mult": 1.0, "no_op": False, "replace_with_linear": False}}
    hf = {"architectures": ["DeciLMForCausalLM"], "hidden_size": 8192, "num_attention_heads": 64,
          "num_hidden_layers": 2, "vocab_size": 128, "block_configs": [block, block]}
    config = config_from_hf(hf)
    assert config.blocks[0].ffn.intermediate_size == 5632
    again = config_to_nemotron(config)["block_configs"]
    assert [b["ffn"]["ffn_mult"] for b in again] == [1.0, 1.0]
    child = config.with_blocks([config.blocks[0], BlockConfig(AttentionConfig.gqa(8), FFNConfig.swiglu(4096))])
    mults = [b["ffn"]["ffn_mult"] for b in config_to_nemotron(child)["block_configs"]]
    assert mults[0] == 1.0 and _ffn_mult_size(mults[1], 8192) == 4096  # a new size gets its own exact value


def test_export_for_an_engine_that_cannot_serve_it_fails_cleanly(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    cfg = tiny_llama_config(num_layers=len(MIXED), hidden_size=H, num_heads=HEADS, vocab_size=64)
    save_model(build_model(cfg.with_blocks(MIXED)), tmp_path / "m")
    assert main(["export", str(tmp_path / "m"), str(tmp_path / "out"), "--engine", "vllm"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vllm cannot serve it: layer 0 (FFN size 200" in err and "layer 1 (linear" in err
    assert not (tmp_path / "out").exists()
    assert main(["export", str(tmp_path / "m"), str(tmp_path / "out"), "--engine", "vlm"]) == 2
    assert "unknown engine 'vlm'" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "m"), str(tmp_path / "out"), "--engine", "transformers"]) == 0
    assert load_model_config(tmp_path / "out").blocks == tuple(MIXED)


def test_inspect_lists_engines(tmp_path: Path, capsys) -> None:
    out, _ = _export(tmp_path, MIXED)
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "serves with: transformers" in text and "llama.cpp cannot serve it: layer 2 (linear FFN)" in text
    assert main(["inspect", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["engines"]["vllm"]["layers"]["1"] == "linear attention" and set(data["engines"]) == set(ENGINES)
