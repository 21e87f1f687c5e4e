"""Config flows forward: every value is checked when the config is loaded, before any stage runs, and the
single-stage commands start from the config the run was created with (RUN/config.json), then `--config`,
then key=value overrides."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from puzzle.cli import main
from puzzle.core.config import from_dict, load_stage_config, to_dict
from puzzle.core.errors import PuzzleError
from puzzle.costs.stage import CostsConfig
from puzzle.pipeline import RunConfig, load_run_config
from puzzle.stages.data import DataConfig
from puzzle.stages.evaluate.stage import EvalConfig
from puzzle.stages.library import LibraryConfig
from puzzle.stages.realize import RealizeConfig
from puzzle.stages.refine.stage import RefineConfig
from puzzle.stages.report.stage import ReportConfig
from puzzle.stages.scoring.stage import ScoreConfig
from puzzle.stages.search.stage import SearchConfig
from puzzle.stages.uptrain.stage import UptrainConfig

REPO = Path(__file__).resolve().parents[1]
REF_S = REPO / "configs" / "ref-s.yaml"


# ---- a bad value fails at load: one line, exit 2, nothing written ---------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("score.batch_size=0", "score.batch_size must be positive, got 0"),
    ("score.dtype=int8", "score.dtype='int8' is not supported"),
    ("score.device=gpu0", "score.device='gpu0' is not a device"),
    ("data.test_fraction=0.99", "data.valid_fraction + data.test_fraction must be below 1"),
    ("data.valid_fraction=0", "data.valid_fraction must be in (0, 1), got 0"),
    ("data.seq_len=-4", "data.seq_len must be at least 2, got -4"),
    ("library.batch_size=-1", "library.batch_size must be positive, got -1"),
    ("library.search_space.ffn_fractions=[1.0,1.5]", "library.search_space.ffn_fractions: 1.5 is outside (0, 1]"),
    ("library.search_space.round_to=0", "library.search_space.round_to must be positive, got 0"),
    ("costs.repeats=0", "costs.repeats must be positive, got 0"),
    ("workloads=[]", "workloads is empty"),
    ("search.constraints=[{kind: throughput, target: 2y, workload: text-generation-1k}]",
     "search.constraints[0].target: cannot read throughput target '2y'"),
    ("search.constraints=[{kind: memory, target: 80GiB}]", "search.constraints[0]: a memory constraint needs a workload"),
    ("search.constraints=[{kind: throughput, target: 2x, workload: chatbot}]",
     "search.constraints[0].workload: workload 'chatbot' is not defined"),
    ("search.sweep=[1.5x,fast]", "search.sweep[1]: cannot read throughput target 'fast'"),
    ("search.num_solutions=0", "search.num_solutions must be at least 1, got 0"),
    ("realize.max_children=0", "realize.max_children must be at least 1, got 0"),
    ("uptrain.steps=0", "uptrain.steps must be positive, got 0"),
    ("eval.batch_size=0", "eval.batch_size must be positive, got 0"),
    ("eval.workloads=[nope]", "eval.workloads[0]: workload 'nope' is not defined"),
    ("report.cost_metric=speed", "report.cost_metric 'speed' is not one of"),
    ("report.workload=nope", "report.workload: workload 'nope' is not defined"),
])
def test_bad_value_fails_before_any_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str,
                                          message: str) -> None:
    run = tmp_path / "run"
    assert main(["run", str(REF_S), f"run_dir={run}", override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err
    assert not run.exists()


def test_the_reference_config_with_a_bad_value_fails_fast_as_a_process(tmp_path: Path) -> None:
    """`puzzle run configs/ref-s.yaml score.batch_size=0`, as typed: one line, exit 2, nothing written anywhere,
    in under 5 s of CPU (CPU time, not wall time: other processes on the machine do not count)."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "puzzle.cli", "run", str(REF_S), "score.batch_size=0"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert proc.returncode == 2 and proc.stdout == "", proc
    assert proc.stderr.count("\n") == 1 and "score.batch_size must be positive, got 0" in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []  # not even runs/ref-s
    assert cpu < 5.0 and wall < 60, f"{cpu:.1f} s CPU, {wall:.1f} s wall before the error"


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_saved_config_round_trips(path: Path) -> None:
    """What `puzzle run` saves (to_dict) loads back to the same config: stage commands can start from it."""
    data = yaml.safe_load(path.read_text())
    data["parent"] = data.get("parent") or "placeholder-parent"
    cfg = load_run_config(data)
    assert from_dict(RunConfig, json.loads(json.dumps(to_dict(cfg))), "config") == cfg


