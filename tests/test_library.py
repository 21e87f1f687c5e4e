"""BLD: initialisation, training, library store, modes, resume, NaN handling, bad search spaces."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import puzzle.stages.library.init as lib_init
from puzzle.core.errors import PuzzleError
from puzzle.model.blocks import AttentionConfig, BlockConfig, FFNConfig
from puzzle.model.decoder import build_model
from puzzle.model.presets import tiny_llama_config
from puzzle.stages.library import Library, LibraryConfig, SearchSpaceConfig, build_library
from puzzle.stages.library.init import init_attention
from puzzle.stages.library.search_space import layer_spaces

CONFIG = tiny_llama_config(num_layers=2)  # 4 query heads, 2 KV heads, SwiGLU 128, hidden 64


def tokens(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, CONFIG.vocab_size, (n, 32)).astype(np.uint16)


def lib_cfg(**space: object) -> LibraryConfig:
    return LibraryConfig(search_space=SearchSpaceConfig(round_to=16, **space), tokens_per_variant=60 * 8 * 32,
                         lr=3e-4, init_batches=2, progress=False)


@pytest.fixture(scope="module")
def parent() -> torch.nn.Module:
    return build_model(CONFIG, seed=0)


@pytest.fixture(scope="module")
def decoupled(tmp_path_factory: pytest.TempPathFactory, parent: torch.nn.Module) -> Library:
    out = tmp_path_factory.mktemp("lib") / "library"
    build_library(out, parent, tokens(64, 0), tokens(8, 1), lib_cfg())
    return Library.open(out)


def test_trained_variants_improve_and_parent_variants_are_exact(decoupled: Library) -> None:
    trained = [e for e in decoupled.entries if e.metrics["tokens"] > 0]
    assert {e.variant for e in trained} >= {"gqa1", "linear", "swiglu16", "swiglu64", "swiglu112"}
    for e in trained:
        assert e.metrics["val_nmse_after"] < e.metrics["val_nmse_init"], e.name
    parents = [e for e in decoupled.entries if e.metrics["init"] == "parent"]
    assert {e.variant for e in parents} == {"gqa2", "swiglu128"}
    assert all(e.metrics["val_nmse_init"] == 0.0 and e.metrics["tokens"] == 0 for e in parents)
    no_ops = [e for e in decoupled.entries if e.variant == "no_op"]
    assert len(no_ops) == 4 and all(abs(e.metrics["val_nmse_init"] - 1) < 1e-6 and e.file is None for e in no_ops)


def test_decoupled_has_a_plus_f_entries_per_layer(decoupled: Library) -> None:
    spaces = layer_spaces(SearchSpaceConfig(round_to=16), CONFIG)
    for s in spaces:
        entries = decoupled.entries_for(s.layer)
        assert len(entries) == len(s.attention) + len(s.ffn) == 4 + 10
        assert len(decoupled.candidates(s.layer)) == 4 * 10


def test_library_blocks_load_and_match_the_parent(decoupled: Library, parent: torch.nn.Module) -> None:
    h = torch.randn(2, 5, CONFIG.hidden_size)
    cos, sin = parent.rope(parent.default_positions(torch.zeros(2, 5, dtype=torch.long)), h.dtype)
    att = decoupled.attention_block(1, AttentionConfig.gqa(2), CONFIG)
    ffn = decoupled.ffn_block(1, FFNConfig.swiglu(128), CONFIG)
    assert torch.equal(att(h, cos, sin), parent.layers[1].attention(h, cos, sin))
    assert torch.equal(ffn(h), parent.layers[1].ffn(h))
    small = decoupled.ffn_block(0, FFNConfig.swiglu(48), CONFIG)
    assert small.op.up_proj.weight.shape == (48, CONFIG.hidden_size)
    assert decoupled.ffn_block(0, FFNConfig.no_op(), CONFIG) is None
    with pytest.raises(PuzzleError, match="no attention 'gqa4'"):
        decoupled.attention_block(0, AttentionConfig.gqa(4), CONFIG)


def test_kv_mean_pool_with_parent_heads_is_exact_and_pools_groups(parent: torch.nn.Module) -> None:
    block = parent.layers[0].attention
    h = torch.randn(2, 7, CONFIG.hidden_size)
    cos, sin = parent.rope(parent.default_positions(torch.zeros(2, 7, dtype=torch.long)), h.dtype)
    same = init_attention(block, AttentionConfig.gqa(2), CONFIG, None, 1e-3, "mean")
    assert torch.equal(same(h, cos, sin), block(h, cos, sin))
    one = init_attention(block, AttentionConfig.gqa(1), CONFIG, None, 1e-3, "mean")
    k = block.op.k_proj.weight.view(2, CONFIG.head_dim, -1)
    assert torch.allclose(one.op.k_proj.weight, (k[0] + k[1]) / 2)


def test_coupled_mode(tmp_path: Path, parent: torch.nn.Module) -> None:
    cfg = lib_cfg(mode="coupled", pairs=["gqa1+swiglu64", "no_op+linear"], layers=[1])
    build_library(tmp_path / "library", parent, tokens(64, 0), tokens(8, 1), cfg)
    lib = Library.open(tmp_path / "library")
    assert lib.mode == "coupled" and lib.layers == [1]
    names = {e.variant for e in lib.entries}
    assert names == {"gqa2+swiglu128", "gqa1+swiglu64", "no_op+linear"}
    for e in lib.entries:
        if e.metrics["tokens"]:
            assert e.metrics["val_nmse_after"] < e.metrics["val_nmse_init"]
    assert set(lib.candidates(1)) == {BlockConfig(e.attention, e.ffn) for e in lib.entries}
    att, ffn = lib.block(1, BlockConfig(AttentionConfig.gqa(1), FFNConfig.swiglu(64)), CONFIG)
    assert att.op.num_kv_heads == 1 and ffn.op.down_proj.weight.shape == (CONFIG.hidden_size, 64)


def test_resume_trains_only_missing_entries(tmp_path: Path, parent: torch.nn.Module,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from puzzle.stages import library

    cfg = lib_cfg(layers=[0], ffn_fractions=[1.0, 0.5])
    cfg.tokens_per_variant = 4 * 8 * 32
    out = tmp_path / "library"
    build_library(out, parent, tokens(64, 0), tokens(8, 1), cfg)
    sidecars = sorted(out.glob("layer000/*.json"))
    before = {p.name: p.stat().st_mtime_ns for p in sidecars}
    # simulate a kill: one entry and the index/stamp are gone
    (out / "layer000" / "ffn-swiglu64.json").unlink()
    (out / ".stage.json").unlink()
    seen: list[str] = []
    real = library.train_wave

    def spy(parent, items, *args, **kwargs):
        seen.extend(it.name for it in items)
        return real(parent, items, *args, **kwargs)

    monkeypatch.setattr(library, "train_wave", spy)
    build_library(out, parent, tokens(64, 0), tokens(8, 1), cfg)
    assert seen == ["layer0/ffn-swiglu64"]
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("layer000/*.json")}
    assert after.keys() == before.keys()
    assert all(after[n] == before[n] for n in before if n != "ffn-swiglu64.json")
    seen.clear()
    build_library(out, parent, tokens(64, 0), tokens(8, 1), cfg)  # current: nothing at all
    assert seen == []
    assert not list(out.rglob("*.tmp"))


@pytest.mark.parametrize("stage", ["library", "refine"])
def test_nan_stops_only_that_item(tmp_path: Path, parent: torch.nn.Module, monkeypatch: pytest.MonkeyPatch,
                                  stage: str) -> None:
    monkeypatch.setattr(lib_init, "ridge_fit", lambda xtx, xty, ridge: torch.full_like(xty.T, float("nan")))
    cfg = lib_cfg(layers=[0], ffn_fractions=[1.0, 0.5], attention_linear=False)
    cfg.tokens_per_variant = 4 * 8 * 32
    with pytest.raises(PuzzleError, match=f"layer0/ffn-linear.*lower {stage}.lr .*`puzzle {stage}`"):
        build_library(tmp_path / "library", parent, tokens(64, 0), tokens(8, 1), cfg, stage=stage)
    kept = {p.stem for p in (tmp_path / "library" / "layer000").glob("*.json")}
    assert kept == {"attention-gqa2", "attention-gqa1", "attention-no_op", "ffn-swiglu128", "ffn-swiglu64",
                    "ffn-no_op"}
    assert not (tmp_path / "library" / "library.json").exists()


@pytest.mark.parametrize("space, match", [
    ({"attention_kv_heads": [3]}, "do not fit the parent"),
    ({"attention_kv_heads": [4]}, "do not fit the parent"),
    ({"ffn_fractions": [1.5]}, "larger than the parent"),
    ({"ffn_fractions": [0.0]}, "outside"),
    ({"round_to": 0}, "round_to"),
    ({"mode": "coupled", "pairs": ["gqa1+swiglu256"]}, "larger than the parent"),
    ({"mode": "coupled", "pairs": ["gqa1"]}, "must look like"),
    ({"pairs": ["gqa1+linear"]}, "mode=coupled"),
    ({"layers": [7]}, "must name layers"),
])
def test_bad_search_spaces(space: dict, match: str) -> None:
    with pytest.raises(PuzzleError, match=match):
        layer_spaces(SearchSpaceConfig(**space), CONFIG)


def test_defaults_resemble_the_paper() -> None:
    from puzzle.model.presets import llama31_8b_config

    s = layer_spaces(SearchSpaceConfig(round_to=256), llama31_8b_config())[0]
    assert [a.name for a in s.attention] == ["gqa8", "gqa4", "gqa2", "gqa1", "linear", "no_op"]
    sizes = [f.intermediate_size for f in s.ffn if f.kind == "swiglu"]
    assert sizes[0] == 14336 and len(sizes) == 8 and all(n % 256 == 0 for n in sizes)
    assert [f.kind for f in s.ffn][-2:] == ["linear", "no_op"]


def test_cli_runs_the_stage(tmp_path: Path, parent: torch.nn.Module) -> None:
    import json

    from puzzle.cli import main
    from puzzle.formats import save_model

    run = tmp_path / "run"
    save_model(parent, run / "parent")
    data = run / "data"
    data.mkdir(parents=True)
    for split, arr in (("train", tokens(32, 0)), ("valid", tokens(8, 1))):
        arr.tofile(data / f"{split}.bin")
    (data / "manifest.json").write_text(json.dumps({"seq_len": 32, "dtype": "uint16", "splits": {
        "train": {"sequences": 32}, "valid": {"sequences": 8}}}))
    args = ["library", str(run), "tokens_per_variant=512", "progress=false", "search_space.layers=[0]",
            "search_space.ffn_fractions=[1.0,0.5]"]
    assert main(args) == 0
    assert len(Library.open(run / "library").entries) == 4 + 4
    assert main(["library", str(run), "search_space.attention_kv_heads=[3]"]) == 2


@pytest.mark.parametrize("heads, kv, expected", [(9, 3, [3, 1]), (20, 5, [5, 4, 2, 1]), (12, 3, [3, 2, 1])])
def test_default_kv_heads_are_every_divisor_of_the_query_heads_up_to_the_parents(heads: int, kv: int,
                                                                                  expected: list[int]) -> None:
    cfg = tiny_llama_config(num_layers=1, hidden_size=8 * heads, num_heads=heads, num_kv_heads=kv)
    space = layer_spaces(SearchSpaceConfig(round_to=16), cfg)[0]
    assert [a.num_kv_heads for a in space.attention if a.kind == "gqa"] == expected


def test_kv_mixing_weights_follow_the_query_heads() -> None:
    from puzzle.stages.library.init import kv_head_mixing

    # 20 query heads: parent heads serve 4 each, the 2 child heads 10 each -> child 0 = 0.4 p0 + 0.4 p1 + 0.2 p2.
    mix = kv_head_mixing(20, 5, 2)
    assert torch.allclose(mix[0], torch.tensor([0.4, 0.4, 0.2, 0.0, 0.0]))
    assert torch.allclose(mix[1], torch.tensor([0.0, 0.0, 0.2, 0.4, 0.4]))
    assert torch.equal(kv_head_mixing(8, 4, 2), torch.tensor([[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]]))


@pytest.mark.parametrize("heads, kv, child", [(20, 5, 2), (20, 5, 4), (9, 3, 1)])
def test_kv_init_for_counts_that_do_not_divide_the_parents(heads: int, kv: int, child: int) -> None:
    cfg = tiny_llama_config(num_layers=1, hidden_size=8 * heads, num_heads=heads, num_kv_heads=kv)
    model = build_model(cfg, seed=0)
    block = model.layers[0].attention
    with torch.no_grad():  # identical parent KV heads: any mean of them is the same head, so the output is exact
        for proj in (block.op.k_proj, block.op.v_proj):
            w = proj.weight.view(kv, cfg.head_dim, -1)
            w.copy_(w[:1].expand_as(w))
    h = torch.randn(2, 5, cfg.hidden_size)
    cos, sin = model.rope(model.default_positions(torch.zeros(2, 5, dtype=torch.long)), h.dtype)
    fewer = init_attention(block, AttentionConfig.gqa(child), cfg, None, 1e-3, "mean")
    assert fewer.op.num_kv_heads == child
    assert torch.allclose(fewer(h, cos, sin), block(h, cos, sin), atol=1e-5)


@pytest.mark.parametrize(("kv_init", "init_name"), [("pca", "kv_pca"), ("mean", "kv_mean_pool")])
def test_library_trains_gqa2_from_a_five_kv_head_parent(tmp_path: Path, kv_init: str, init_name: str) -> None:
    cfg = tiny_llama_config(num_layers=1, hidden_size=80, num_heads=20, num_kv_heads=5, vocab_size=256)
    model = build_model(cfg, seed=0)
    lib = LibraryConfig(search_space=SearchSpaceConfig(round_to=16, attention_kv_heads=[2], attention_linear=False,
                                                       attention_no_op=False, ffn_fractions=[1.0], ffn_linear=False,
                                                       ffn_no_op=False),
                        tokens_per_variant=4 * 8 * 32, lr=3e-4, init_batches=1, progress=False, kv_init=kv_init)
    build_library(tmp_path / "library", model, tokens(32, 0), tokens(8, 1), lib)
    entry = Library.open(tmp_path / "library").entry(0, "attention", "gqa2")
    assert entry.metrics["tokens"] > 0 and entry.metrics["init"] == init_name
    assert math.isfinite(entry.metrics["val_nmse_after"])


def test_parent_items_reuse_the_parents_modules(parent: torch.nn.Module) -> None:
    """The parent's own sub-blocks are not copied into a wave (an fp32 copy is 0.9 GB per Llama-8B layer)."""
    from puzzle.stages.library import LibraryEntry
    from puzzle.stages.library.train import build_candidate

    own = CONFIG.blocks[1]
    att = build_candidate(parent, LibraryEntry(1, "attention", own.attention, None, None), {}, 1e-3, "mean")
    ffn = build_candidate(parent, LibraryEntry(1, "ffn", None, own.ffn, None), {}, 1e-3, "mean")
    assert att.attention is parent.layers[1].attention and att.ffn is None
    assert ffn.ffn is parent.layers[1].ffn and ffn.attention is None
    saved = ffn.weights(torch.float32)  # the entry's keys are sub-block-relative, as for trained variants
    assert set(saved) == set(parent.layers[1].ffn.state_dict())
    other = build_candidate(parent, LibraryEntry(1, "attention", AttentionConfig.gqa(1), None, None), {}, 1e-3, "mean")
    assert other.attention is not parent.layers[1].attention  # a variant to train: its own fp32 copy


