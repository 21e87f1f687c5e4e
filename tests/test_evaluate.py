from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gkd_helpers import (
    ByteTokenizer,
    damaged_child,
    make_run_dir,
    one_torch_thread,  # noqa: F401  (autouse fixture: one intra-op thread)
    tiny_parent,
    token_arrays,
)
from puzzle.core.config import from_dict
from puzzle.core.errors import PuzzleError
from puzzle.stages.evaluate.stage import EvalConfig, evaluate_models, heldout_metrics, run_eval
from puzzle.stages.evaluate.tasks import (
    MultipleChoiceItem,
    TaskSpec,
    evaluate_task,
    load_task,
    read_hellaswag,
    read_lambada,
    score_requests,
    split_request,
)

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tasks"
CPU = torch.device("cpu")


def byte_parent() -> torch.nn.Module:
    return tiny_parent(vocab=ByteTokenizer.vocab_size)


def mc_items() -> list[MultipleChoiceItem]:
    return [
        MultipleChoiceItem("The cat sat on the", ("mat.", "sky tonight", "x"), 0),
        MultipleChoiceItem("One, two,", ("three", "blue", "seven hundred"), 2),
        MultipleChoiceItem("Hello", ("world", "there", "friend", "!"), 1),
    ]


def test_model_against_itself_kl_zero_agreement_one_retention_100() -> None:
    parent = byte_parent()
    twin = copy.deepcopy(parent)
    _, valid = token_arrays(vocab=ByteTokenizer.vocab_size)
    m = heldout_metrics(twin, parent, valid, 4, CPU)
    assert m["kl_to_parent"] == pytest.approx(0.0, abs=1e-7)
    assert m["agreement"] == 1.0
    assert m["perplexity"] == pytest.approx(torch.tensor(m["lm_loss"]).exp().item(), rel=1e-6)
    tasks = {"mc": mc_items()}
    cfg = EvalConfig(batch_size=3, throughput=False)
    res = evaluate_models({"parent": lambda: parent, "twin": lambda: twin, "damaged": lambda: damaged_child(parent)},
                          parent, valid, tasks, ByteTokenizer(), cfg, CPU)
    assert res["twin"]["tasks"] == res["parent"]["tasks"]
    if res["parent"]["tasks"]["mc"]["accuracy"] > 0:
        assert res["twin"]["retention_pct"]["mc"] == pytest.approx(100.0)
        assert res["twin"]["mean_retention_pct"] == pytest.approx(100.0)
    assert res["damaged"]["kl_to_parent"] > 0.01 and res["damaged"]["agreement"] < 1.0
    assert res["damaged"]["params"] < res["parent"]["params"]


@pytest.mark.parametrize("batching", [{"batch_size": 4}, {"batch_size": 4, "max_tokens": 150}])
def test_loglikelihood_matches_unbatched_reference(batching: dict) -> None:
    model = byte_parent().eval()
    tok = ByteTokenizer()
    reqs = [split_request(tok.encode, c, " " + e, tok.bos_id) for it in mc_items() for c, e in
            [(it.context, ch) for ch in it.choices]]
    batched = score_requests(lambda ids: model(ids).logits, reqs, CPU, max_len=200, **batching)
    for (ctx, cont), (ll, greedy) in zip(reqs, batched, strict=True):
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            lp = F.log_softmax(model(ids).logits[0, :-1], -1)[len(ctx) - 1:]  # predicting the continuation
        target = torch.tensor(cont)
        assert ll == pytest.approx(float(lp.gather(-1, target[:, None]).sum()), rel=1e-5)
        assert greedy == bool((lp.argmax(-1) == target).all())


def test_trained_model_scores_above_chance() -> None:
    """A model that memorised the right endings picks them: the scorer is not noise."""
    tok = ByteTokenizer()
    items = mc_items()
    model = byte_parent()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    seqs = [[tok.bos_id] + tok.encode(it.context + " " + it.choices[it.gold]) for it in items]
    for _ in range(60):
        for s in seqs:
            ids = torch.tensor([s])
            loss = F.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
    m = evaluate_task(items, lambda ids: model(ids).logits, tok.encode, tok.bos_id, CPU, 8, 200)
    assert m["accuracy"] == 1.0 and m["n"] == 3


def test_hellaswag_reader_parses_shared_file() -> None:
    path = SHARED / "hellaswag_val.txt.bz2"
    if not path.exists():
        pytest.skip(f"{path} absent (shared data not mounted)")
    items = read_hellaswag(path)
    assert len(items) == 10042
    assert items[0].context.startswith("Roof shingle removal") and items[0].gold == 3
    assert len(items[0].choices) == 4 and items[0].choices[3].startswith("starts pulling up roofing")
    assert {it.gold for it in items} == {0, 1, 2, 3}
    assert len(load_task(TaskSpec(str(path), limit=5))) == 5


def test_lambada_reader_parses_shared_file() -> None:
    path = SHARED / "lambada_test.jsonl"
    if not path.exists():
        pytest.skip(f"{path} absent (shared data not mounted)")
    items = read_lambada(path)
    assert len(items) == 5153
    assert items[0].target == " signs" and items[0].context.endswith("I don't care about")
    assert all(it.target.startswith(" ") and " " not in it.target[1:] for it in items)
    assert type(load_task(TaskSpec(str(path), limit=3))[0]).__name__ == "LastWordItem"


def test_gold_index_out_of_range_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    good = {"context": "a", "choices": ["b", "c"], "gold": 1}
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "gold": 2}) + "\n")
    with pytest.raises(PuzzleError, match=r"mine.jsonl:3: gold index 2 is out of range"):
        load_task(TaskSpec(str(path)))
    hs = tmp_path / "hs.txt"
    hs.write_text("ctx\n1\na\nb\nc\nd\nctx2\n4\na\nb\nc\nd\n")
    with pytest.raises(PuzzleError, match=r"hs.txt:8: gold label '4'"):
        load_task(TaskSpec(str(hs)))
    with pytest.raises(PuzzleError, match="does not exist"):
        load_task(TaskSpec(str(tmp_path / "missing.jsonl")))


