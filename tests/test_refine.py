"""The opt-in refine stage: coupled BLD of the chosen blocks, warm-started from the decoupled halves, re-scored and
re-searched; realize builds children from its coupled entries; off by default, a no-op when current."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from gkd_helpers import one_torch_thread  # noqa: F401  (autouse fixture: one intra-op thread)
from pipeline_helpers import WORKLOAD, make_parent, run_config, snapshot
from puzzle.core.artifacts import load_tensors, read_json, write_json
from puzzle.core.errors import PuzzleError
from puzzle.core.rundir import RunDir
from puzzle.formats import load_model
from puzzle.model.decoder import DecoderLayer
from puzzle.pipeline import RunConfig, load_run_config, run_pipeline
from puzzle.stages.data import load_tokens
from puzzle.stages.library.provider import library_provider
from puzzle.stages.library.search_space import parse_pair
from puzzle.stages.library.store import Library, LibraryEntry
from puzzle.stages.library.train import parent_activations, warm_candidate
from puzzle.stages.realize import build_child, run_realize
from puzzle.stages.refine.refine import decoupled_warm_start
from puzzle.stages.refine.stage import RefineConfig, run_refine

# Hand-written solutions over the tiny parent (2 layers, gqa2 + swiglu64): which (layer, block) refine trains.
HAND = {"hand-a": ["gqa1+swiglu32", "gqa2+swiglu32"],  # layer 1 keeps the parent's attention: not trained
        "hand-b": ["no_op+no_op", "linear+no_op"],  # no_op + no_op has nothing to train
        "hand-c": ["gqa2+swiglu64", "gqa1+linear"]}  # layer 0 is the parent's own block
EXPECTED = {(0, "gqa1+swiglu32"), (1, "linear+no_op"), (1, "gqa1+linear")}


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory) -> RunConfig:
    """`puzzle run` end to end on the tiny config with refine.enabled=true (the search's own solutions)."""
    torch.set_num_threads(1)  # module fixtures run before the autouse one
    root = tmp_path_factory.mktemp("refine")
    data = run_config(*make_parent(root), root / "run")
    data["refine"] = {"enabled": True, "tokens_per_variant": 1024}
    cfg = load_run_config(data)
    timings = run_pipeline(cfg, log=lambda msg: None)
    assert "refine" in timings
    return cfg


@pytest.fixture(scope="module")
def hand(e2e: RunConfig, tmp_path_factory: pytest.TempPathFactory) -> tuple[RunConfig, RunDir]:
    """A copy of the run whose search/solutions.json is hand-written, refined again."""
    run = RunDir(tmp_path_factory.mktemp("hand") / "run")
    shutil.copytree(e2e.run_dir, run.root)
    shutil.rmtree(run.refine)
    solutions = read_json(run.solutions)
    solutions["solutions"] = [{"name": name, "target": None, "rank": 0, "blocks": [parse_pair(p).to_dict() for p in pairs],
                               "block_names": pairs, "objective": 1.0} for name, pairs in HAND.items()]
    write_json(run.solutions, solutions)
    cfg = load_run_config({**json.loads(RunDir(e2e.run_dir).config.read_text()), "run_dir": str(run.root)})
    run_refine(run, cfg.refine, cfg.library, cfg.search)
    return cfg, run


def _trained(run: RunDir) -> dict[tuple[int, str], LibraryEntry]:
    return {(e.layer, e.variant): e for e in Library.open(run.refine_library).entries}


def test_refine_trains_the_chosen_coupled_blocks_and_improves_them(hand: tuple[RunConfig, RunDir]) -> None:
    cfg, run = hand
    trained = _trained(run)
    assert set(trained) == EXPECTED
    for e in trained.values():
        m = e.metrics
        assert e.kind == "block" and m["init"] == "warm_start" and m["tokens"] >= cfg.refine.tokens_per_variant
        assert m["val_nmse_after"] <= m["val_nmse_init"], (e.name, m)
    assert read_json(run.library_index) == read_json(RunDir(cfg.run_dir).library_index)  # left untouched


def test_the_warm_start_is_the_decoupled_composition(hand: tuple[RunConfig, RunDir]) -> None:
    _, run = hand
    parent = load_model(run.parent)
    library = Library.open(run.library)
    warm = decoupled_warm_start(library)(parent)
    provide = library_provider(library, parent)
    ids = torch.from_numpy(load_tokens(run.data, "valid")[:4].astype("int64"))  # [4, T]
    acts, cos, sin = parent_activations(parent, ids, {0, 1})
    for layer, name in sorted(EXPECTED):
        block = parse_pair(name)
        cand = warm_candidate(LibraryEntry(layer, "block", block.attention, block.ffn, None), warm, torch.device("cpu"))
        y, _ = cand(acts[layer], cos, sin)  # the coupled block's residual update [B, T, H]
        composed = DecoderLayer(*provide(layer, block))(acts[layer].h_in, cos, sin) - acts[layer].h_in
        torch.testing.assert_close(y, composed, rtol=1e-5, atol=1e-6)
        assert any(p.requires_grad for p in cand.parameters())


def test_refined_scores_replace_only_the_refined_rows(hand: tuple[RunConfig, RunDir]) -> None:
    _, run = hand
    before, after = read_json(run.scores_file), read_json(run.refine_scores)
    seen = set()
    for old_layer, new_layer in zip(before["layers"], after["layers"], strict=True):
        for old, new in zip(old_layer["candidates"], new_layer["candidates"], strict=True):
            key = (new_layer["layer"], new["name"])
            if key in EXPECTED:
                seen.add(key)
                assert new["decoupled"] == {k: v for k, v in old.items() if k not in ("block", "name")}
                assert new["refined"] and new["kl"] != old["kl"]
            else:
                assert new == old
    assert seen == EXPECTED and after["refined_rows"] == len(EXPECTED)
    solutions = read_json(run.refine_solutions)
    assert solutions["solutions"]
    for sol in solutions["solutions"]:  # the run's constraint: 1.3x the parent's throughput
        assert sol["predicted"][WORKLOAD]["speedup"] >= 1.3 - 1e-9
        assert all((i, sol["block_names"][i]) in EXPECTED for i in sol["refined_layers"])


def test_realize_uses_the_coupled_weights_only_when_enabled(hand: tuple[RunConfig, RunDir]) -> None:
    _, run = hand
    blocks = [parse_pair(p) for p in HAND["hand-b"]]  # layer 1 is refined
    refined = read_json(run.refine_solutions)
    refined["solutions"].append({"name": "hand-b", "rank": 1, "blocks": [b.to_dict() for b in blocks],
                                 "refined_layers": [1]})
    write_json(run.refine_solutions, refined)
    child = load_model(run_realize(run, "hand-b", refined=True))
    coupled = load_tensors(run.refine_library / _trained(run)[(1, "linear+no_op")].file)
    torch.testing.assert_close(child.layers[1].attention.op.linear_attn.weight,
                               coupled["attention.op.linear_attn.weight"], rtol=0, atol=0)
    # Disabled: the child of search/solutions.json, built from the decoupled library as before the stage existed.
    plain = load_model(run_realize(run, "hand-b"))
    expected = build_child(load_model(run.parent), Library.open(run.library), blocks)
    for a, b in zip(plain.state_dict().values(), expected.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(plain.layers[1].attention.op.linear_attn.weight,
                           child.layers[1].attention.op.linear_attn.weight)
    assert "refined_layers" not in json.dumps(read_json(run.child("hand-b") / "puzzle.json"))


def test_a_second_refine_is_a_no_op_and_stale_outputs_are_refused(hand: tuple[RunConfig, RunDir],
                                                                   capsys: pytest.CaptureFixture) -> None:
    cfg, run = hand
    before = snapshot(run.refine)
    run_refine(run, cfg.refine, cfg.library, cfg.search)
    assert "is current" in capsys.readouterr().out and snapshot(run.refine) == before
    assert run_refine(run, RefineConfig(), cfg.library, cfg.search) is None  # disabled: nothing at all
    stale = RunDir(run.root.parent / "stale")
    shutil.copytree(run.root, stale.root)
    solutions = read_json(stale.solutions)
    solutions["solutions"] = solutions["solutions"][:1]
    write_json(stale.solutions, solutions)
    with pytest.raises(PuzzleError, match="puzzle refine"):
        run_realize(stale, "hand-a", refined=True)
    stale.solutions.unlink()
    with pytest.raises(PuzzleError, match="puzzle search"):
        run_refine(stale, cfg.refine, cfg.library, cfg.search)


def test_puzzle_run_with_refine_realizes_the_refined_search(e2e: RunConfig) -> None:
    run = RunDir(e2e.run_dir)
    refined = read_json(run.refine_solutions)
    name = refined["solutions"][0]["name"]
    sidecar = json.dumps(read_json(run.child(name) / "puzzle.json"))
    assert '"refined_layers"' in sidecar
    assert (run.uptrained(name) / "config.json").exists() and run.eval_file.exists()
    assert refined["solutions"][0]["decoupled"]["blocks"] == read_json(run.solutions)["solutions"][0]["blocks"]
    with pytest.raises(PuzzleError, match="unknown key"):
        load_run_config({"parent": "p", "refine": {"enable": True}})


def test_report_and_summary_describe_the_refined_solutions(e2e: RunConfig, tmp_path) -> None:
    """With refine on, realize builds children from refine/solutions.json: the report and summary read the same
    file, not the first search's; with it off, search/solutions.json."""
    from puzzle.stages.report.serving import serving_lines

    on = RunDir(tmp_path / "on")
    shutil.copytree(e2e.run_dir, on.root)
    assert on.solutions_in_use() == on.refine_solutions
    refined = read_json(on.refine_solutions)
    refined["solutions"][0]["name"] = "refined-only"  # a name the first search never gave
    write_json(on.refine_solutions, refined)
    assert any(line.startswith("refined-only ") for line in serving_lines(on))
    config = read_json(on.config)
    config["refine"]["enabled"] = False
    write_json(on.config, config)
    assert on.solutions_in_use() == on.solutions
    assert not any(line.startswith("refined-only ") for line in serving_lines(on))
