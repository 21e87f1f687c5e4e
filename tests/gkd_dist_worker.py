"""Run by test_uptrain_distributed under `torchrun --nproc-per-node 2` (and directly, for world size 1).

usage: gkd_dist_worker.py OUT_JSON PARALLEL MICRO_BATCH WORK_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from gkd_helpers import damaged_child, tiny_parent, token_arrays
from puzzle.core.config import from_dict
from puzzle.core.distributed import distributed, finish_process
from puzzle.stages.uptrain.stage import UptrainConfig, train_gkd


def main() -> None:
    torch.set_num_threads(1)
    out, mode, micro, work = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    cfg = from_dict(UptrainConfig, {"steps": 4, "micro_batch_size": micro, "lr": 3e-3, "warmup_steps": 1, "val_every": 2,
                                        "val_batches": 2, "checkpoint_every": 2, "parallel": mode, "device": "cpu"})
    with distributed("cpu") as info:
        parent = tiny_parent()
        child = damaged_child(parent)
        train, valid = token_arrays()
        result = train_gkd(child, parent, train, valid, cfg, work, info)
        if info.is_main:
            Path(out).write_text(json.dumps({**result.log, "resumed_from": result.resumed_from,
                                                   "ranks": result.extra["ranks"]}))


if __name__ == "__main__":
    main()
    sys.exit(finish_process(0))
