"""An exported child loads in stock transformers (trust_remote_code) in a process where `puzzle` is absent."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from puzzle.blocks import AttentionConfig, BlockConfig, FFNConfig
from puzzle.checkpoints import export_hf
from puzzle.model import build_model
from puzzle.presets import tiny_llama_config

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
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[2], trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.tensor(json.loads(sys.argv[3]))
    with torch.no_grad():
        logits = model(ids).logits
        out = model.generate(ids[:1], max_new_tokens=12, do_sample=False, use_cache=True,
                             pad_token_id=0, eos_token_id=None)
    print("RESULT" + json.dumps({"logits": logits.tolist(), "generated": out[0].tolist(),
                                 "class": type(model).__name__}))
""")


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


def test_remote_code_loads_without_puzzle(tmp_path: Path) -> None:
    model = _child_model()
    export_dir = export_hf(model, tmp_path / "child", max_shard_size=100_000)
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    paths = [p for p in site.getsitepackages() + [site.getusersitepackages()] if Path(p).exists()]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", CHILD, json.dumps(paths), str(export_dir), json.dumps(ids.tolist())],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(s for s in proc.stdout.splitlines() if s.startswith("RESULT"))
    result = json.loads(line[len("RESULT"):])
    assert result["class"] == "DeciLMForCausalLM"
    with torch.no_grad():
        ours = model(ids).logits
    assert (torch.tensor(result["logits"]) - ours).abs().max().item() <= 1e-4
    assert result["generated"] == _greedy(model, ids[:1], 12)
