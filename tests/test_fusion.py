"""Fused q/k/v and gate/up weights: same numbers, same memory, safe after the model moves."""

import torch

from puzzle.model.blocks import AttentionConfig as A
from puzzle.model.blocks import BlockConfig
from puzzle.model.blocks import FFNConfig as F
from puzzle.model.decoder import build_model
from puzzle.model.presets import tiny_llama_config
from puzzle.runtime import Engine, generate
from puzzle.runtime.fp8 import quantize_fp8
from puzzle.runtime.fusion import drop_fused, fuse_projections, is_fused


def child():
    base = tiny_llama_config(num_layers=3, num_kv_heads=2)
    blocks = [BlockConfig(A.gqa(2), F.swiglu(64)), BlockConfig(A.linear(), F.linear()), BlockConfig(A.gqa(1), F.swiglu(32))]
    return build_model(base.with_blocks(blocks), seed=0).eval()


def test_fused_runtime_equals_unfused():
    model = child()
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5]]
    plain = generate(model, prompts, max_new_tokens=12, graphs="none")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fused = generate(model, prompts, max_new_tokens=12, graphs="none", engine=Engine(model, 2, 17, fuse=True))
    assert fused.tokens == plain.tokens
    assert model.state_dict().keys() == state.keys()  # fused buffers are not persistent
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_fused_projections_share_memory_and_follow_training_updates():
    model = child()
    n_params = sum(p.numel() for p in model.parameters())
    fuse_projections(model)
    attn, ffn = model.layers[0].attention.op, model.layers[0].ffn.op
    assert is_fused(attn) and is_fused(ffn)
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.qkv_weight.untyped_storage().data_ptr()
    with torch.no_grad():
        attn.k_proj.weight.add_(1.0)  # an optimizer step on a view lands in the fused matrix
    q_rows = attn.q_proj.weight.shape[0]
    assert torch.equal(attn.qkv_weight[q_rows:q_rows + attn.k_proj.weight.shape[0]], attn.k_proj.weight)
    assert torch.equal(ffn.gate_up_weight[ffn.gate_proj.weight.shape[0]:], ffn.up_proj.weight)


def test_stale_fusion_is_dropped_or_rebuilt_after_a_cast():
    model = child()
    fuse_projections(model)
    model.to(torch.float64)  # parameters and the buffer are converted separately: no longer views
    attn = model.layers[0].attention.op
    assert not is_fused(attn)
    fuse_projections(model, fuse=False)  # the runtime must not read the stale copy
    assert not hasattr(attn, "qkv_weight")
    fuse_projections(model)
    assert is_fused(attn) and attn.qkv_weight.dtype == torch.float64


def _fused_names(model):
    return {name for m in model.modules() for name in m._buffers if name in ("qkv_weight", "qkv_bias", "gate_up_weight")}


def test_drop_fused_removes_the_buffers_and_keeps_the_weights():
    """One removal for every caller: drop_fused here, FP8 quantization and tensor-parallel sharding use it."""
    model = child()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5]]
    plain = generate(model, prompts, max_new_tokens=6, graphs="none")
    fuse_projections(model)
    assert _fused_names(model) == {"qkv_weight", "gate_up_weight"}
    for m in model.modules():
        drop_fused(m)
    assert _fused_names(model) == set() and not any(is_fused(m) for m in model.modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert generate(model, prompts, max_new_tokens=6, graphs="none").tokens == plain.tokens
    fuse_projections(model)
    quantize_fp8(model, fuse=False)  # the bf16 fusions would be stale views of the replaced linears
    assert _fused_names(model) == set()


def test_a_fused_model_exports_and_saves(tmp_path):
    """safetensors refuses tensors sharing memory: export and save must write the views as their own tensors."""
    from puzzle.formats import export_hf, load_model, save_model

    model = fuse_projections(child())
    for out in (export_hf(model, tmp_path / "hf"), save_model(model, tmp_path / "native")):
        loaded = load_model(out)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
