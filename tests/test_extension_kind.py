"""A new FFN kind, defined here, runs through library, score, costs (estimate), search and realize.

The kind is added only through `puzzle.model.kinds.register_ffn_kind`: "relusq", a ReLU^2 MLP with its own
intermediate size and no Nemotron-NAS mapping (so realize writes the native format and says so).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from pipeline_helpers import make_parent, run_config
from puzzle.core.notices import read_warnings
from puzzle.core.rundir import RunDir
from puzzle.formats import load_model, load_model_config
from puzzle.model.blocks import FFNConfig, ffn_param_count
from puzzle.model.decoder import build_ffn_block
from puzzle.model.kinds import FFNKindSpec, ffn_kinds, register_ffn_kind, unregister_ffn_kind
from puzzle.model.presets import tiny_llama_config
from puzzle.pipeline import load_run_config, stage_functions
from puzzle.runtime.subblocks import EAGER
from puzzle.stages.library.search_space import parse_ffn
from puzzle.stages.library.store import Library

TOY = "relusq"
VARIANT = f"{TOY}32"


class ReLUSquaredMLP(nn.Module):
    """x [B, T, H] -> down(relu(up(x))^2) [B, T, H]."""

    def __init__(self, hidden: int, size: int) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, size, bias=False)
        self.down = nn.Linear(size, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)).square())


def init_from_parent(parent, child) -> None:
    """The first rows of the parent's up projection and the matching columns of its down projection."""
    n = child.op.up.weight.shape[0]
    child.op.up.weight.copy_(parent.op.up_proj.weight[:n])
    child.op.down.weight.copy_(parent.op.down_proj.weight[:, :n])


@pytest.fixture
def toy_kind():
    spec = register_ffn_kind(FFNKindSpec(TOY, sized=True, param_count=lambda h, i: 2 * h * i,
                                         build=lambda h, i: ReLUSquaredMLP(h, i), init=init_from_parent,
                                         init_name="first_channels"))
    yield spec
    unregister_ffn_kind(TOY)
    assert TOY not in ffn_kinds()


def test_registered_kind_is_a_config_a_module_and_a_search_space_name(toy_kind):
    ffn = parse_ffn(VARIANT)
    assert ffn == FFNConfig(TOY, 32) and ffn.name == VARIANT
    assert FFNConfig.from_dict(ffn.to_dict()) == ffn
    model_config = tiny_llama_config(num_layers=1)
    block = build_ffn_block(model_config, ffn)
    assert isinstance(block.op, ReLUSquaredMLP)
    assert sum(p.numel() for p in block.parameters()) == ffn_param_count(ffn, model_config.hidden_size)
    h = torch.randn(2, 3, model_config.hidden_size)
    new_h, update = EAGER.ffn(block, h, None)  # no fused kernel: the module itself runs
    assert torch.equal(new_h, h) and torch.allclose(update, block(h))


def test_toy_kind_through_library_costs_search_and_realize(toy_kind, tmp_path):
    parent, corpus = make_parent(tmp_path)
    run = RunDir(tmp_path / "run")
    data = run_config(parent, corpus, run.root)
    # Only the parent's attention and the parent's or the toy FFN, under a parameter budget that the parent
    # misses by more than one toy layer saves: the MIP must choose the toy kind somewhere.
    data["library"]["search_space"] = {"attention_kv_heads": [2], "attention_linear": False, "attention_no_op": False,
                                       "ffn_fractions": [1.0], "ffn_linear": False, "ffn_no_op": False,
                                       "ffn_variants": [VARIANT]}
    parent_params = load_model_config(parent).param_count()
    data["search"] = {"constraints": [{"kind": "params", "target": str(parent_params - 3000)}], "time_limit_s": 10}
    cfg = load_run_config(data)
    stages = stage_functions(cfg, run.root)
    for name in ("import", "data", "library", "score", "costs", "search", "realize", "uptrain"):
        stages[name]()

    index = json.loads(run.library_index.read_text())
    toy_entries = [e for e in index["entries"] if e["ffn"] and e["ffn"]["kind"] == TOY]
    assert len(toy_entries) == 2  # one per layer, trained by BLD
    costs = [json.loads(p.read_text()) for p in sorted((run.root / "costs").glob("*.json"))]
    assert costs and all(VARIANT in c["ffn"] and c["ffn"][VARIANT]["prefill_s"] > 0 for c in costs)
    assert VARIANT in (run.root / "scores" / "scores.json").read_text()

    solution = json.loads(run.solutions.read_text())["solutions"][0]
    chosen = [i for i, b in enumerate(solution["blocks"]) if b["ffn"]["kind"] == TOY]
    assert chosen, solution["blocks"]

    child_dir = run.child(solution["name"])
    assert not (child_dir / "modeling_decilm.py").exists()  # no Nemotron-NAS mapping: the native format
    assert any(w["stage"] == "realize" and f"layer {chosen[0]}: {TOY}" in w["message"]
               for w in read_warnings(run.root))
    child = load_model(child_dir)
    assert [i for i, b in enumerate(child.block_configs) if b.ffn.kind == TOY] == chosen
    library = Library.open(run.library)
    for i in chosen:
        trained = library.ffn_block(i, FFNConfig(TOY, 32), child.config)
        assert isinstance(child.layers[i].ffn.op, ReLUSquaredMLP)
        for key, tensor in trained.state_dict().items():
            assert torch.equal(child.layers[i].ffn.state_dict()[key], tensor.to(torch.float32)), key
    uptrained = load_model(RunDir.uptrained_of(child_dir))  # GKD trains the toy kind too, and writes it natively
    assert uptrained.block_configs == child.block_configs
