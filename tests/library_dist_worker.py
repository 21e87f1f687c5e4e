"""Run by tests/test_library_distributed.py under torchrun: build a tiny library into argv[1]."""

import sys
from pathlib import Path

import numpy as np

from puzzle.core.distributed import finish_process
from puzzle.model.decoder import build_model
from puzzle.model.presets import tiny_llama_config
from puzzle.stages.library import LibraryConfig, SearchSpaceConfig, build_library


def main() -> None:
    cfg = tiny_llama_config(num_layers=3)
    rng = np.random.default_rng(0)
    train = rng.integers(0, cfg.vocab_size, (32, 16)).astype(np.uint16)
    valid = rng.integers(0, cfg.vocab_size, (8, 16)).astype(np.uint16)
    lc = LibraryConfig(search_space=SearchSpaceConfig(ffn_fractions=[1.0, 0.5, 0.25], round_to=16),
                       tokens_per_variant=4 * 8 * 16, init_batches=1, progress=False, device="cpu")
    build_library(Path(sys.argv[1]), build_model(cfg, seed=0), train, valid, lc)


if __name__ == "__main__":
    main()
    sys.exit(finish_process(0))
