"""Replace-1-block scoring on a tiny random parent with in-memory candidate blocks."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from puzzle.core.errors import PuzzleError
from puzzle.model.blocks import AttentionConfig, BlockConfig, FFNConfig
from puzzle.model.decoder import build_attention_block, build_ffn_block, build_model
from puzzle.model.presets import tiny_llama_config
from puzzle.stages.scoring.batches import EvalBatch, TaskItem, lm_batches, load_task_file, task_batches
from puzzle.stages.scoring.score import score_model

PARENT_BLOCK = BlockConfig(AttentionConfig.gqa(2), FFNConfig.swiglu(128))


def _parent(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(tiny_llama_config(num_layers=4), seed=seed).eval()


def _tokens(n: int = 6, t: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def _random_provider(parent, seed: int = 3):
    """Parent sub-blocks when the variant is the parent's; fresh random (deterministic) blocks otherwise."""
    made: dict = {}

    def provide(layer, block):
        key = (layer, block)
        if key not in made:
            torch.manual_seed(seed + layer)
            own = parent.config.blocks[layer]
            att = copy.deepcopy(parent.layers[layer].attention) if block.attention == own.attention else \
                build_attention_block(parent.config, block.attention)
            ffn = copy.deepcopy(parent.layers[layer].ffn) if block.ffn == own.ffn else \
                build_ffn_block(parent.config, block.ffn)
            made[key] = (att, ffn)
        return made[key]

    return provide


def test_copy_of_parent_block_scores_kl_zero_and_full_agreement():
    parent = _parent()
    cands = {i: [PARENT_BLOCK] for i in range(4)}
    result = score_model(parent, cands, _random_provider(parent), lm_batches(_tokens(), 4))
    for i in range(4):
        row = result.layers[i][0]
        assert row["kl"] == pytest.approx(0.0, abs=1e-6)
        assert row["top1"] == 1.0 and row["top5"] == 1.0
        assert row["lm_loss"] == pytest.approx(result.parent["lm_loss"], abs=1e-5)
        assert row["lm_loss_delta"] == pytest.approx(0.0, abs=1e-5)


def test_no_op_of_important_block_scores_worse_than_no_op_of_tiny_block():
    parent = _parent()
    with torch.no_grad():
        parent.layers[1].ffn.op.down_proj.weight.mul_(1e-4)  # layer 1's FFN barely changes the residual
        parent.layers[2].ffn.op.down_proj.weight.mul_(30.0)  # layer 2's FFN dominates it
    no_ffn = BlockConfig(AttentionConfig.gqa(2), FFNConfig.no_op())
    result = score_model(parent, {1: [no_ffn], 2: [no_ffn]}, _random_provider(parent), lm_batches(_tokens(), 3))
    tiny, important = result.layers[1][0], result.layers[2][0]
    assert important["kl"] > 100 * tiny["kl"]
    assert important["top1"] < tiny["top1"]
    assert tiny["kl"] < 1e-4


