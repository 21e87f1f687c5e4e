"""The heterogeneous decoder itself: every sub-block kind, partial runs, hidden states."""

import torch

from puzzle.model.blocks import AttentionConfig, BlockConfig, FFNConfig
from puzzle.model.decoder import build_attention_block, build_model
from puzzle.model.presets import tiny_llama_config

MIXED = [
    BlockConfig(AttentionConfig.gqa(4), FFNConfig.swiglu(128)),
    BlockConfig(AttentionConfig.gqa(1), FFNConfig.linear()),
    BlockConfig(AttentionConfig.linear(), FFNConfig.no_op()),
    BlockConfig(AttentionConfig.no_op(), FFNConfig.swiglu(64)),
    BlockConfig(AttentionConfig.no_op(), FFNConfig.no_op()),
]


def mixed_model():
    return build_model(tiny_llama_config().with_blocks(MIXED), seed=0).eval()


def test_forward_shapes_and_hidden_states():
    model = mixed_model()
    ids = torch.randint(0, 256, (2, 10))
    out = model(ids, output_hidden_states=True)
    assert out.logits.shape == (2, 10, 256)
    assert len(out.hidden_states) == len(MIXED)
    # The all-no-op last layer passes its input through unchanged.
    assert torch.equal(out.hidden_states[-1], out.hidden_states[-2])
    assert torch.allclose(model.head(out.hidden_states[-1]), out.logits)


def test_running_layers_in_two_parts_equals_one_pass():
    model = mixed_model()
    ids = torch.randint(0, 256, (1, 12))
    pos = model.default_positions(ids)
    h = model.embed(ids)
    cos, sin = model.rope(pos, h.dtype)
    mid = model.run_layers(h, cos, sin, end=2)
    assert torch.equal(model.head(model.run_layers(mid, cos, sin, start=2)), model(ids).logits)


def test_causality():
    model = mixed_model()
    ids = torch.randint(0, 256, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 256
    a, b = model(ids).logits, model(changed).logits
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_set_layer_swaps_blocks_and_config():
    model = mixed_model()
    model.set_layer(4, build_attention_block(model.config, AttentionConfig.gqa(2)), None)
    assert model.config.blocks[4] == BlockConfig(AttentionConfig.gqa(2), FFNConfig.no_op())
    assert model.block_configs == list(model.config.blocks)


def test_bf16_forward_is_close_to_fp32():
    model = mixed_model()
    ids = torch.randint(0, 256, (1, 8))
    ref = model(ids).logits
    low = model.to(torch.bfloat16)(ids).logits.float()
    assert (low - ref).abs().max() < 0.05 * ref.abs().max()
