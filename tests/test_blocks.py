"""The architecture as data: validation, JSON round-trip and the exact Nemotron-NAS mapping."""

import json

import pytest

from puzzle.core.errors import PuzzleError
from puzzle.formats.nemotron_nas import (
    block_from_nemotron,
    block_to_nemotron,
    ffn_mult_to_intermediate_size,
    intermediate_size_to_ffn_mult,
)
from puzzle.model.blocks import AttentionConfig, BlockConfig, FFNConfig, ModelConfig
from puzzle.model.decoder import build_model
from puzzle.model.presets import llama31_70b_config, tiny_llama_config

EVERY_KIND = [
    BlockConfig(AttentionConfig.gqa(4), FFNConfig.swiglu(128)),
    BlockConfig(AttentionConfig.gqa(1), FFNConfig.linear()),
    BlockConfig(AttentionConfig.linear(), FFNConfig.no_op()),
    BlockConfig(AttentionConfig.no_op(), FFNConfig.swiglu(64)),
    BlockConfig(AttentionConfig.no_op(), FFNConfig.no_op()),
]


@pytest.mark.parametrize("block", EVERY_KIND, ids=lambda b: b.name)
def test_block_json_round_trip(block):
    assert BlockConfig.from_dict(json.loads(json.dumps(block.to_dict()))) == block


@pytest.mark.parametrize("block", EVERY_KIND, ids=lambda b: b.name)
def test_block_nemotron_round_trip(block):
    data = json.loads(json.dumps(block_to_nemotron(block, num_attention_heads=4, hidden_size=64)))
    assert block_from_nemotron(data, num_attention_heads=4, hidden_size=64) == block


def test_nemotron_fields_follow_the_schema():
    entry = block_to_nemotron(BlockConfig(AttentionConfig.gqa(2), FFNConfig.swiglu(14336)), 32, 4096)
    assert entry["attention"]["n_heads_in_group"] == 16
    assert not entry["attention"]["no_op"] and not entry["attention"]["replace_with_linear"]
    # Llama-3.1-8B's FFN: ffn_mult 5.25 is what Nemotron configs write, and it maps back exactly.
    assert entry["ffn"]["ffn_mult"] == pytest.approx(5.25)
    assert ffn_mult_to_intermediate_size(entry["ffn"]["ffn_mult"], 4096) == 14336
    linear = block_to_nemotron(BlockConfig(AttentionConfig.linear(), FFNConfig.no_op()), 32, 4096)
    assert linear["attention"]["replace_with_linear"] and linear["ffn"]["no_op"]


def test_ffn_mult_only_entries_are_read_as_deci_does():
    # Nemotron-51B style entry: only ffn_mult given.
    entry = {"attention": {"n_heads_in_group": 8, "no_op": False, "replace_with_linear": False},
             "ffn": {"ffn_mult": 2.625, "no_op": False, "replace_with_linear": False}}
    block = block_from_nemotron(entry, num_attention_heads=64, hidden_size=8192)
    assert block.attention == AttentionConfig.gqa(8)
    assert block.ffn == FFNConfig.swiglu(14336)


@pytest.mark.parametrize("size", [256, 1024, 14336, 28672, 3584])
def test_ffn_mult_inverse_is_exact_for_multiples_of_256(size):
    assert ffn_mult_to_intermediate_size(intermediate_size_to_ffn_mult(size, 4096), 4096) == size


@pytest.mark.parametrize(
    "make",
    [
        lambda: AttentionConfig.gqa(0),
        lambda: AttentionConfig("gqa"),
        lambda: AttentionConfig("linear", 2),
        lambda: AttentionConfig("sparse"),
        lambda: FFNConfig.swiglu(-5),
        lambda: FFNConfig("no_op", 12),
        lambda: BlockConfig.from_dict({"attention": {"kind": "no_op"}, "ffn": {"kind": "no_op"}, "extra": 1}),
        lambda: AttentionConfig.from_dict({"kind": "gqa", "num_kv_heads": 2, "heads": 3}),
        lambda: tiny_llama_config(num_heads=4, num_kv_heads=3),
        lambda: ModelConfig(vocab_size=10, hidden_size=30, num_attention_heads=4, blocks=EVERY_KIND),
        lambda: block_from_nemotron({"attention": {"n_heads_in_group": 3}, "ffn": {"ffn_mult": 1.0}}, 4, 64),
    ],
)
def test_invalid_configs_raise_one_line_errors(make):
    with pytest.raises(PuzzleError) as err:
        make()
    assert "\n" not in str(err.value)


def test_model_config_round_trip_and_param_count():
    config = tiny_llama_config().with_blocks(EVERY_KIND)
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    model = build_model(config)
    assert config.param_count() == sum(p.numel() for p in model.parameters())
    # No-op sub-blocks own no weights and no norm.
    assert model.layers[3].attention is None and model.layers[4].ffn is None
    assert not [n for n, _ in model.named_parameters() if n.startswith("layers.4.")]


@pytest.mark.parametrize("tied", [False, True])
def test_fixed_param_count_is_what_the_model_holds_outside_its_layers(tied: bool) -> None:
    config = tiny_llama_config(tie_word_embeddings=tied).with_blocks(EVERY_KIND)
    model = build_model(config)
    outside = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("layers."))
    assert config.fixed_param_count() == outside
    assert config.embedding_param_count() == model.embed_tokens.weight.numel()
    assert config.fixed_param_count() == (1 if tied else 2) * config.vocab_size * config.hidden_size \
        + config.hidden_size  # embeddings (+ untied LM head) + final norm


def test_kv_cache_bytes_count_only_gqa_layers():
    config = tiny_llama_config().with_blocks(EVERY_KIND)
    # head_dim 16: layer 0 has 4 KV heads, layer 1 has 1; K and V; bf16.
    assert config.kv_cache_bytes_per_token(2) == 2 * (4 + 1) * 16 * 2


def test_70b_shape_on_meta_device_counts_70b_parameters():
    config = llama31_70b_config()
    model = build_model(config, device="meta")
    assert sum(p.numel() for p in model.parameters()) == config.param_count()
    assert 70.0e9 < config.param_count() < 71.0e9