def _manual_metrics(parent, modified, tokens):
    """Full forward of parent and modified model -> (kl, top1, top5, lm_loss)."""
    with torch.no_grad():
        lp = torch.log_softmax(parent(tokens).logits, -1)
        lq = torch.log_softmax(modified(tokens).logits, -1)
    kl = F.kl_div(lq, lp, log_target=True, reduction="sum") / tokens.numel()
    top = lp.argmax(-1)
    top1 = (lq.argmax(-1) == top).float().mean()
    top5 = (lq.topk(5, -1).indices == top[..., None]).any(-1).float().mean()
    loss = F.nll_loss(lq[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    return float(kl), float(top1), float(top5), float(loss)


@pytest.mark.parametrize("group", [1, 3])
def test_cached_prefix_path_equals_full_forward_of_modified_model(group):
    parent = _parent()
    provider = _random_provider(parent)
    layer = 1
    blocks = [BlockConfig(AttentionConfig.gqa(1), FFNConfig.swiglu(64)),
              BlockConfig(AttentionConfig.linear(), FFNConfig.linear()),
              BlockConfig(AttentionConfig.no_op(), FFNConfig.swiglu(128))]
    tokens = _tokens(5, 20)
    result = score_model(parent, {layer: blocks}, provider, lm_batches(tokens, 2), candidates_per_batch=group)
    for block, row in zip(blocks, result.layers[layer]):
        modified = copy.deepcopy(parent)
        modified.set_layer(layer, *provider(layer, block))
        kl, top1, top5, loss = _manual_metrics(parent, modified, tokens)
        assert row["name"] == block.name
        assert row["kl"] == pytest.approx(kl, rel=1e-4, abs=1e-7)
        assert row["kl"] > 0
        assert row["top1"] == pytest.approx(top1) and row["top5"] == pytest.approx(top5)
        assert row["lm_loss"] == pytest.approx(loss, rel=1e-5)


def test_on_layer_callback_and_skipped_layers():
    parent = _parent()
    seen = []
    cands = {0: [PARENT_BLOCK], 3: [BlockConfig(AttentionConfig.no_op(), FFNConfig.no_op())]}
    result = score_model(parent, cands, _random_provider(parent), lm_batches(_tokens(), 6),
                         on_layer=lambda i, rows: seen.append((i, len(rows))))
    assert seen == [(0, 1), (3, 1)]
    assert sorted(result.layers) == [0, 3]


def test_task_accuracy_matches_choice_log_likelihoods():
    parent = _parent()
    gen = torch.Generator().manual_seed(5)
    items = [TaskItem(torch.randint(0, 256, (6,), generator=gen).tolist(),
                      [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (2, 3, 1)], g)
             for g in (0, 1, 2, 1)]
    batches = lm_batches(_tokens(2, 8), 2) + task_batches(items, 5, max_len=64)
    result = score_model(parent, {0: [PARENT_BLOCK]}, _random_provider(parent), batches, items)
    correct = 0
    for item in items:
        scores = []
        for choice in item.choices:
            seq = torch.tensor([item.context + choice])
            with torch.no_grad():
                lp = torch.log_softmax(parent(seq).logits, -1)[0]
            n = len(item.context)
            scores.append(sum(float(lp[n - 1 + j, tok]) for j, tok in enumerate(choice)))
        correct += max(range(len(scores)), key=scores.__getitem__) == item.gold
    assert result.parent["task_accuracy"] == pytest.approx(correct / len(items))
    assert result.layers[0][0]["task_accuracy"] == pytest.approx(correct / len(items))


def test_task_file_wrong_format_names_the_line(tmp_path):
    path = tmp_path / "tasks.jsonl"
    good = {"context": "the cat", "choices": [" sat", " flew"], "gold": 0}
    path.write_text(json.dumps(good) + "\n" + json.dumps({"context": "x", "choices": ["a"], "gold": 3}) + "\n")
    encode = lambda s: [ord(c) % 256 for c in s]
    with pytest.raises(PuzzleError, match="tasks.jsonl:2: "):
        load_task_file(path, encode, 1, 10)
    path.write_text(json.dumps(good) + "\nnot json\n")
    with pytest.raises(PuzzleError, match="tasks.jsonl:2: not valid JSON"):
        load_task_file(path, encode, 1, 10)
    path.write_text(json.dumps(good) + "\n")
    (item,) = load_task_file(path, encode, 1, 10)
    assert item.context == [1] + encode("the cat") and item.choices == [encode(" sat"), encode(" flew")]


def test_provider_giving_the_wrong_block_is_an_error():
    parent = _parent()
    wrong = lambda layer, block: (None, None)
    with pytest.raises(PuzzleError, match="library gave"):
        score_model(parent, {0: [PARENT_BLOCK]}, wrong, [EvalBatch(_tokens(2, 8))])


# ---- the stage: run directory in, scores/ out, resumable per layer -----------------------------------------------


class _ByteTokenizer:
    vocab_size, bos_id, eos_id = 256, 1, 2

    def encode(self, text: str) -> list[int]:
        return [3 + b % 253 for b in text.encode()]


def test_run_score_writes_scores_and_resumes_per_layer(tmp_path, monkeypatch):
    from puzzle.stages.data import DataConfig, run_data
    from puzzle.stages.library.store import Library
    from puzzle.stages.scoring import score
    from puzzle.stages.scoring import stage as scoring
    from test_realize import _make_run

    _make_run(tmp_path)
    (tmp_path / "text.txt").write_text("".join(f"line {i} of some text to pack.\n" for i in range(400)))
    run_data(tmp_path, DataConfig(sources=[str(tmp_path / "text.txt")], seq_len=32, valid_fraction=0.5,
                                  txt_documents="lines"), tokenizer=_ByteTokenizer())
    cfg = scoring.ScoreConfig(num_sequences=2, batch_size=2, candidates_per_batch=16, device="cpu")
    calls: list[int] = []
    real = score._score_layer
    monkeypatch.setattr(score, "_score_layer", lambda parent, i, *a: calls.append(i) or real(parent, i, *a))
    path = scoring.run_score(tmp_path, cfg)
    scores = json.loads(path.read_text())
    lib = Library.open(tmp_path / "library")
    assert calls == [0, 1, 2, 3]
    assert [len(layer["candidates"]) for layer in scores["layers"]] == [len(lib.candidates(i)) for i in range(4)]
    assert scores["num_sequences"] == 2 and scores["parent"]["kl"] == 0.0
    no_op = next(r for r in scores["layers"][1]["candidates"] if r["name"] == "no_op+no_op")
    assert no_op["kl"] > 0 and 0 <= no_op["top1"] <= 1
    csv_lines = (tmp_path / "scores" / "scores.csv").read_text().splitlines()
    assert csv_lines[1].startswith("parent,parent,") and len(csv_lines) == 2 + 4 * 16
    # Killed after layer 2: the finished per-layer files are kept, only layer 3 is scored again.
    (tmp_path / "scores" / "layers" / "layer_0003.json").unlink()
    (tmp_path / "scores" / ".stage.json").unlink()
    calls.clear()
    again = json.loads(scoring.run_score(tmp_path, cfg).read_text())
    assert calls == [3]
    assert again["layers"] == scores["layers"]
    calls.clear()
    scoring.run_score(tmp_path, cfg)  # current: nothing to do
    assert calls == []