def test_kv_init_has_no_default_below_the_config() -> None:
    """Only `LibraryConfig.kv_init` has a default: a caller that leaves it out gets an error, not another init."""
    import inspect

    from puzzle.stages.library import LibraryConfig
    from puzzle.stages.library.train import build_candidate, calibrate

    for fn in (init_attention, calibrate, build_candidate):
        assert inspect.signature(fn).parameters["kv_init"].default is inspect.Parameter.empty, fn.__name__
    assert LibraryConfig().kv_init == "pca"


def test_provider_reads_each_sub_block_once_per_layer(decoupled: Library, parent: torch.nn.Module,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Scoring asks for every attention x FFN pair of a layer: each sub-block file is read once per layer, the
    pairs share the module, and the next layer reads its own."""
    from puzzle.stages.library import store
    from puzzle.stages.library.provider import library_provider

    reads: list[str] = []
    real = store.load_tensors
    monkeypatch.setattr(store, "load_tensors", lambda path: reads.append(Path(path).name) or real(path))
    provide = library_provider(decoupled, parent)
    pairs = decoupled.candidates(0)
    got = {block.name: provide(0, block) for block in pairs}
    files = {e.file for e in decoupled.entries_for(0) if e.file is not None}
    assert sorted(reads) == sorted(Path(f).name for f in files)  # every weight file of layer 0, once
    by_ffn: dict[str, set[int]] = {}
    for block in pairs:
        if got[block.name][1] is not None:
            by_ffn.setdefault(block.ffn.name, set()).add(id(got[block.name][1]))
    assert by_ffn and all(len(ids) == 1 for ids in by_ffn.values())
    reads.clear()
    provide(1, BlockConfig(AttentionConfig.gqa(1), FFNConfig.swiglu(48)))
    assert len(reads) == 2  # a new layer reads its own files


def test_loaded_sub_blocks_hold_the_stored_tensors_not_a_random_init(decoupled: Library) -> None:
    ffn = decoupled.ffn_block(0, FFNConfig.swiglu(48), CONFIG)
    stored = store_tensors(decoupled, 0, "ffn", "swiglu48")
    for name, param in ffn.state_dict().items():
        assert param.device.type == "cpu" and torch.equal(param, stored[name]), name


def store_tensors(library: Library, layer: int, kind: str, variant: str) -> dict[str, torch.Tensor]:
    from puzzle.core.artifacts import load_tensors

    entry = next(e for e in library.entries_for(layer) if e.kind == kind and e.variant == variant)
    return load_tensors(library.dir / entry.file)