def test_run_eval_writes_eval_json(tmp_path: Path) -> None:
    run, _ = make_run_dir(tmp_path)
    task = tmp_path / "mine.jsonl"
    task.write_text("\n".join(json.dumps({"context": "The cat sat on the", "choices": [" mat", " sun", " tree"],
                                          "gold": g}) for g in (0, 1, 2)) + "\n")
    cfg = from_dict(EvalConfig, {"tasks": [{"path": str(task)}], "batch_size": 4})
    result = run_eval(run, cfg)
    on_disk = json.loads((run / "eval" / "eval.json").read_text())
    assert on_disk["models"].keys() == {"parent", "noattn12"}
    parent, child = on_disk["models"]["parent"], on_disk["models"]["noattn12"]
    assert parent["kl_to_parent"] == pytest.approx(0.0, abs=1e-7) and parent["agreement"] == 1.0
    assert child["kl_to_parent"] > 0 and child["tasks"]["mine"]["n"] == 3
    assert "skipped" in parent["throughput"] or "batch1" in parent["throughput"]
    assert result["models"]["parent"]["lm_loss"] == on_disk["models"]["parent"]["lm_loss"]
    # current: a second call does nothing and returns the same result
    mtime = (run / "eval" / "eval.json").stat().st_mtime_ns
    run_eval(run, cfg)
    assert (run / "eval" / "eval.json").stat().st_mtime_ns == mtime


def test_exported_child_works_through_lm_eval_hf_interface(tmp_path: Path) -> None:
    """What lm-eval's `hf` model does: AutoModelForCausalLM + AutoTokenizer (trust_remote_code), then
    loglikelihood of a continuation from one forward pass. It must agree with this package's scorer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from puzzle.formats import load_model
    from puzzle.formats.tokenizers import load_tokenizer

    run, _ = make_run_dir(tmp_path)
    child_dir = run / "children" / "noattn12"
    hf_model = AutoModelForCausalLM.from_pretrained(str(child_dir), trust_remote_code=True).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(child_dir), trust_remote_code=True)
    ours = load_model(child_dir).eval()
    tok = load_tokenizer(run / "parent")
    pairs = [("The cat sat on the", " mat."), ("Once upon a time there was", " a little girl")]
    for context, continuation in pairs:
        # lm-eval HFLM._encode_pair: whole = encode(context + continuation), split at len(encode(context))
        ctx = hf_tok.encode(context, add_special_tokens=False)
        whole = hf_tok.encode(context + continuation, add_special_tokens=False)
        cont = whole[len(ctx):]
        ids = torch.tensor([(ctx + cont)[:-1]])
        with torch.no_grad():
            lp = F.log_softmax(hf_model(ids).logits[0].float(), -1)[len(ctx) - 1:]
        hf_ll = float(lp.gather(-1, torch.tensor(cont)[:, None]).sum())
        req = split_request(tok.encode, context, continuation, None)
        assert req == (ctx, cont), "same tokenisation as lm-eval's"
        (our_ll, _), = score_requests(lambda x: ours(x).logits, [req], CPU, 1, 512)
        assert our_ll == pytest.approx(hf_ll, rel=1e-4, abs=1e-4)


def test_eval_throughput_workloads_come_from_the_run_config_not_cost_files(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Eval times the shapes the run's config defines (top-level `workloads:`); a costs file naming the same
    workload with another shape is not read. An unknown name is a one-line error naming the known ones."""
    from puzzle.stages.evaluate import stage

    run, _ = make_run_dir(tmp_path)
    tg = {"name": "tg", "batch_size": 3, "prompt_len": 8, "gen_len": 4}
    (run / "config.json").write_text(json.dumps({"parent": "p", "workloads": [tg]}))
    (run / "costs").mkdir()
    (run / "costs" / "estimate-tg.json").write_text(json.dumps({"workload": {**tg, "batch_size": 99}}))
    seen: list[dict] = []

    def fake(model, workloads, graphs="auto"):
        seen.extend(w.to_dict() for w in workloads)
        return {"skipped": "test"}

    monkeypatch.setattr(stage, "measure_throughput", fake)
    run_eval(run, EvalConfig(children=["noattn12"], uptrained=False, max_sequences=2, device="cpu",
                             workloads=["tg", "batch1"]))
    assert seen and all(w == tg for w in seen if w["name"] == "tg")
    assert {w["name"] for w in seen} == {"tg", "batch1"}  # built-in shapes stay known
    with pytest.raises(PuzzleError, match=r"unknown workload 'nope'; known: \['tg', ") as e:
        run_eval(run, EvalConfig(max_sequences=2, device="cpu", workloads=["nope"]))
    assert "\n" not in str(e.value)


def test_continuation_longer_than_the_window_is_scored_on_its_tail() -> None:
    model = byte_parent().eval()
    req = ([1, 5, 6], list(range(10, 40)))  # 30 continuation tokens, window of 16
    (ll, _), = score_requests(lambda ids: model(ids).logits, [req], CPU, batch_size=1, max_len=16, max_tokens=64)
    seq = (req[0] + req[1])[-17:]
    with torch.no_grad():
        lp = F.log_softmax(model(torch.tensor([seq[:-1]])).logits[0], -1)  # [16, V]
    assert ll == pytest.approx(float(lp.gather(-1, torch.tensor(seq[1:])[:, None]).sum()), rel=1e-5)