# ---- single-stage commands start from the run's saved config ------------------------------------------------


class _Captured(Exception):
    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg


# command, (module, function) that receives the config, section, config class,
# saved values, YAML values, one override, and what the command must end up with
CASES = [
    ("data", ("puzzle.commands.data", "run_data"), DataConfig,
     {"seq_len": 64, "valid_fraction": 0.1}, {"valid_fraction": 0.2}, "test_fraction=0.3",
     {"seq_len": 64, "valid_fraction": 0.2, "test_fraction": 0.3}),
    ("library", ("puzzle.commands.library", "run_library"), LibraryConfig,
     {"batch_size": 3, "lr": 1e-3, "search_space": {"round_to": 16, "ffn_fractions": [0.5]}},
     {"lr": 2e-3, "search_space": {"ffn_fractions": [0.25]}}, "tokens_per_variant=1000",
     {"batch_size": 3, "lr": 2e-3, "tokens_per_variant": 1000, "search_space.round_to": 16,
      "search_space.ffn_fractions": [0.25]}),
    ("score", ("puzzle.commands.score", "run_score"), ScoreConfig,
     {"num_sequences": 5, "batch_size": 2}, {"batch_size": 3}, "candidates_per_batch=7",
     {"num_sequences": 5, "batch_size": 3, "candidates_per_batch": 7}),
    ("costs", ("puzzle.costs.stage", "run_costs"), CostsConfig,
     {"repeats": 4, "warmup": 1}, {"warmup": 2}, "mode=estimate", {"repeats": 4, "warmup": 2, "mode": "estimate"}),
    ("search", ("puzzle.commands.search", "run_search"), SearchConfig,
     {"constraints": [{"kind": "throughput", "target": "2x", "workload": "tg"}], "num_solutions": 2},
     {"num_solutions": 3}, "time_limit_s=5",
     {"constraints": [{"kind": "throughput", "target": "2x", "workload": "tg"}], "num_solutions": 3,
      "time_limit_s": 5.0}),
    ("refine", ("puzzle.commands.refine", "run_refine"), RefineConfig,  # enabled in each layer: off, it returns
     {"enabled": True, "tokens_per_variant": 5}, {"enabled": True, "lr": 1e-3}, "tokens_per_variant=7",
     {"enabled": True, "tokens_per_variant": 7, "lr": 1e-3}),
    ("realize", ("puzzle.commands.realize", "chosen_solutions"), RealizeConfig,
     {"max_children": 2, "solutions": ["a"]}, {"solutions": ["b"]}, "max_children=1",
     {"max_children": 1, "solutions": ["b"]}),
    ("uptrain", ("puzzle.commands.uptrain", "run_uptrain"), UptrainConfig,
     {"steps": 7, "lr": 1e-3}, {"lr": 2e-3}, "micro_batch_size=2", {"steps": 7, "lr": 2e-3, "micro_batch_size": 2}),
    ("eval", ("puzzle.commands.eval", "run_eval"), EvalConfig,
     {"max_sequences": 9, "batch_size": 2, "workloads": ["tg"]}, {"batch_size": 3}, "throughput=false",
     {"max_sequences": 9, "batch_size": 3, "throughput": False, "workloads": ["tg"]}),
    ("report", ("puzzle.commands.report", "run_report"), ReportConfig,
     {"plots": False, "cost_metric": "decode_step_s"}, {"cost_metric": "prefill_s"}, "workload=tg",
     {"plots": False, "cost_metric": "prefill_s", "workload": "tg"}),
]


