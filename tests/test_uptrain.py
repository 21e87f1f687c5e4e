from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gkd_helpers import (
    CPU1,
    Killed,
    damaged_child,
    kill_after,
    one_torch_thread,  # noqa: F401  (autouse fixture: one intra-op thread)
    tiny_parent,
    token_arrays,
)
from puzzle.core.config import from_dict
from puzzle.core.errors import PuzzleError
from puzzle.stages.uptrain.stage import UptrainConfig, batch_indices, lr_lambda, train_gkd


def small_cfg(**kw: object) -> UptrainConfig:
    base = {"steps": 6, "micro_batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "val_every": 0, "val_batches": 4,
                "checkpoint_every": 2, "device": "cpu"}
    base.update(kw)
    return from_dict(UptrainConfig, base)


def test_gkd_lowers_validation_kl_of_damaged_child(tmp_path: Path) -> None:
    parent = tiny_parent()
    child = damaged_child(parent)
    train, valid = token_arrays()
    result = train_gkd(child, parent, train, valid, small_cfg(steps=30, val_every=10, checkpoint_every=0),
                       tmp_path, CPU1)
    kls = [v["kl"] for v in result.log["valid"]]
    assert [v["step"] for v in result.log["valid"]] == [0, 10, 20, 30]
    assert kls[0] > 0.05, "the damaged child should start measurably far from the parent"
    assert kls[-1] < 0.6 * kls[0], kls
    assert result.log["valid"][-1]["agreement"] > result.log["valid"][0]["agreement"]
    # the parent stays frozen
    fresh = tiny_parent()
    for (name, p), q in zip(parent.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path: Path) -> None:
    parent = tiny_parent()
    base_child = damaged_child(parent)
    train, valid = token_arrays()
    cfg = small_cfg(steps=6, checkpoint_every=2, grad_accum=2, micro_batch_size=2)

    full = train_gkd(copy.deepcopy(base_child), parent, train, valid, cfg, tmp_path / "a", CPU1)

    with pytest.raises(Killed):  # dies after step 5; the last checkpoint is step 4
        train_gkd(copy.deepcopy(base_child), parent, train, valid, cfg, tmp_path / "b", CPU1, on_step=kill_after(5))
    assert (tmp_path / "b" / "checkpoint" / "state.json").exists()
    resumed = train_gkd(copy.deepcopy(base_child), parent, train, valid, cfg, tmp_path / "b", CPU1)
    assert resumed.resumed_from == 4
    a = [r["loss"] for r in full.log["train"]]
    b = [r["loss"] for r in resumed.log["train"]]
    assert len(b) == 6
    assert b[4:] == pytest.approx(a[4:], rel=1e-6, abs=1e-9)
    for (name, p), q in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)


def test_checkpoint_of_other_config_is_not_used(tmp_path: Path) -> None:
    parent = tiny_parent()
    train, valid = token_arrays()
    train_gkd(damaged_child(parent), parent, train, valid, small_cfg(steps=3, checkpoint_every=2), tmp_path, CPU1)
    result = train_gkd(damaged_child(parent), parent, train, valid, small_cfg(steps=3, lr=1e-3), tmp_path, CPU1)
    assert result.resumed_from == 0


def test_checkpoint_holds_no_pickle_and_restores_rng(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle
    import random

    from puzzle.stages.uptrain.checkpoint import pack, rng_state, set_rng_state, unpack

    parent = tiny_parent()
    train, valid = token_arrays()
    cfg = small_cfg(steps=3, checkpoint_every=2)
    train_gkd(damaged_child(parent), parent, train, valid, cfg, tmp_path, CPU1)
    ckpt = tmp_path / "checkpoint"
    assert sorted(p.name for p in ckpt.iterdir()) == ["rank0.json", "rank0.safetensors", "state.json"]

    def refuse(*a: object, **k: object) -> None:
        raise AssertionError("a training checkpoint must load without unpickling")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    assert train_gkd(damaged_child(parent), parent, train, valid, cfg, tmp_path, CPU1).resumed_from == 2
    # every RNG comes back exactly, through JSON + tensors
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    tensors: dict[str, torch.Tensor] = {}
    saved = json.loads(json.dumps(pack(rng_state(), tensors)))
    expect = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(unpack(saved, tensors, torch.device("cpu"), None))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expect[0]) and np.array_equal(got[1], expect[1]) and got[2] == expect[2]


