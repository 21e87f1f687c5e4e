"""A small byte-level BPE tokenizer trained on the demo corpus with HF `tokenizers`.

Saved as a normal HF tokenizer directory (tokenizer.json + tokenizer_config.json), so that the exported
child loads with AutoTokenizer, as a user's model would.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from puzzle.core.artifacts import atomic_dir

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


def train_tokenizer(corpus: str | Path | Sequence[Path], out_dir: Path, vocab_size: int = 2048) -> Path:
    """Train (deterministically) on a folder's *.txt files, or on the given files in their order, and save;
    reuse an existing `out_dir`."""
    if (out_dir / "tokenizer.json").is_file():
        return out_dir
    # lazy: only a first demo run trains a tokenizer; transformers takes seconds to import
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # a str is a folder too, not a sequence of one-letter paths
    files = sorted(Path(corpus).glob("*.txt")) if isinstance(corpus, (str, Path)) else list(corpus)
    tok.train([str(p) for p in files], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    with atomic_dir(out_dir) as tmp:
        fast.save_pretrained(str(tmp))
    return out_dir
