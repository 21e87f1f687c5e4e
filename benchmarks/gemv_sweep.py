"""Sweep the batch-1 GEMV kernel's launch configurations over Llama-3.1-8B's decode shapes (H200).

For each shape (q/k/v of every GQA variant, o_proj, linear blocks, SwiGLU gate/up of every width, down
projections, LM head): GPU time of `puzzle.runtime.gemv.norm_gemv` under every configuration of a grid, the
configuration `gemv_config` picks, and cuBLAS (`F.linear`, without the norm) for reference, each as
microseconds and as achieved bandwidth (weight bytes / time). Timing: triton.testing.do_bench, which
clears the L2 cache before every call, as a decode step finds it.

    python benchmarks/gemv_sweep.py --out benchmarks/results/gemv_sweep.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import metadata

from puzzle.runtime.gemv import GemvConfig, gemv_config, norm_gemv

H = 4096
SHAPES = [  # (name, output rows, K, glu, norm+update)
    *[(f"qkv-gqa{g}", 4096 + 2 * g * 128, H, False, True) for g in (8, 4, 2, 1)],
    ("o_proj", H, H, False, False),
    ("linear", H, H, False, True),
    *[(f"gate_up-{i}", i, H, True, True) for i in (14336, 10752, 7168, 3584, 1536)],
    *[(f"down-{i}", H, i, False, False) for i in (14336, 10752, 7168, 3584, 1536)],
    ("head", 128256, H, False, True),
]
GRID = [GemvConfig(*c) for c in itertools.product((2, 4, 8, 16), (256, 512, 1024), (4, 8), (1, 3))]


def main() -> None:
    import triton.testing

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rep-ms", type=int, default=30)
    args = ap.parse_args()
    dev = torch.device("cuda")
    dt = torch.bfloat16
    out: dict[str, Any] = {"meta": metadata(), "benchmark": "gemv_sweep", "device": torch.cuda.get_device_name(),
                           "shapes": {}}
    bench = lambda fn: triton.testing.do_bench(fn, warmup=5, rep=args.rep_ms, return_mode="median")
    for name, n, k, glu, norm in SHAPES:
        w = torch.randn((2 * n if glu else n), k, device=dev, dtype=dt) / k ** 0.5
        x, u, nw = (torch.randn(1, 1, k, device=dev, dtype=dt) for _ in range(3))
        nbytes = w.numel() * w.element_size()
        args_ = {"update": u, "norm_weight": nw} if norm else {}
        rows: list[dict[str, Any]] = []
        for cfg in GRID:
            try:
                us = 1e3 * bench(lambda: norm_gemv(x, w, glu=glu, config=cfg, **args_))  # noqa: B023
            except Exception as e:  # noqa: BLE001  a config the compiler rejects (registers, shared memory)
                rows.append({**cfg.__dict__, "error": f"{type(e).__name__}"})
                continue
            rows.append({**cfg.__dict__, "us": us, "tb_s": nbytes / us / 1e6})
        ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
        picked = gemv_config(n, k)
        picked_us = 1e3 * bench(lambda: norm_gemv(x, w, glu=glu, config=picked, **args_))  # noqa: B023
        cublas_us = 1e3 * bench(lambda: F.linear(x, w))  # noqa: B023
        out["shapes"][name] = {"n": n, "k": k, "glu": glu, "norm": norm, "weight_bytes": nbytes,
                               "best": ok[0], "top5": ok[:5], "picked": {**picked.__dict__, "us": picked_us},
                               "picked_over_best": picked_us / ok[0]["us"], "cublas_us": cublas_us,
                               "cublas_tb_s": nbytes / cublas_us / 1e6, "all": rows}
        print(f"{name:14s} best {ok[0]['us']:7.1f} us {ok[0]['tb_s']:.2f} TB/s "
              f"(n{ok[0]['block_n']} k{ok[0]['block_k']} w{ok[0]['num_warps']} s{ok[0]['num_stages']})  "
              f"picked {picked_us:7.1f}  cublas {cublas_us:7.1f} us {nbytes / cublas_us / 1e6:.2f} TB/s", flush=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
