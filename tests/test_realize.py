"""Realize: the child's weights are the library's entries bit for bit, and the parent's embeddings and head."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from puzzle.core.artifacts import write_json
from puzzle.core.errors import PuzzleError
from puzzle.formats import load_model, save_model
from puzzle.model.blocks import AttentionConfig, BlockConfig, FFNConfig
from puzzle.model.decoder import build_attention_block, build_ffn_block, build_model
from puzzle.model.presets import tiny_llama_config
from puzzle.stages.library.store import LibraryEntry, write_entry, write_index
from puzzle.stages.realize import run_realize

ATTS = [AttentionConfig.gqa(2), AttentionConfig.gqa(1), AttentionConfig.linear(), AttentionConfig.no_op()]
FFNS = [FFNConfig.swiglu(128), FFNConfig.swiglu(64), FFNConfig.linear(), FFNConfig.no_op()]


def _make_run(tmp_path, coupled_layer: int | None = None):
    config = tiny_llama_config(num_layers=4)
    parent = build_model(config, seed=0)
    save_model(parent, tmp_path / "parent")
    torch.manual_seed(1)
    lib = tmp_path / "library"
    entries = []
    for layer in range(4):
        if layer == coupled_layer:  # a coupled pair, trained jointly
            att, ffn = build_attention_block(config, ATTS[1]), build_ffn_block(config, FFNS[2])
            tensors = {f"attention.{k}": v for k, v in att.state_dict().items()}
            tensors |= {f"ffn.{k}": v for k, v in ffn.state_dict().items()}
            entries.append(write_entry(lib, LibraryEntry(layer, "block", ATTS[1], FFNS[2], None), tensors))
            continue
        for att in ATTS:
            module = build_attention_block(config, att)
            tensors = module.state_dict() if module is not None else {}
            entries.append(write_entry(lib, LibraryEntry(layer, "attention", att, None, None), tensors))
        for ffn in FFNS:
            module = build_ffn_block(config, ffn)
            tensors = module.state_dict() if module is not None else {}
            entries.append(write_entry(lib, LibraryEntry(layer, "ffn", None, ffn, None), tensors))
    write_index(lib, entries, {"mode": "decoupled"})
    return parent, entries


def _write_solution(tmp_path, blocks, name="child-0"):
    write_json(tmp_path / "search" / "solutions.json", {"metric": "kl", "solutions": [{
        "name": name, "target": None, "rank": 0, "optimal": True, "blocks": [b.to_dict() for b in blocks],
        "objective": 0.5, "scores": {"kl": 0.5}, "predicted": {"gen": {"throughput_tok_s": 123.0}}}]})


@pytest.mark.parametrize("coupled_layer", [None, 2])
def test_realized_child_weights_equal_library_entries_bit_for_bit(tmp_path, coupled_layer):
    parent, entries = _make_run(tmp_path, coupled_layer)
    blocks = [BlockConfig(ATTS[1], FFNS[1]), BlockConfig(ATTS[3], FFNS[2]),
              BlockConfig(ATTS[1], FFNS[2]), BlockConfig(ATTS[2], FFNS[3])]
    _write_solution(tmp_path, blocks)
    out = run_realize(tmp_path, "child-0")
    assert (out / "config.json").exists() and (out / "modeling_decilm.py").exists()
    child = load_model(out)
    assert child.block_configs == blocks
    state = child.state_dict()
    checked = 0
    for e in entries:
        if e.file is None or BlockConfig(e.attention or blocks[e.layer].attention,
                                         e.ffn or blocks[e.layer].ffn) != blocks[e.layer]:
            continue
        prefix = {"attention": "attention.", "ffn": "ffn.", "block": ""}[e.kind]
        for key, tensor in load_file(str(tmp_path / "library" / e.file)).items():
            mine = state[f"layers.{e.layer}.{prefix}{key}"]
            assert mine.dtype == tensor.dtype and torch.equal(mine, tensor), key
            checked += 1
    assert checked >= 10
    for key in ("embed_tokens.weight", "norm.weight", "lm_head.weight"):
        assert torch.equal(state[key], parent.state_dict()[key])
    n_layer_tensors = sum(1 for k in state if k.startswith("layers."))
    assert n_layer_tensors == checked  # nothing in the layers that did not come from the library
    sidecar = json.loads((out / "puzzle.json").read_text())["puzzle_child"]
    assert sidecar["solution"]["name"] == "child-0" and sidecar["predicted"]["gen"]["throughput_tok_s"] == 123.0
    assert sidecar["scores"] == {"kl": 0.5} and sidecar["parent"].endswith("parent")


def test_parent_variant_missing_from_library_uses_the_parents_own_block(tmp_path):
    parent, entries = _make_run(tmp_path)
    kept = [e for e in entries if not (e.kind == "attention" and e.attention == ATTS[0])]
    write_index(tmp_path / "library", kept, {"mode": "decoupled"})
    blocks = [BlockConfig(ATTS[0], FFNS[1])] * 4
    _write_solution(tmp_path, blocks)
    child = load_model(run_realize(tmp_path, "child-0"))
    for i in range(4):
        assert torch.equal(child.layers[i].attention.op.q_proj.weight, parent.layers[i].attention.op.q_proj.weight)


def test_unknown_solution_and_rerun(tmp_path):
    _make_run(tmp_path)
    _write_solution(tmp_path, [BlockConfig(ATTS[1], FFNS[1])] * 4)
    with pytest.raises(PuzzleError, match="choose one of \\['child-0'\\]"):
        run_realize(tmp_path, "nope")
    out = run_realize(tmp_path, "child-0")
    mtime = (out / "config.json").stat().st_mtime_ns
    assert run_realize(tmp_path, "child-0") == out
    assert (out / "config.json").stat().st_mtime_ns == mtime  # current: not rewritten
