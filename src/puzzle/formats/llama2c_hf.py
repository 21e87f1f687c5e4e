"""A llama2.c `tok*.bin` as a Hugging Face `tokenizer.json` (+ `tokenizer_config.json`), so that an exported
llama2.c model loads with `AutoTokenizer`.

The layout is transformers' own for SentencePiece-BPE Llama tokenizers (`convert_slow_tokenizer.LlamaConverter`):
spaces become "▁" and one is prepended, a BPE model with byte fallback, and the inverse decoder, loaded as the
generic fast tokenizer. The merges
are every split of a piece into two pieces, ranked by the merged piece's score: the pair llama2.c merges first
(the best-scoring concatenation) is the lowest-ranked merge.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE

from puzzle.formats.tokenizers import Llama2cTokenizer

_SPECIAL = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 in every llama2.c tokenizer


def _hf_piece(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace").replace(" ", "\u2581")


def hf_tokenizer(tok: Llama2cTokenizer) -> Tokenizer:
    """The `tokenizers` object equivalent to `tok` (encode without BOS/EOS; decode)."""
    # llama2.c writes ids 1 and 2 as "\n<s>\n" and "\n</s>\n"; HF names them <s> and </s>.
    vocab: dict[str, int] = {name: i for i, name in enumerate(_SPECIAL[:len(tok.pieces)])}
    for i, piece in enumerate(tok.pieces[len(_SPECIAL):], start=len(_SPECIAL)):
        vocab.setdefault(_hf_piece(piece), i)  # the first id of a repeated piece, as llama2.c's lookup
    ranked = []
    for merged, i in vocab.items():
        if i < len(_SPECIAL):
            continue
        for cut in range(1, len(merged)):
            left, right = merged[:cut], merged[cut:]
            if left in vocab and right in vocab:
                ranked.append((-tok.scores[i], i, left, right))
    merges = [(left, right) for _, _, left, right in sorted(ranked)]
    model = BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    hf = Tokenizer(model)
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    hf.add_special_tokens(list(_SPECIAL))
    # BOS as llama2.c's run adds it (add_special_tokens=True); no EOS.
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", vocab["<s>"])])
    return hf


def write_hf_tokenizer(tok: Llama2cTokenizer, out_dir: Path) -> list[str]:
    """Write tokenizer.json and tokenizer_config.json for `tok` into out_dir; returns the names written."""
    hf_tokenizer(tok).save(str(out_dir / "tokenizer.json"))
    # The generic fast class: LlamaTokenizer would swap in a Metaspace pre-tokenizer that adds no "▁" before a
    # leading space, unlike llama2.c (and SentencePiece's add_dummy_prefix).
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000_000}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return ["tokenizer.json", "tokenizer_config.json"]