def test_data_shards_are_distinct_and_independent_of_world_size() -> None:
    one = batch_indices(10, seed=3, micro_index=2, rank=0, world=1, micro=4)
    two = np.concatenate([batch_indices(10, 3, 2, r, 2, 2) for r in range(2)])
    np.testing.assert_array_equal(one, two)
    r0, r1 = batch_indices(10, 3, 0, 0, 2, 2), batch_indices(10, 3, 0, 1, 2, 2)
    assert not set(r0) & set(r1)
    # one epoch visits every sequence once
    epoch = np.concatenate([batch_indices(12, 0, m, 0, 1, 4) for m in range(3)])
    assert sorted(epoch) == list(range(12))


def test_warmup_then_cosine_decay() -> None:
    f = lr_lambda(small_cfg(warmup_steps=4, min_lr_ratio=0.1), 20)
    assert f(0) == pytest.approx(0.25) and f(3) == pytest.approx(1.0)
    assert f(4) == pytest.approx(1.0) and f(20) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(4, 20))


def test_vocabulary_mismatch_is_rejected(tmp_path: Path) -> None:
    parent = tiny_parent()
    child = tiny_parent(vocab=80)
    train, valid = token_arrays()
    with pytest.raises(PuzzleError, match="vocabulary"):
        train_gkd(child, parent, train, valid, small_cfg(), tmp_path, CPU1)


def test_corpus_shorter_than_one_sequence_is_rejected(tmp_path: Path) -> None:
    parent = tiny_parent()
    _, valid = token_arrays()
    with pytest.raises(PuzzleError, match="shorter than one sequence"):
        train_gkd(damaged_child(parent), parent, np.zeros((0, 16), dtype=np.int64), valid, small_cfg(),
                  tmp_path, CPU1)


def test_nan_loss_is_reported(tmp_path: Path) -> None:
    parent = tiny_parent()
    child = damaged_child(parent)
    with torch.no_grad():
        child.layers[0].ffn.op.down_proj.weight[0, 0] = float("nan")
    train, _valid = token_arrays()
    with pytest.raises(PuzzleError, match="nan at step 1"):
        train_gkd(child, parent, train, None, small_cfg(), tmp_path, CPU1)


def test_bad_config_values_are_rejected() -> None:
    with pytest.raises(PuzzleError, match="unknown key"):
        from_dict(UptrainConfig, {"stepz": 3})
    with pytest.raises(PuzzleError, match="weights"):
        from_dict(UptrainConfig, {"kl_weight": 0, "cosine_weight": 0})
    with pytest.raises(PuzzleError, match="parallel"):
        from_dict(UptrainConfig, {"parallel": "zero3"})


def test_run_uptrain_exports_hf_dir_with_log_and_is_current_after(tmp_path: Path) -> None:
    from gkd_helpers import make_run_dir
    from puzzle.formats import load_model
    from puzzle.stages.uptrain.stage import run_uptrain

    run, _ = make_run_dir(tmp_path)
    child_dir = run / "children" / "noattn12"
    cfg = small_cfg(steps=4, checkpoint_every=2, val_every=2, micro_batch_size=2)
    out = run_uptrain(run, child_dir, cfg)
    assert out == child_dir / "uptrained"
    assert (out / "config.json").exists() and (out / "modeling_decilm.py").exists()
    log = json.loads((out / "training_log.json").read_text())
    assert [r["step"] for r in log["train"]] == [1, 2, 3, 4] and log["valid"][0]["step"] == 0
    assert not (child_dir / ".uptrain").exists(), "the checkpoint is removed after a successful export"
    trained = load_model(out)
    assert [b.name for b in trained.config.blocks] == [b.name for b in load_model(child_dir).config.blocks]
    before = load_model(child_dir).state_dict()
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "uptraining changed no weight"
    mtime = (out / "training_log.json").stat().st_mtime_ns
    run_uptrain(run, child_dir, cfg)  # current: nothing to do
    assert (out / "training_log.json").stat().st_mtime_ns == mtime
