"""GGUF import: logits and greedy tokens equal transformers' own GGUF loading of the same file, for every tensor
type; the tokenizer and chat template carried into the imported parent; bad files fail with one line, exit 2.

gguf 0.19 cannot quantize to the K-quants (Q2_K..Q6_K: NotImplementedError), so their tensors are random
blocks with small finite scales (tests/gguf_helpers.py); every other supported type is written by
`gguf.quants.quantize`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")

from gguf_helpers import K_QUANTS, QUANTIZABLE, write_tiny_llama
from puzzle.cli import main
from puzzle.core.errors import PuzzleError
from puzzle.formats import detect_format, load_model, load_model_config
from puzzle.formats.tokenizers import load_tokenizer
from puzzle.runtime.generate import generate

PROMPT = [5, 9, 200, 17, 3, 44, 101]
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _hf_model(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    return out if torch.is_tensor(out) else out.logits


def _hf_greedy(hf: torch.nn.Module, ids: list[int], n: int, eos: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()
    return out[:out.index(eos)] if eos in out else out


def _assert_parity(path: Path, prompt: list[int], new_tokens: int) -> list[int]:
    ours, hf = load_model(path), _hf_model(path)
    diff = (_logits(ours, prompt) - _logits(hf, prompt)).abs().max().item()
    assert diff <= 1e-4, f"max abs logit diff {diff}"
    eos = ours.config.eos_token_id
    tokens = generate(ours, [prompt], new_tokens, stop_tokens=[eos]).tokens[0]
    assert tokens == _hf_greedy(hf, prompt, new_tokens, eos)
    return tokens


@pytest.mark.parametrize("kind", list(QUANTIZABLE) + list(K_QUANTS))
def test_logits_and_greedy_tokens_match_transformers(tmp_path: Path, kind: str) -> None:
    path = write_tiny_llama(tmp_path / f"tiny-{kind}.gguf", kind, tied=kind != "Q8_0")
    assert detect_format(path) == "gguf"
    assert load_model_config(path).tie_word_embeddings == (kind != "Q8_0")
    _assert_parity(path, PROMPT, 6)


def test_import_carries_tokenizer_and_chat_template(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    path = write_tiny_llama(tmp_path / "tiny.gguf", "Q4_1")
    assert main(["import", str(tmp_path / "run"), str(path)]) == 0
    parent = tmp_path / "run" / "parent"
    assert (parent / "tokenizer.json").exists() and (parent / "chat_template.jinja").exists()
    reference = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    plain = AutoTokenizer.from_pretrained(str(parent))  # no gguf_file: ordinary HF tokenizer files
    text = " the cat is a hit"
    assert plain.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False)
    assert load_tokenizer(parent).encode(text) == reference.encode(text, add_special_tokens=False)
    assert plain.chat_template == reference.chat_template and "messages" in plain.chat_template
    assert torch.equal(_logits(load_model(parent), PROMPT), _logits(load_model(path), PROMPT))
    assert load_model(path, dtype=torch.bfloat16).embed_tokens.weight.dtype == torch.bfloat16


def test_inspect_names_architecture_and_tensor_types(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_tiny_llama(tmp_path / "tiny.gguf", "Q5_0")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "gguf, LlamaForCausalLM" in out and "GGUF architecture llama" in out
    assert "Q5_0 x" in out and "F32 x" in out


def _fails_cleanly(argv: list[str], capsys: pytest.CaptureFixture, *words: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err


def test_non_llama_architecture_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_tiny_llama(tmp_path / "tiny.gguf", "F16", arch="qwen2")
    _fails_cleanly(["inspect", str(path)], capsys, "architecture 'qwen2'", "llama")
    _fails_cleanly(["import", str(tmp_path / "run"), str(path)], capsys, "qwen2")
    assert not (tmp_path / "run").exists()  # no half-written run directory


def test_unsupported_tensor_type_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_tiny_llama(tmp_path / "tiny.gguf", "IQ4_NL")
    _fails_cleanly(["import", str(tmp_path / "run"), str(path)], capsys, "IQ4_NL", "not supported")
    assert not (tmp_path / "run").exists()  # no half-written run directory


@pytest.mark.parametrize("keep", [0.6, 0.001])
def test_truncated_file_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture, keep: float) -> None:
    data = write_tiny_llama(tmp_path / "full.gguf", "Q8_0").read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:int(len(data) * keep)])
    _fails_cleanly(["import", str(tmp_path / "run"), str(path)], capsys, "cut.gguf", "truncated or corrupt")
    assert not (tmp_path / "run").exists()  # no half-written run directory


def test_missing_gguf_package_names_the_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_tiny_llama(tmp_path / "tiny.gguf", "F32")
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    with pytest.raises(PuzzleError, match="pip install gguf"):
        load_model_config(path)


def _smollm2() -> Path | None:
    env = os.environ.get("PUZZLE_SMOLLM2_GGUF")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[1] / ".carry" / "smollm2" / SMOLLM2)
    return next((p for p in candidates if p.is_file()), None)


@pytest.mark.slow
@pytest.mark.skipif(_smollm2() is None, reason=f"{SMOLLM2} not found: set PUZZLE_SMOLLM2_GGUF or put it in "
                    f".carry/smollm2/")
def test_smollm2_matches_transformers_and_says_paris() -> None:
    path = _smollm2()
    tok = load_tokenizer(path)
    prompt = tok.encode("The capital of France is")
    tokens = _assert_parity(path, prompt, 8)
    text = tok.decode(tokens)
    print(f"SmolLM2 greedy: 'The capital of France is' -> {text!r}")
    assert "Paris" in text
