"""`puzzle run` end to end on a tiny Llama: every stage's artifacts, a no-op rerun, resume after SIGKILL in
the library stage, --from/--until, one-line errors with exit code 2, and every shipped config."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.torch import load_file

from gkd_helpers import one_torch_thread  # noqa: F401  (autouse fixture: one intra-op thread)
from pipeline_helpers import NUM_LAYERS, WORKLOAD, make_parent, run_config, snapshot, write_yaml
from puzzle.cli import main
from puzzle.core.config import read_yaml
from puzzle.core.workloads import DEFAULT_WORKLOADS
from puzzle.formats import load_model
from puzzle.model.blocks import BlockConfig
from puzzle.pipeline import STAGES, RunConfig, load_run_config, run_pipeline
from puzzle.stages.data import load_tokens
from puzzle.stages.library.search_space import layer_spaces
from puzzle.stages.search.stage import parse_target

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def parent_src(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_parent(tmp_path_factory.mktemp("parent"))


@pytest.fixture(scope="module")
def full_run(parent_src: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[RunConfig, dict]:
    """The whole pipeline, once, in-process; (config, seconds per stage)."""
    import torch

    torch.set_num_threads(1)  # module fixtures run before the autouse one
    run_dir = tmp_path_factory.mktemp("e2e") / "run"
    cfg = load_run_config(run_config(*parent_src, run_dir))
    t0 = time.perf_counter()
    timings = run_pipeline(cfg, log=lambda msg: None)
    timings["total"] = time.perf_counter() - t0
    return cfg, timings


def _stderr_errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if ": error:" in line]


def _temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.tmp")]


# ---- 1. every stage, then a rerun that does nothing ---------------------------------------------------------


def test_every_stage_writes_its_artifacts(full_run: tuple[RunConfig, dict], parent_src: tuple[Path, Path]) -> None:
    cfg, timings = full_run
    run = Path(cfg.run_dir)
    assert list(timings) == [*STAGES, "total"]
    assert timings["total"] < 60, timings
    assert not (run / "refine").exists()  # refine is opt-in (refine.enabled): off, it writes nothing

    # import: the native parent, identical in architecture to the HF source, with its tokenizer
    parent = load_model(run / "parent")
    source = load_model(parent_src[0])
    assert parent.config.to_dict() == source.config.to_dict()
    assert all(a.equal(b) for a, b in zip(parent.state_dict().values(), source.state_dict().values(), strict=True))
    assert (run / "parent" / "tokenizer.json").is_file()

    # data: manifest and packed token arrays of the configured length, ids inside the vocabulary
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    assert manifest["seq_len"] == 32
    for split in ("train", "valid", "test"):
        tokens = load_tokens(run / "data", split)
        assert tokens.ndim == 2 and tokens.shape[1] == 32 and tokens.shape[0] == manifest["splits"][split]["sequences"] > 0
        assert int(tokens.max()) < parent.config.vocab_size

    # library: one entry per (layer, variant) of the search space, each with its sidecar and loadable weights
    library = json.loads((run / "library" / "library.json").read_text())
    spaces = layer_spaces(cfg.library.search_space, parent.config)
    expected = sum(len(s.attention) + len(s.ffn) for s in spaces)
    assert expected == NUM_LAYERS * (4 + 4)  # gqa2/gqa1/linear/no_op x swiglu64/swiglu32/linear/no_op
    assert len(library["entries"]) == expected
    for entry in library["entries"]:
        if entry["file"] is not None:
            assert load_file(str(run / "library" / entry["file"]))

    # score: every layer, every attention x FFN pair, finite KL
    scores = json.loads((run / "scores" / "scores.json").read_text())
    assert [layer["layer"] for layer in scores["layers"]] == list(range(NUM_LAYERS))
    for layer in scores["layers"]:
        assert len(layer["candidates"]) == 16
        assert all(math.isfinite(c["kl"]) for c in layer["candidates"])

    # costs: no GPU here, so the analytic estimate, labelled as one
    costs_files = sorted((run / "costs").glob("*.json"))
    assert [p.name for p in costs_files] == [f"estimate-{WORKLOAD}.json"]
    costs = json.loads(costs_files[0].read_text())
    assert costs["kind"] == "estimate" and costs["device_key"] == "estimate"

    # search: every solution meets its throughput target on the parent's prediction
    solutions = json.loads((run / "search" / "solutions.json").read_text())
    assert solutions["solutions"], "the 1.3x target is feasible for this parent"
    parent_tok_s = solutions["parent"][WORKLOAD]["throughput_tok_s"]
    for sol in solutions["solutions"]:
        predicted = sol["predicted"][WORKLOAD]
        assert predicted["throughput_tok_s"] >= 1.3 * parent_tok_s * (1 - 1e-9)
        assert predicted["estimate"] is True
        assert len(sol["blocks"]) == NUM_LAYERS
    chosen = solutions["solutions"][0]

    # realize: a loadable Nemotron-NAS directory whose blocks are the solution's
    child_dir = run / "children" / chosen["name"]
    hf = json.loads((child_dir / "config.json").read_text())
    assert hf["model_type"] == "nemotron-nas" and hf["architectures"] == ["DeciLMForCausalLM"]
    assert len(hf["block_configs"]) == NUM_LAYERS
    assert all({"attention", "ffn"} <= set(b) for b in hf["block_configs"])
    assert (child_dir / "modeling_decilm.py").is_file()
    child = load_model(child_dir)
    assert child.block_configs == [BlockConfig.from_dict(b) for b in chosen["blocks"]]
    assert child.config.param_count() < parent.config.param_count()

    # uptrain: the distilled child, same architecture, with its training log
    uptrained = load_model(child_dir / "uptrained")
    assert uptrained.block_configs == child.block_configs
    log = json.loads((child_dir / "uptrained" / "training_log.json").read_text())
    assert log["steps"] == 3

    # eval: parent, child and uptrained child against the parent, on the test split
    evaluation = json.loads((run / "eval" / "eval.json").read_text())
    assert evaluation["split"] == "test"
    assert evaluation["sequences"] == min(8, manifest["splits"]["test"]["sequences"])
    models = evaluation["models"]
    assert set(models) == {"parent", chosen["name"], f"{chosen['name']}/uptrained"}
    assert models["parent"]["kl_to_parent"] == pytest.approx(0.0, abs=1e-6)
    assert models[chosen["name"]]["kl_to_parent"] > 1e-6
    assert models[chosen["name"]]["params"] == child.config.param_count()

    # report
    report = (run / "report.md").read_text()
    assert "## Quality" in report and chosen["name"] in report and "## Search solutions" in report
    assert "on the test split" in report
    assert not _temporaries(run)


def test_second_run_does_nothing(full_run: tuple[RunConfig, dict], tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    cfg, _ = full_run
    run = Path(cfg.run_dir)
    config = write_yaml(tmp_path / "run.yaml", json.loads((run / "config.json").read_text()))
    before = snapshot(run)
    t0 = time.perf_counter()
    assert main(["run", str(config)]) == 0
    elapsed = time.perf_counter() - t0
    assert snapshot(run) == before  # no file written, touched, added or removed
    assert elapsed < 10, f"a rerun with everything current took {elapsed:.1f} s"
    out = capsys.readouterr().out
    assert "Summary of" in out and "child-0/uptrained" in out
    assert "est. tok/s and speed-up: ESTIMATE" in out  # no GPU here: the predictions are labelled as estimates


def test_moved_run_directory_is_still_current(full_run: tuple[RunConfig, dict], tmp_path: Path) -> None:
    """A finished run copied or moved elsewhere (another disk, a renamed folder) recomputes nothing: no stage's
    inputs hash may hold the run directory's own path."""
    cfg, _ = full_run
    moved = tmp_path / "elsewhere" / "renamed-run"
    shutil.copytree(cfg.run_dir, moved)  # copy2 keeps contents and modification times, as `mv` or `cp -a` do
    data = {**json.loads((moved / "config.json").read_text()), "run_dir": str(moved)}
    before = {k: v for k, v in snapshot(moved).items() if k != "config.json"}
    assert main(["run", str(write_yaml(tmp_path / "run.yaml", data))]) == 0
    after = {k: v for k, v in snapshot(moved).items() if k != "config.json"}
    assert after == before  # only config.json (which names the run directory) is rewritten


