from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gkd_helpers import ByteTokenizer, make_run_dir, one_torch_thread  # noqa: F401  (autouse fixture)
from puzzle.core.config import from_dict
from puzzle.core.errors import PuzzleError
from puzzle.model.blocks import AttentionConfig, BlockConfig
from puzzle.model.decoder import build_model
from puzzle.model.presets import tiny_llama_config
from puzzle.stages.evaluate.long_context import (
    LongContextConfig,
    haystack_tokens,
    make_items,
    resolve_lengths,
)
from puzzle.stages.evaluate.long_context_eval import (
    add_long_context_retention,
    evaluate_long_context,
    long_context_table,
    model_tail_logits,
)
from puzzle.stages.evaluate.stage import EvalConfig, run_eval

CPU = torch.device("cpu")
TOK = ByteTokenizer()
TEXT = ("The river ran past the old mill where the miller kept his grain. Children played near the water while "
        "their parents talked about the harvest, the weather and the price of bread in town. ") * 30
NEEDLES = ["niah_single", "niah_multikey"]


def items(lengths: list[int], tasks: list[str] | None = None, n: int = 4, seed: int = 0):
    cfg = LongContextConfig(lengths=lengths, items=n, seed=seed, tasks=tasks or NEEDLES)
    hay = haystack_tokens(np.array([TOK.encode(TEXT)]), {TOK.bos_id})
    return make_items(cfg, resolve_lengths(cfg, 4096), TOK.encode, TOK.bos_id, hay, TOK.decode)


def copy_oracle(vocab: int):
    """An induction head by hand: each position predicts the token that followed the longest earlier match of the
    text ending there (latest on ties). It solves a needle task exactly when the answer is copied from context."""
    def fn(ids: torch.Tensor, k: int) -> torch.Tensor:
        out = torch.zeros(ids.shape[0], k, vocab)  # [B, k, V]
        for b, seq in enumerate(ids.numpy()):
            for q, p in enumerate(range(len(seq) - k, len(seq))):
                js = np.nonzero(seq[:p] == seq[p])[0]
                if len(js) == 0:
                    continue
                match, alive = np.ones(len(js), dtype=int), np.ones(len(js), dtype=bool)
                for d in range(1, 64):
                    alive &= js - d >= 0
                    alive[alive] &= seq[js[alive] - d] == seq[p - d]
                    match += alive
                best = js[len(js) - 1 - int(np.argmax(match[::-1]))]
                out[b, q, seq[best + 1]] = 10.0
        return out
    return fn


def test_items_are_deterministic_by_seed_and_exactly_the_requested_length() -> None:
    tasks = ["niah_single", "niah_multikey", "variable_tracking", "frequent_words"]
    a, b, c = items([1024, 2048], tasks), items([1024, 2048], tasks), items([1024, 2048], tasks, seed=1)
    assert a == b and a != c
    for task in tasks:
        for length, group in a[task].items():
            assert len(group) == 4 and all(len(it.context) + len(it.answer) == length for it in group)
            assert group[0].context[0] == TOK.bos_id
    vt = TOK.decode(a["variable_tracking"][1024][0].context)
    names = TOK.decode(a["variable_tracking"][1024][0].answer).split()
    assert len(names) == 5 and all(f"VAR {n} =" in vt for n in names)
    fw = a["frequent_words"][1024][0]
    listing = TOK.decode(fw.context).split("List: ")[1].split("\n")[0].split()
    top = TOK.decode(fw.answer).strip()
    assert all(listing.count(top) > listing.count(w) for w in set(listing) - {top})  # one clear answer
    # another task set leaves the other tasks' items unchanged
    assert items([1024], ["niah_single"])["niah_single"][1024] == a["niah_single"][1024]


