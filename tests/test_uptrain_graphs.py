"""GKD without a host sync per step: metrics read every `log_every` steps, and the step as one CUDA graph.

CPU: deferred metrics give exactly the log and weights of reading them every step, are read only at the
flush points, still stop on a NaN before the next checkpoint, and resume exactly. GPU (marked): the graphed
step trains like the eager one within bf16 tolerance, and resumes.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

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
from puzzle.core.distributed import DistInfo
from puzzle.core.errors import PuzzleError
from puzzle.stages.uptrain import metrics as metrics_module
from puzzle.stages.uptrain.graphed import GraphedStep
from puzzle.stages.uptrain.stage import UptrainConfig, host_batch, lr_lambda, train_gkd
from puzzle.stages.uptrain.step import WIDTH, train_step


def cfg_of(**kw: object) -> UptrainConfig:
    base = {"steps": 9, "micro_batch_size": 2, "grad_accum": 2, "lr": 3e-3, "warmup_steps": 2, "val_every": 4,
            "val_batches": 2, "checkpoint_every": 3, "device": "cpu"}
    base.update(kw)
    return from_dict(UptrainConfig, base)


def test_deferred_metrics_give_the_same_log_and_weights_as_reading_every_step(tmp_path: Path) -> None:
    parent = tiny_parent()
    child = damaged_child(parent)
    train, valid = token_arrays()
    every = train_gkd(copy.deepcopy(child), parent, train, valid, cfg_of(log_every=1), tmp_path / "a", CPU1)
    deferred = train_gkd(copy.deepcopy(child), parent, train, valid, cfg_of(log_every=5), tmp_path / "b", CPU1)
    assert [r["step"] for r in deferred.log["train"]] == list(range(1, 10))
    assert deferred.log == every.log  # every record, key order and value, bit for bit
    assert list(deferred.log["train"][0]) == ["step", "tokens", "cosine", "kl", "lm_loss", "agreement", "loss",
                                              "grad_norm", "lr"]
    for (name, p), q in zip(every.model.state_dict().items(), deferred.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_metrics_are_read_only_at_flush_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[list[int]] = []
    flush = metrics_module.MetricHistory.flush

    def counting(self: metrics_module.MetricHistory, cfg: UptrainConfig, tokens: int) -> list:
        reads.append([s for s, _ in self.pending])
        return flush(self, cfg, tokens)

    monkeypatch.setattr(metrics_module.MetricHistory, "flush", counting)
    parent = tiny_parent()
    train, valid = token_arrays()
    seen: list[int] = []
    train_gkd(damaged_child(parent), parent, train, valid, cfg_of(steps=10, log_every=4, val_every=0,
                                                                  checkpoint_every=6), tmp_path, CPU1,
              on_step=lambda step, record: seen.append(step))
    # every 4 steps, before the checkpoint at 6, and at the end; one host read each
    assert reads == [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10]]
    assert seen == list(range(1, 11))


def test_nan_mid_run_stops_before_the_next_checkpoint(tmp_path: Path) -> None:
    parent = tiny_parent()
    child = damaged_child(parent)
    train, _valid = token_arrays()
    forwards = [0]

    def poison_from_step_3(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        forwards[0] += 1
        return out * float("nan") if forwards[0] >= 3 else out  # grad_accum=1: forward n is step n

    child.layers[0].ffn.register_forward_hook(poison_from_step_3)
    cfg = cfg_of(steps=8, grad_accum=1, checkpoint_every=2, log_every=50, val_every=0)
    with pytest.raises(PuzzleError, match="nan at step 3") as err:
        train_gkd(child, parent, train, None, cfg, tmp_path, CPU1)
    assert "\n" not in str(err.value)
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2, "the checkpoint after the bad step must not be written"
    assert [r["step"] for r in state["log"]["train"]] == [1, 2]


def test_resume_with_deferred_metrics_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    parent = tiny_parent()
    base_child = damaged_child(parent)
    train, valid = token_arrays()
    full = train_gkd(copy.deepcopy(base_child), parent, train, valid, cfg_of(log_every=1), tmp_path / "a", CPU1)

    with pytest.raises(Killed):
        train_gkd(copy.deepcopy(base_child), parent, train, valid, cfg_of(log_every=4), tmp_path / "b", CPU1,
                  on_step=kill_after(7))
    # log_every and cuda_graphs do not change the trajectory: the checkpoint (step 6) is resumed under others
    resumed = train_gkd(copy.deepcopy(base_child), parent, train, valid, cfg_of(log_every=2, cuda_graphs="off"),
                        tmp_path / "b", CPU1)
    assert resumed.resumed_from == 6
    assert resumed.log == full.log
    for (name, p), q in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)


def test_bad_graph_and_log_settings_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(PuzzleError, match="log_every"):
        cfg_of(log_every=0)
    with pytest.raises(PuzzleError, match="cuda_graphs"):
        cfg_of(cuda_graphs="always")
    parent = tiny_parent()
    train, valid = token_arrays()
    with pytest.raises(PuzzleError, match="cuda_graphs=on needs one process on a CUDA device"):
        train_gkd(damaged_child(parent), parent, train, valid, cfg_of(cuda_graphs="on"), tmp_path, CPU1)
    result = train_gkd(damaged_child(parent), parent, train, valid, cfg_of(steps=2), tmp_path, CPU1)
    assert result.extra["cuda_graphs"] is False  # auto on CPU: eager


# ---- the graph runner's plumbing, on CPU (a stand-in graph re-runs the recorded step) ------------------------


class FakeGraph:
    """Stands in for a captured CUDAGraph: replay runs the step again from the same static buffers, with fresh
    gradients (the real graph's first backward writes them afresh). Counts replays."""

    def __init__(self, runner: GraphedStep) -> None:
        self.runner, self.out, self.replays = runner, torch.zeros(WIDTH), 0

    def replay(self) -> None:
        self.replays += 1
        self.runner.optimizer.zero_grad(set_to_none=True)
        self.out.copy_(self.runner._body())


def _fake_capture(self: GraphedStep) -> tuple[FakeGraph, torch.Tensor]:
    graph = FakeGraph(self)
    return graph, graph.out


def _eager_warm(self: GraphedStep) -> torch.Tensor:
    self.optimizer.zero_grad(set_to_none=True)
    return self._body()


def _setup(cfg: UptrainConfig) -> tuple:
    parent = tiny_parent().requires_grad_(False)
    child = damaged_child(parent).requires_grad_(True)
    opt = torch.optim.AdamW(child.parameters(), lr=cfg.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, cfg.steps))
    return parent, child, opt, sched