def test_pipeline_under_torchrun_uses_every_rank(parent_src: tuple[Path, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    config = write_yaml(tmp_path / "run.yaml", run_config(*parent_src, run))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "puzzle.cli", "run", str(config)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Summary of") == 1  # printed by rank 0 only
    sidecars = [json.loads(p.read_text()) for p in (run / "library").glob("layer*/*.json")]
    assert len(sidecars) == NUM_LAYERS * 8
    # BLD: each rank trained its share in one wave, so no wave holds every item
    assert max(s["metrics"]["wave_items"] for s in sidecars) < len(sidecars)
    log = json.loads(next((run / "children").glob("*/uptrained/training_log.json")).read_text())
    assert log["world_size"] == 2  # GKD on both ranks
    assert (run / "eval" / "eval.json").is_file() and (run / "report.md").is_file()


# ---- 2. SIGKILL during the library stage, then resume -------------------------------------------------------


def _entries(library: Path) -> dict[str, Path]:
    """Finished entries: sidecar path relative to the library -> sidecar."""
    return {str(p.relative_to(library)): p for p in sorted(library.glob("layer*/*.json"))}


def test_kill_during_library_then_resume_keeps_finished_blocks(parent_src: tuple[Path, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    data = run_config(*parent_src, run)
    # One variant per wave (each is written as soon as it is trained) and enough tokens that the stage
    # takes seconds: the poll below sees the first entry long before the last.
    data["library"].update(max_items_per_wave=1, tokens_per_variant=12288)
    config = write_yaml(tmp_path / "run.yaml", data)
    run_pipeline(load_run_config(data), until="data", log=lambda msg: None)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "killed.log"
    library = run / "library"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "puzzle.cli", "run", str(config), "--until", "library"],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 50
            while not _entries(library) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the library stage ended before it was killed:\n{log.read_text()}"

    total = NUM_LAYERS * 8
    finished = _entries(library)
    assert 0 < len(finished) < total, log.read_text()
    assert not (library / "library.json").exists() and not (library / ".stage.json").exists()
    # Nothing half-written is visible: temporaries are hidden *.tmp files, every sidecar names complete weights.
    for p in library.rglob("*"):
        if p.is_file() and p.suffix not in (".json", ".safetensors"):
            assert p.name.startswith(".") and p.name.endswith(".tmp"), p
    for sidecar in finished.values():
        entry = json.loads(sidecar.read_text())
        if entry["file"] is not None:
            assert load_file(str(library / entry["file"]))
    for weights in library.glob("layer*/*.safetensors"):
        assert load_file(str(weights))  # a weights file without its sidecar yet is still complete
    kept = {name: v for name, v in snapshot(library).items()  # finished sidecars and their weights
            if name in finished or name.removesuffix(".safetensors") + ".json" in finished}
    assert len(kept) > len(finished) or all(json.loads(p.read_text())["file"] is None for p in finished.values())

    assert main(["run", str(config), "--until", "library"]) == 0  # the same command again, as a user would
    after = snapshot(library)
    assert {name: after[name] for name in kept} == kept, "finished entries were retrained or rewritten"
    index = json.loads((library / "library.json").read_text())
    assert len(index["entries"]) == total == len(_entries(library))
    assert not _temporaries(run)  # the killed run's temporaries are cleaned up on resume


# ---- 3. --from / --until and one-line errors ----------------------------------------------------------------


def test_from_and_until_select_stages(parent_src: tuple[Path, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    config = write_yaml(tmp_path / "run.yaml", run_config(*parent_src, run))
    assert main(["run", str(config), "--until", "data"]) == 0
    assert (run / "parent" / "config.json").is_file() and (run / "data" / "manifest.json").is_file()
    assert not (run / "library").exists()

    assert main(["run", str(config), "--from", "library", "--until", "score"]) == 0
    assert (run / "library" / "library.json").is_file() and (run / "scores" / "scores.json").is_file()
    assert not (run / "costs").exists() and not (run / "search").exists()

    # --from a later stage runs only that stage and those after it
    assert main(["run", str(config), "--from", "costs", "--until", "costs"]) == 0
    assert (run / "costs").is_dir() and not (run / "search").exists()


def test_from_after_until_is_a_one_line_error(parent_src: tuple[Path, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    config = write_yaml(tmp_path / "run.yaml", run_config(*parent_src, run))
    assert main(["run", str(config), "--from", "search", "--until", "score"]) == 2
    assert len(_stderr_errors(capsys.readouterr().err)) == 1
    assert not run.exists()
    with pytest.raises(SystemExit) as e:  # argparse: not one of the stages
        main(["run", str(config), "--until", "bogus"])
    assert e.value.code == 2


@pytest.mark.parametrize("override, message", [
    ("library.bogus_key=1", "unknown key"),
    ("parent=/nonexistent/model", "does not exist"),
])
def test_bad_config_is_a_one_line_error_and_writes_nothing(parent_src: tuple[Path, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str], override: str,
                                                           message: str) -> None:
    run = tmp_path / "run"
    config = write_yaml(tmp_path / "run.yaml", run_config(*parent_src, run))
    assert main(["run", str(config), override]) == 2
    err = capsys.readouterr().err
    errors = _stderr_errors(err)
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err
    assert not run.exists()


def test_infeasible_target_is_a_one_line_error_and_keeps_artifacts(full_run: tuple[RunConfig, dict],
                                                                   tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    cfg, _ = full_run
    run = tmp_path / "run"
    shutil.copytree(cfg.run_dir, run)  # a copy: the shared run stays as the other tests expect it
    data = json.loads((run / "config.json").read_text())
    data["run_dir"] = str(run)
    config = write_yaml(tmp_path / "run.yaml", data)
    before = snapshot(run / "search")
    target = "search.constraints=[{kind: throughput, target: 50x, workload: " + WORKLOAD + "}]"
    assert main(["run", str(config), "--from", "search", target]) == 2
    err = capsys.readouterr().err
    errors = _stderr_errors(err)
    assert len(errors) == 1 and "50x" in errors[0] and "relax" in errors[0], err
    assert snapshot(run / "search") == before  # the earlier solutions stay whole; nothing half-written
    assert not _temporaries(run)


def test_stage_commands_use_the_runs_saved_config(full_run: tuple[RunConfig, dict], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`puzzle search RUN` searches under the constraints the run was created with; overrides go on top."""
    cfg, _ = full_run
    run = tmp_path / "run"
    shutil.copytree(cfg.run_dir, run)
    first = json.loads((run / "search" / "solutions.json").read_text())
    shutil.rmtree(run / "search")
    assert main(["search", str(run)]) == 0
    again = json.loads((run / "search" / "solutions.json").read_text())
    assert again["constraints"] == first["constraints"] == [{"kind": "throughput", "target": "1.3x",
                                                             "workload": WORKLOAD}]
    assert [s["blocks"] for s in again["solutions"]] == [s["blocks"] for s in first["solutions"]]
    target = "constraints=[{kind: throughput, target: 1.1x, workload: " + WORKLOAD + "}]"
    assert main(["search", str(run), target, "num_solutions=2"]) == 0
    relaxed = json.loads((run / "search" / "solutions.json").read_text())
    assert relaxed["constraints"][0]["target"] == "1.1x" and len(relaxed["solutions"]) == 2
    assert main(["eval", str(run)]) == 0  # the saved eval config (CPU, 8 sequences)
    out = capsys.readouterr().out
    assert "test split" in out


# ---- 4. every shipped config --------------------------------------------------------------------------------


SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def test_configs_are_shipped() -> None:
    assert any(p.name == "demo.yaml" for p in SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_config_is_valid(path: Path) -> None:
    data: dict[str, Any] = read_yaml(path)
    if not data.get("parent"):  # the demo's: `puzzle demo` fills in parent and data sources
        data["parent"] = "placeholder-parent"
    cfg = load_run_config(data)
    assert cfg.run_dir
    workloads = {w.name for w in cfg.workloads}
    assert workloads, "a config must name the workloads it optimises for"
    for c in cfg.search.constraints:
        parse_target(c.kind, c.target)
        assert c.workload is None or c.workload in workloads, f"{c.workload} is not in workloads"
    for target in cfg.search.sweep:
        parse_target(cfg.search.constraints[cfg.search.sweep_constraint].kind, target)
    known = workloads | {w.name for w in DEFAULT_WORKLOADS}
    assert set(cfg.eval.workloads) <= known, f"eval.workloads {cfg.eval.workloads} not among {sorted(known)}"
    assert all(0 < f <= 1 for f in cfg.library.search_space.ffn_fractions)
    assert cfg.realize.max_children >= 1
    assert np.isfinite(cfg.uptrain.lr) and cfg.uptrain.lr > 0