def test_copying_model_solves_needles_at_every_length_and_no_attention_model_fails() -> None:
    lengths = [1024, 2048]
    its = items(lengths)
    res = evaluate_long_context(its, copy_oracle(ByteTokenizer.vocab_size), CPU, max_batch_tokens=4096)
    assert res["accuracy"] == {t: {"1024": 1.0, "2048": 1.0} for t in NEEDLES}
    assert res["mean_accuracy"] == res["mean_token_accuracy"] == {"1024": 1.0, "2048": 1.0}
    # A real decoder with every attention block removed cannot see the needle.
    cfg = tiny_llama_config(num_layers=2, hidden_size=32, vocab_size=ByteTokenizer.vocab_size,
                            max_position_embeddings=2048)
    cfg = cfg.with_blocks([BlockConfig(AttentionConfig.no_op(), b.ffn) for b in cfg.blocks])
    model = build_model(cfg, seed=0).eval()
    no_attn = evaluate_long_context(its, model_tail_logits(model), CPU, max_batch_tokens=8192)
    assert no_attn["mean_accuracy"] == {"1024": 0.0, "2048": 0.0}
    models = {"parent": {"long_context": res}, "noattn": {"long_context": no_attn}}
    add_long_context_retention(models, "parent")
    assert no_attn["retention_pct"] == {"1024": 0.0, "2048": 0.0} and res["retention_pct"]["2048"] == 100.0
    table = long_context_table(models)
    assert "noattn" in table and "100.0 / 100.0 (100)" in table and " (0)" in table


def test_model_tail_logits_match_the_full_forward() -> None:
    model = build_model(tiny_llama_config(vocab_size=ByteTokenizer.vocab_size), seed=0).eval()
    ids = torch.randint(0, 258, (2, 40))
    with torch.no_grad():
        assert torch.allclose(model_tail_logits(model)(ids, 3), model(ids).logits[:, -3:], atol=1e-5)


def test_bad_config_is_one_line() -> None:
    with pytest.raises(PuzzleError, match="unknown task 'needle'.*known tasks"):
        from_dict(EvalConfig, {"long_context": {"tasks": ["needle"]}})
    with pytest.raises(PuzzleError, match="4096 is above the parent's context \\(1024 tokens"):
        resolve_lengths(LongContextConfig(lengths=[1024, 4096]), 1024)
    with pytest.raises(PuzzleError, match="length 128 is too short for niah_single"):
        items([128], ["niah_single"])
    assert resolve_lengths(LongContextConfig(), 8192) == [1024, 2048, 4096, 8192]
    assert resolve_lengths(LongContextConfig(), 256) == [256]


def test_haystack_split_defaults_to_test_for_eval_and_valid_for_score() -> None:
    assert LongContextConfig().haystack_split("eval") == "test"
    assert LongContextConfig().haystack_split("score") == "valid"  # scoring never reads the test split
    assert LongContextConfig(split="train").haystack_split("eval") == "train"
    assert LongContextConfig(split="train").haystack_split("score") == "train"


def test_run_eval_reports_long_context_per_model(tmp_path: Path) -> None:
    run, _ = make_run_dir(tmp_path)
    # default lengths: the tiny parent's whole context (256 tokens, below the usual 1k start)
    cfg = from_dict(EvalConfig, {"long_context": {"items": 2, "tasks": ["frequent_words"]}, "throughput": False})
    result = run_eval(run, cfg)
    on_disk = json.loads((run / "eval" / "eval.json").read_text())
    assert on_disk["long_context"]["lengths"] == [256] and on_disk["long_context"]["tasks"] == ["frequent_words"]
    assert on_disk["long_context"]["haystack_split"] == "test"
    for name in ("parent", "noattn12"):
        lc = on_disk["models"][name]["long_context"]
        assert set(lc["accuracy"]["frequent_words"]) == {"256"} and lc["answer_nll"]["frequent_words"]["256"] > 0
    assert result["models"]["parent"]["long_context"] == on_disk["models"]["parent"]["long_context"]
    assert on_disk["models"]["noattn12"]["long_context"]["retention_pct"].keys() == {"256"}
    if on_disk["long_context"]["plot"]:
        assert (run / "eval" / on_disk["long_context"]["plot"]).is_file()


