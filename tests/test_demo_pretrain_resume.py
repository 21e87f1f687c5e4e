"""Demo pretraining resumes from its checkpoint after an interruption, ending where an unbroken run ends."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from puzzle.demo.pretrain import PretrainConfig, pretrain
from puzzle.model.decoder import build_model
from puzzle.model.presets import tiny_llama_config

CONFIG = tiny_llama_config(num_layers=1, hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=64,
                           vocab_size=64)
CFG = PretrainConfig(steps=6, batch_size=2, warmup_steps=1, checkpoint_every=2)
TOKENS = np.random.default_rng(0).integers(0, 64, size=(8, 9)).astype(np.uint16)


class _Interrupt:
    """Forward hook that raises KeyboardInterrupt on the n-th call, as Ctrl-C would."""

    def __init__(self, n: int) -> None:
        self.calls, self.n = 0, n

    def __call__(self, *args) -> None:
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt


def test_interrupted_pretraining_resumes_from_the_checkpoint(tmp_path: Path) -> None:
    whole = build_model(CONFIG, seed=0)
    expected = pretrain(whole, TOKENS, CFG, progress=False)

    ckpt = tmp_path / "checkpoint.pt"
    broken = build_model(CONFIG, seed=0)
    handle = broken.register_forward_pre_hook(_Interrupt(5))  # during step 5: steps 1-4 done, checkpoint at 4
    with pytest.raises(KeyboardInterrupt):
        pretrain(broken, TOKENS, CFG, progress=False, checkpoint=ckpt)
    handle.remove()
    assert ckpt.is_file()

    resumed = build_model(CONFIG, seed=0)
    counter = _Interrupt(0)
    resumed.register_forward_pre_hook(counter)
    losses = pretrain(resumed, TOKENS, CFG, progress=False, checkpoint=ckpt)
    assert counter.calls == 2  # only steps 5 and 6 ran
    assert losses == pytest.approx(expected)
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b)