def _flat(values: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    out: dict[str, Any] = {}
    for key, value in values.items():
        out |= _flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return out


def _value(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return to_dict(cfg)


def _capture(monkeypatch: pytest.MonkeyPatch, module: str, function: str, cls: type) -> None:
    def fake(*args: Any, **kwargs: Any) -> None:
        raise _Captured(next(a for a in (*args, *kwargs.values()) if isinstance(a, cls)))

    monkeypatch.setattr(f"{module}.{function}", fake)


def _argv(command: str, run: Path, *extra: str) -> list[str]:
    return [command, str(run), *(["--child", "c"] if command == "uptrain" else []), *extra]


@pytest.mark.parametrize("command, target, cls, saved, from_yaml, override, expected", CASES, ids=[c[0] for c in CASES])
def test_stage_command_starts_from_the_saved_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str,
                                                    target: tuple[str, str], cls: type, saved: dict,
                                                    from_yaml: dict, override: str, expected: dict) -> None:
    run = tmp_path / "run"
    run.mkdir()
    whole = {"parent": "p", "workloads": [{"name": "tg", "batch_size": 8, "prompt_len": 32, "gen_len": 32}],
             "eval": {"workloads": ["tg"]}, command: saved}
    (run / "config.json").write_text(json.dumps(to_dict(load_run_config(whole))))  # as `puzzle run` writes it
    config = tmp_path / "more.yaml"
    config.write_text(yaml.safe_dump({command: from_yaml}))
    _capture(monkeypatch, *target, cls)

    with pytest.raises(_Captured) as got:  # the saved config alone
        main(_argv(command, run))
    for key, value in _flat(saved).items():
        assert _value(got.value.cfg, key) == value, key
    with pytest.raises(_Captured) as got:  # then the YAML's section, then the override
        main(_argv(command, run, "--config", str(config), override))
    for key, value in expected.items():
        assert _value(got.value.cfg, key) == value, key
    (run / "config.json").unlink()  # a run built stage by stage: defaults, then YAML and overrides
    with pytest.raises(_Captured) as got:
        main(_argv(command, run, "--config", str(config), override))
    default = cls()
    for key in _flat(saved):
        if key not in _flat(from_yaml) and not override.startswith(f"{key}="):
            assert _value(got.value.cfg, key) == _value(default, key), key


def test_a_bad_override_of_a_stage_command_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(to_dict(load_run_config({"parent": "p"}))))
    assert main(["score", str(run), "batch_size=0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "score.batch_size must be positive, got 0" in err
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]


def test_load_stage_config_merges_mappings_and_replaces_lists(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    saved = {"parent": "p", "library": {"search_space": {"round_to": 16, "ffn_fractions": [0.5, 0.25]}}}
    (run / "config.json").write_text(json.dumps(to_dict(load_run_config(saved))))
    (tmp_path / "c.yaml").write_text("library:\n  search_space:\n    ffn_fractions: [0.75]\n")
    cfg = load_stage_config(LibraryConfig, run, "library", tmp_path / "c.yaml", ["search_space.attention_no_op=false"])
    assert cfg.search_space.round_to == 16 and cfg.search_space.ffn_fractions == [0.75]
    assert cfg.search_space.attention_no_op is False


def test_costs_workloads_key_moved_to_the_top_level(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A config written for the old layout (`costs.workloads`) fails in one line saying where the key went."""
    old = yaml.safe_load(REF_S.read_text())
    old["costs"] = {"workloads": old.pop("workloads")}
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(old))
    assert main(["run", str(path), f"run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "costs.workloads moved to the top-level `workloads:` list" in err, err
    run = tmp_path / "stage"
    run.mkdir()
    assert main(["costs", str(run), "--config", str(path)]) == 2  # a single-stage command says the same
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "costs.workloads moved to the top-level `workloads:` list" in err, err
    with pytest.raises(PuzzleError, match="moved to the top-level `workloads:` list"):
        load_run_config({"parent": "p", "costs": {"workloads": []}})
