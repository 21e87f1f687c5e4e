"""The batch-1 Triton GEMV kernels (`puzzle.runtime.gemv`), run on CPU by Triton's interpreter."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from puzzle.model.decoder import RMSNorm
from puzzle.runtime import gemv
from puzzle.runtime.engine import Engine
from puzzle.runtime.subblocks import FusedRegions


@pytest.fixture
def interpreted():
    """The gemv module, its kernels run by Triton's interpreter without a GPU (tests/conftest.py)."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set")
    return gemv


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = gemv.GemvConfig(block_n=8, block_k=32, num_warps=4, num_stages=1)  # K=96, N=40: partial tiles


@pytest.mark.parametrize("with_update", [True, False])
@pytest.mark.parametrize("glu", [False, True])
def test_norm_gemv_equals_add_norm_and_linear(interpreted, with_update: bool, glu: bool) -> None:
    torch.manual_seed(0)
    k, n = 100, 40  # neither a multiple of the tile: the masks matter
    h, u = torch.randn(1, 1, k, device=DEVICE), torch.randn(1, 1, k, device=DEVICE)
    norm = RMSNorm(k, 1e-5).to(DEVICE)
    norm.weight.data = torch.randn(k, device=DEVICE)
    w = torch.randn(2 * n if glu else n, k, device=DEVICE) / 10
    h_out, y = interpreted.norm_gemv(h, w, u if with_update else None, norm.weight, 1e-5, glu=glu, config=SMALL)
    ref_h = h + u if with_update else h
    ref = F.linear(norm(ref_h), w)
    if glu:
        gate, up = ref.chunk(2, dim=-1)
        ref = F.silu(gate) * up
    assert torch.equal(h_out, ref_h)
    assert y.shape == (1, 1, n)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_plain_gemv_without_norm(interpreted) -> None:
    torch.manual_seed(1)
    x, w = torch.randn(1, 1, 96, device=DEVICE), torch.randn(24, 96, device=DEVICE)
    h_out, y = interpreted.norm_gemv(x, w, config=SMALL)
    assert h_out is x
    torch.testing.assert_close(y, F.linear(x, w), atol=1e-5, rtol=1e-5)


def test_the_fixed_rule_picks_a_config_for_every_shape() -> None:
    for n, k in ((4352, 4096), (4096, 14336), (128256, 4096), (64, 32)):
        cfg = gemv.gemv_config(n, k)
        assert cfg.block_n >= 1 and cfg.block_k >= 16 and cfg.num_warps in (1, 2, 4, 8)
    assert gemv.gemv_config(6144, 4096) == gemv.gemv_config(6144, 4096)  # a rule, not a measurement


def test_decode_step_with_gemv_kernels_equals_eager(interpreted) -> None:
    """Every sub-block kind (GQA, linear attention, no-op, SwiGLU, linear FFN) through the GEMV path."""
    from test_runtime import _decode_logits, child_model

    model = child_model().to(DEVICE)
    prompt = [[5, 17, 99, 3]]
    eager = _decode_logits(Engine(model, 1, 16, graphs="none"), prompt, 5)
    engine = Engine(model, 1, 16, graphs="none", fuse=True)
    engine._regions = FusedRegions(backend=None, gemv=True)
    got = _decode_logits(engine, prompt, 5)
    torch.testing.assert_close(got, eager, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.argmax(-1), eager.argmax(-1))