def test_score_long_context_metric_is_the_greedy_match_of_the_modified_model_and_search_reads_it() -> None:
    import copy

    from puzzle.model.blocks import FFNConfig
    from puzzle.stages.scoring.batches import lm_batches, task_batches
    from puzzle.stages.scoring.score import score_model
    from puzzle.stages.scoring.stage import long_context_task_items
    from puzzle.stages.search.solve import objective_from_scores

    cfg = tiny_llama_config(num_layers=2, hidden_size=32, vocab_size=ByteTokenizer.vocab_size,
                            max_position_embeddings=1024)
    parent = build_model(cfg, seed=0).eval()
    parent.init_weights(std=0.15, generator=torch.Generator().manual_seed(0))  # peaked, input-dependent predictions
    lc = LongContextConfig(lengths=[512], items=4, tasks=["niah_single"])
    items = long_context_task_items(lc, np.array([TOK.encode(TEXT)]), TOK, 1024)
    assert len(items) == 4 and all(it.metric == "long_context" and len(it.choices) == 1 for it in items)
    with torch.no_grad():  # items 0 and 1 ask for the parent's own greedy continuation: solved by construction
        for it in items[:2]:
            seq = list(it.context)
            for _ in range(len(it.choices[0])):
                seq.append(int(parent(torch.tensor([seq])).logits[0, -1].argmax()))
            it.choices[0] = seq[len(it.context):]
    dropped = BlockConfig(AttentionConfig.no_op(), FFNConfig.no_op())

    def provider(layer: int, block: BlockConfig):
        return (None, None) if block == dropped else (copy.deepcopy(parent.layers[layer].attention),
                                                      copy.deepcopy(parent.layers[layer].ffn))

    batches = lm_batches(torch.randint(0, 258, (2, 16)), 2) + task_batches(items, 3, max_len=1024)
    result = score_model(parent, {0: [cfg.blocks[0], dropped]}, provider, batches, items)
    assert result.parent["long_context"] == 0.5 and result.parent["task_accuracy"] is None
    same, no_op = result.layers[0]
    assert same["long_context"] == 0.5
    child = copy.deepcopy(parent)
    child.set_layer(0, None, None)
    fn = model_tail_logits(child)
    with torch.no_grad():
        expect = np.mean([bool((fn(torch.tensor([it.context + it.choices[0][:-1]]), len(it.choices[0]))[0].argmax(-1)
                                == torch.tensor(it.choices[0])).all()) for it in items])
    assert no_op["long_context"] == pytest.approx(expect)
    scores = {"layers": [{"layer": 0, "candidates": [{"block": b.to_dict(), **r} for b, r in
                                                     zip((cfg.blocks[0], dropped), result.layers[0])]}]}
    _, objective = objective_from_scores(scores, "long_context")
    assert objective[0].tolist() == [-0.5, -no_op["long_context"]]  # higher is better: minimised negated


def test_run_score_writes_the_long_context_metric(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from puzzle.formats import save_model
    from puzzle.stages.data import DataConfig, run_data
    from puzzle.stages.scoring import stage as scoring
    from test_realize import _make_run
    from test_scoring import _ByteTokenizer

    _make_run(tmp_path)  # a 256-token parent: re-saved with a 1024-token context, which the byte texts need
    save_model(build_model(tiny_llama_config(num_layers=4, max_position_embeddings=1024), seed=0), tmp_path / "parent")
    monkeypatch.setattr(scoring, "load_tokenizer", lambda path: _ByteTokenizer())
    (tmp_path / "text.txt").write_text("".join(f"line {i} of some text to pack.\n" for i in range(200)))
    run_data(tmp_path, DataConfig(sources=[str(tmp_path / "text.txt")], seq_len=32, valid_fraction=0.3,
                                  test_fraction=0.3, txt_documents="lines"), tokenizer=_ByteTokenizer())
    cfg = from_dict(scoring.ScoreConfig, {"num_sequences": 2, "batch_size": 2, "candidates_per_batch": 16,
                                          "device": "cpu", "long_context": {"items": 2, "tasks": ["niah_single"]}})
    scores = json.loads(scoring.run_score(tmp_path, cfg).read_text())
    assert scores["num_long_context_items"] == 2 and scores["num_task_items"] == 0
    assert "long_context" in scores["metrics"] and scores["parent"]["long_context"] == 0.0  # a random parent
    assert all(r["long_context"] == 0.0 for layer in scores["layers"] for r in layer["candidates"])
    with pytest.raises(PuzzleError, match="score.long_context.lengths: 2048 is above the parent's context"):
        scoring.run_score(tmp_path, from_dict(scoring.ScoreConfig, {"device": "cpu",
                                                                     "long_context": {"lengths": [2048]}}))
