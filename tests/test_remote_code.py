"""An exported child loads in stock transformers (trust_remote_code) in a process where `puzzle` is absent, and
decodes with transformers' KV cache exactly as it does without one. CI runs this file against the oldest and the
newest transformers 5.x (see .ci/run)."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DynamicCache, StaticCache

from puzzle.formats import export_hf
from puzzle.model.blocks import AttentionConfig, BlockConfig, FFNConfig
from puzzle.model.decoder import build_model
from puzzle.model.presets import tiny_llama_config

# Runs with `python -I -S`: no site processing, so the editable install's .pth (which puts src/ on the path) is
# never read; the site-packages folders are added by hand so that torch and transformers still import.
CHILD = textwrap.dedent("""
    import json, sys
    sys.path[:0] = json.loads(sys.argv[1])
    try:
        import puzzle  # noqa: F401
        sys.exit("puzzle is importable in the child process; the test would prove nothing")
    except ImportError:
        pass
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[2], trust_remote_code=True, dtype=torch.float32).eval()
    ids, NEW = torch.tensor(json.loads(sys.argv[3])), int(sys.argv[4])
    # row 1 left-padded by 5: generate must mask the pads and position the rest as if they were absent
    batch, mask = ids.clone(), torch.ones_like(ids)
    batch[1, :5], mask[1, :5] = 0, 0
    def generate(x, **kw):
        return model.generate(x, max_new_tokens=NEW, do_sample=False, use_cache=True, pad_token_id=0,
                              eos_token_id=None, **kw).tolist()
    with torch.no_grad():
        logits = model(ids).logits
        out = {"dynamic": generate(ids[:1]),
               # twice: transformers < 5.17 keeps the static cache and checks every layer of it on reuse
               "static": generate(ids[:1], cache_implementation="static"),
               "static again": generate(ids[:1], cache_implementation="static"),
               "padded batch": generate(batch, attention_mask=mask),
               "padded batch static": generate(batch, attention_mask=mask, cache_implementation="static")}
    print("RESULT" + json.dumps({"logits": logits.tolist(), "generated": out, "class": type(model).__name__,
                                 "transformers": transformers.__version__}))
""")
NEW_TOKENS = 24  # > 20 prompt tokens: a decode step that ignores its cache sees a different prefix and diverges


def _child_model() -> torch.nn.Module:
    # Layer 0 has no attention: the cache must still report the right length (the DynamicCache trap).
    blocks = [
        BlockConfig(AttentionConfig.no_op(), FFNConfig.swiglu(96)),
        BlockConfig(AttentionConfig.gqa(2), FFNConfig.linear()),
        BlockConfig(AttentionConfig.linear(), FFNConfig.no_op()),
        BlockConfig(AttentionConfig.gqa(4), FFNConfig.swiglu(128)),
        BlockConfig(AttentionConfig.gqa(1), FFNConfig.no_op()),
    ]
    config = tiny_llama_config(tie_word_embeddings=True, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}).with_blocks(blocks)
    return build_model(config, seed=11).eval()


def _greedy(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> list[int]:
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids[0].tolist()


def test_remote_code_loads_and_generates_without_puzzle(tmp_path: Path) -> None:
    model = _child_model()
    export_dir = export_hf(model, tmp_path / "child", max_shard_size=100_000)
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    paths = [p for p in site.getsitepackages() + [site.getusersitepackages()] if Path(p).exists()]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", CHILD, json.dumps(paths), str(export_dir), json.dumps(ids.tolist()),
         str(NEW_TOKENS)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(s for s in proc.stdout.splitlines() if s.startswith("RESULT"))
    result = json.loads(line[len("RESULT"):])
    assert result["class"] == "DeciLMForCausalLM"
    with torch.no_grad():
        ours = model(ids).logits
    assert (torch.tensor(result["logits"]) - ours).abs().max().item() <= 1e-4
    # reference: this package's model, greedy by full forward passes (no cache), each row on its own tokens only
    row0, row1 = _greedy(model, ids[:1], NEW_TOKENS), _greedy(model, ids[1:, 5:], NEW_TOKENS)
    for how, seqs in result["generated"].items():
        assert seqs[0] == row0, f"{how} generate diverges on transformers {result['transformers']}"
        if len(seqs) > 1:
            assert seqs[1][5:] == row1, f"{how} generate diverges on transformers {result['transformers']}"


@pytest.fixture(scope="module")
def child_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_hf(_child_model(), tmp_path_factory.mktemp("remote") / "decilm_child")


def _load(export_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(export_dir), trust_remote_code=True, dtype=torch.float32).eval()


@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("name", ["cache", "past_key_values"])  # transformers >= 5.24 passes `cache`
def test_decode_steps_use_the_cache_under_either_name(child_dir: Path, name: str, kind: str) -> None:
    hf = _load(child_dir)
    ids = torch.randint(0, hf.config.vocab_size, (1, 28), generator=torch.Generator().manual_seed(1))
    cache = DynamicCache() if kind == "dynamic" else StaticCache(config=hf.config, max_cache_len=32)
    with torch.no_grad():
        full = hf(ids).logits[0, 19:]  # [9, V]: predictions after 20..28 tokens
        steps = [hf(ids[:, :20], use_cache=True, **{name: cache}).logits[0, -1]]
        for i in range(20, 28):
            steps.append(hf(ids[:, i:i + 1], use_cache=True, **{name: cache}).logits[0, -1])
    assert int(cache.get_seq_length()) == 28  # the cache was filled, by the first GQA layer (layer 1)
    assert (torch.stack(steps) - full).abs().max().item() <= 1e-4


def test_4d_masks_bool_and_additive(child_dir: Path) -> None:
    """A 4D mask is used as given: bool = attend, float = added to the scores (transformers' convention)."""
    hf = _load(child_dir)
    ids = torch.randint(0, hf.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    causal = torch.ones(12, 12, dtype=torch.bool).tril()[None, None].expand(2, 1, 12, 12)  # [B, 1, T, S]
    additive = torch.zeros(causal.shape).masked_fill(~causal, torch.finfo(torch.float32).min)
    with torch.no_grad():
        plain = hf(ids).logits
        assert (hf(ids, attention_mask=causal).logits - plain).abs().max().item() <= 1e-5
        assert (hf(ids, attention_mask=additive).logits - plain).abs().max().item() <= 1e-5
