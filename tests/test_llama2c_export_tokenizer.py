"""A llama2.c model exported as HF carries a tokenizer.json that AutoTokenizer loads, encoding as llama2.c does."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from puzzle.formats import export_hf, load_model
from puzzle.formats.tokenizers import Llama2cTokenizer, load_tokenizer

STORIES = Path(__file__).resolve().parents[1] / ".." / "shared" / "models" / "stories260K"


@pytest.mark.skipif(not (STORIES / "stories260K.bin").exists(), reason="../shared/models/stories260K is absent")
def test_exported_llama2c_tokenizer_loads_with_autotokenizer(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    source = STORIES / "stories260K.bin"
    out = export_hf(load_model(source), tmp_path / "hf", tokenizer_source=source, format="llama")
    assert (out / "tokenizer.json").exists() and (out / "tok512.bin").exists()
    ours = Llama2cTokenizer(STORIES / "tok512.bin")
    assert isinstance(load_tokenizer(out), Llama2cTokenizer)  # the package keeps reading the original
    hf = AutoTokenizer.from_pretrained(str(out))
    rng = random.Random(0)
    words = ["Once", "upon", "a", "time", "Lily", "dog", "park", "sun", "happy", "played", "\n", "  ", ",", "é", "中"]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 80))) for _ in range(60)]
    texts += [" leading space", "Hello  world!\n\nThe end.", "x"]
    for text in texts:
        assert hf.encode(text, add_special_tokens=False) == ours.encode(text), text
        assert hf.decode(hf.encode(text), skip_special_tokens=True) == ours.decode(ours.encode(text))
    assert hf.encode("Once upon")[0] == ours.bos_id == hf.bos_token_id