def test_graph_runner_feeds_batch_and_lr_through_static_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(GraphedStep, "_capture", _fake_capture)
    monkeypatch.setattr(GraphedStep, "_warm_step", _eager_warm)
    cfg = cfg_of(steps=6, warmup_steps=4)  # the lr changes every step: a stale lr buffer would show
    train, _valid = token_arrays()
    parent, eager_child, eager_opt, eager_sched = _setup(cfg)
    _, child, opt, sched = _setup(cfg)
    runner = GraphedStep(child, parent, opt, cfg, (cfg.grad_accum, cfg.micro_batch_size, train.shape[1]),
                         torch.device("cpu"), autocast=False, warmup=2)
    for step in range(cfg.steps):
        batch = host_batch(train, cfg, step, CPU1)  # [grad_accum, micro, T]
        eager_opt.zero_grad(set_to_none=True)
        want = train_step(eager_child, eager_child, parent, eager_opt, list(batch.unbind(0)), cfg, "none", False)
        got = runner(batch, sched.get_last_lr())
        assert got is not None and torch.equal(got, want), step
        eager_sched.step()
        sched.step()
    assert isinstance(runner.graph, FakeGraph) and runner.graph.replays == 4  # 2 warm-up steps, then the graph
    assert all(isinstance(g["lr"], float) for g in opt.param_groups), "the scheduler and checkpoints see floats"
    for (name, p), q in zip(eager_child.state_dict().items(), child.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_failed_capture_changes_nothing_and_keeps_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    def refuse(self: GraphedStep) -> None:
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(GraphedStep, "_capture", refuse)
    cfg = cfg_of(steps=3)
    train, _valid = token_arrays()
    parent, child, opt, sched = _setup(cfg)
    before = copy.deepcopy(child.state_dict())
    runner = GraphedStep(child, parent, opt, cfg, (cfg.grad_accum, cfg.micro_batch_size, train.shape[1]),
                         torch.device("cpu"), autocast=False, run_dir=tmp_path, warmup=0)
    assert runner(host_batch(train, cfg, 0, CPU1), sched.get_last_lr()) is None
    assert runner.failed and runner.graph is None
    assert all(p.grad is None for p in child.parameters())
    for name, p in child.state_dict().items():
        assert torch.equal(p, before[name]), name
    kept = json.loads((tmp_path / "warnings.json").read_text())["warnings"]
    assert len(kept) == 1 and kept[0]["stage"] == "uptrain"
    assert "RuntimeError: operation not permitted" in kept[0]["message"] and "\n" not in kept[0]["message"]
    assert "cuda_graphs=off" in capsys.readouterr().err


def _graphs_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """train_gkd as on one GPU with graphs (the stand-in graph; AdamW's capturable exists on CUDA only)."""
    from puzzle.stages.uptrain import stage

    adamw = torch.optim.AdamW
    monkeypatch.setattr(stage, "_cuda_graphs", lambda cfg, mode, info: cfg.cuda_graphs != "off")
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, **kw: adamw(params, **{**kw, "capturable": False}))
    monkeypatch.setattr(GraphedStep, "_warm_step", _eager_warm)


def _eager_baseline(tmp_path: Path) -> tuple:
    """(parent, child to train, train, valid, the eager run's result): what each graph-runner test compares with."""
    parent = tiny_parent()
    base_child = damaged_child(parent)
    train, valid = token_arrays()
    eager = train_gkd(copy.deepcopy(base_child), parent, train, valid, cfg_of(cuda_graphs="off"), tmp_path / "e",
                      CPU1)
    return parent, base_child, train, valid, eager


def test_training_through_the_graph_runner_logs_and_resumes_like_eager(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    parent, base_child, train, valid, eager = _eager_baseline(tmp_path)
    _graphs_on_cpu(monkeypatch)
    monkeypatch.setattr(GraphedStep, "_capture", _fake_capture)
    graphed = train_gkd(copy.deepcopy(base_child), parent, train, valid, cfg_of(), tmp_path / "g", CPU1)
    assert graphed.extra["cuda_graphs"] is True
    assert graphed.log == eager.log

    with pytest.raises(Killed):
        train_gkd(copy.deepcopy(base_child), parent, train, valid, cfg_of(), tmp_path / "r", CPU1,
                  on_step=kill_after(8))
    resumed = train_gkd(copy.deepcopy(base_child), parent, train, valid, cfg_of(), tmp_path / "r", CPU1)
    assert resumed.resumed_from == 6 and resumed.log == eager.log
    for (name, p), q in zip(eager.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_a_failed_capture_trains_on_eagerly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parent, base_child, train, valid, eager = _eager_baseline(tmp_path)
    _graphs_on_cpu(monkeypatch)

    def refuse(self: GraphedStep) -> None:
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    monkeypatch.setattr(GraphedStep, "_capture", refuse)
    (tmp_path / "run").mkdir()
    fallback = train_gkd(copy.deepcopy(base_child), parent, train, valid, cfg_of(), tmp_path / "f", CPU1,
                         run_dir=tmp_path / "run")
    assert fallback.extra["cuda_graphs"] is False
    assert fallback.log == eager.log
    kept = json.loads((tmp_path / "run" / "warnings.json").read_text())["warnings"]
    assert [w["stage"] for w in kept] == ["uptrain"] and "training eagerly" in kept[0]["message"]


# ---- GPU ----------------------------------------------------------------------------------------------------


def _gpu() -> DistInfo:
    return DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_step_trains_like_the_eager_one(tmp_path: Path) -> None:
    parent = tiny_parent()
    child = damaged_child(parent)
    train, valid = token_arrays()
    kw = {"steps": 10, "device": "cuda", "checkpoint_every": 0, "val_every": 5, "log_every": 4}
    eager = train_gkd(copy.deepcopy(child), copy.deepcopy(parent), train, valid, cfg_of(cuda_graphs="off", **kw),
                      tmp_path / "eager", _gpu())
    graphed = train_gkd(copy.deepcopy(child), copy.deepcopy(parent), train, valid, cfg_of(cuda_graphs="on", **kw),
                        tmp_path / "graphed", _gpu())
    assert graphed.extra["cuda_graphs"] is True and eager.extra["cuda_graphs"] is False
    assert [r["step"] for r in graphed.log["train"]] == list(range(1, 11))
    for key in ("loss", "kl", "cosine", "grad_norm"):
        a = [r[key] for r in eager.log["train"]]
        b = [r[key] for r in graphed.log["train"]]
        assert b == pytest.approx(a, rel=2e-2, abs=1e-4), key
    assert [r["lr"] for r in graphed.log["train"]] == [r["lr"] for r in eager.log["train"]]
    assert graphed.log["valid"][-1]["kl"] == pytest.approx(eager.log["valid"][-1]["kl"], rel=2e-2, abs=1e-4)
    assert graphed.log["train"][-1]["loss"] < graphed.log["train"][0]["loss"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_run_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    parent = tiny_parent()
    child = damaged_child(parent)
    train, valid = token_arrays()
    cfg = cfg_of(steps=12, device="cuda", checkpoint_every=6, val_every=0, log_every=4, cuda_graphs="on")
    full = train_gkd(copy.deepcopy(child), copy.deepcopy(parent), train, valid, cfg, tmp_path / "a", _gpu())

    with pytest.raises(Killed):
        train_gkd(copy.deepcopy(child), copy.deepcopy(parent), train, valid, cfg, tmp_path / "b", _gpu(),
                  on_step=kill_after(8))
    resumed = train_gkd(copy.deepcopy(child), copy.deepcopy(parent), train, valid, cfg, tmp_path / "b", _gpu())
    assert resumed.resumed_from == 6 and resumed.extra["cuda_graphs"] is True
    a = [r["loss"] for r in full.log["train"]]
    b = [r["loss"] for r in resumed.log["train"]]
    assert len(b) == 12
    assert b == pytest.approx(a, rel=2e-2, abs=1e-4)
    for (name, p), q in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(p.float(), q.float(), rtol=2e-2, atol=2e-3, msg=name)
