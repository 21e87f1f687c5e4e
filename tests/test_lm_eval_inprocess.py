"""lm-evaluation-harness in-process: `puzzle eval --lm-eval TASK` hands the model object to lm-eval's HFLM and
runs a local task YAML offline; lm-eval's log-likelihoods and greedy generations are this package's own.
Runs only where lm-eval is installed (`pip install puzzle-llm[lm-eval]`); the missing-extra error always runs."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from gkd_helpers import make_run_dir, one_torch_thread  # noqa: F401  (autouse fixture)
from puzzle.core.errors import PuzzleError
from puzzle.stages.evaluate.lm_harness import LmEvalConfig, as_task_metrics, offline, run_lm_eval, summarize
from puzzle.stages.evaluate.stage import add_retention
from puzzle.stages.evaluate.tables import task_table
from puzzle.stages.evaluate.tasks import TaskSpec, primary_metric
from puzzle.stages.report.summary import metric_label

CPU = torch.device("cpu")
CONTEXTS = ["The cat sat on the", "Once upon a time there was", "The dog ran to the", "A bird sang in the"]
CHOICES = ["mat", "tree", "sun"]  # lm-eval puts its target_delimiter, one space, before each

MC_YAML = """task: my_mc
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: gold
metric_list: [{{metric: acc}}, {{metric: acc_norm}}]
"""
GEN_YAML = """task: my_gen
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{greedy}}}}"
generation_kwargs: {{until: ["<never>"], max_gen_toks: 3, do_sample: false}}
metric_list: [{{metric: exact_match}}]
"""


def test_missing_lm_eval_is_one_line_with_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(PuzzleError, match=r"pip install 'puzzle-llm\[lm-eval\]'"):
        run_lm_eval(torch.nn.Module(), None, LmEvalConfig(tasks=["x"]))  # type: ignore[arg-type]


def test_offline_sets_and_restores_the_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with offline():
        assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert "HF_HUB_OFFLINE" not in os.environ


def test_lm_eval_rows_report_acc_norm_like_the_tasks_of_their_own() -> None:
    """lm-eval multiple-choice rows carry metric/score (acc_norm), so retention reads the same number for them as
    for a task file; a row without acc_norm (exact_match, acc only) reports accuracy. Needs no lm-eval."""
    def lm_rows(acc: float, acc_norm: float) -> dict[str, Any]:
        summary = summarize({"results": {"mc": {"alias": "mc", "acc,none": acc, "acc_stderr,none": 0.1,
                                                "acc_norm,none": acc_norm}, "gen": {"exact_match,none": acc}},
                             "n-samples": {"mc": {"original": 8, "effective": 4}}})
        return as_task_metrics(summary)

    parent, child = lm_rows(0.5, 0.40), lm_rows(0.5, 0.20)
    assert parent["lm-eval:mc"] == {"accuracy": 0.5, "acc_norm": 0.40, "n": 4, "metric": "acc_norm", "score": 0.40}
    assert parent["lm-eval:gen"]["metric"] == "accuracy" and parent["lm-eval:gen"]["score"] == 0.5
    own = {"accuracy": 0.5, "acc_norm": 0.40, "n": 4}
    assert parent["lm-eval:mc"]["metric"] == primary_metric(TaskSpec("own.jsonl"), own)
    results = {"parent": {"tasks": parent}, "child": {"tasks": child}}
    add_retention(results)
    assert results["child"]["retention_pct"]["lm-eval:mc"] == pytest.approx(50.0)  # acc_norm, not accuracy's 100%
    assert results["child"]["retention_pct"]["lm-eval:gen"] == pytest.approx(100.0)
    assert metric_label(results, "lm-eval:mc") == "acc_norm"
    assert "50.0/40.0" in task_table(results)


def test_lm_eval_scores_our_model_object_offline(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Golds are this package's own picks (log-likelihood argmax, greedy continuation): lm-eval on the same model
    object must score 100% on both; a different model, tokenisation or a shifted logit would not."""
    pytest.importorskip("lm_eval")
    from transformers import AutoTokenizer

    from puzzle.cli import main
    from puzzle.formats import load_model
    from puzzle.stages.evaluate.tasks import score_requests, split_request

    run, _ = make_run_dir(tmp_path)
    model_dir = tmp_path / "model"
    shutil.copytree(run / "parent", model_dir)
    model, hf_tok = load_model(model_dir).eval(), AutoTokenizer.from_pretrained(str(model_dir))
    encode = lambda s: hf_tok.encode(s, add_special_tokens=False)
    docs = []
    for context in CONTEXTS:
        reqs = [split_request(encode, context, " " + c, None) for c in CHOICES]
        lls = [ll for ll, _ in score_requests(lambda ids: model(ids).logits, reqs, CPU, 8, 512)]
        ids = torch.tensor([encode(context)])
        with torch.no_grad():
            for _ in range(3):
                ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        docs.append({"context": context, "choices": CHOICES, "gold": lls.index(max(lls)),
                     "greedy": hf_tok.decode(ids[0, -3:].tolist())})
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    yamls = tmp_path / "lm_tasks"
    yamls.mkdir()
    (yamls / "my_mc.yaml").write_text(MC_YAML.format(data=data))
    (yamls / "my_gen.yaml").write_text(GEN_YAML.format(data=data))

    out = tmp_path / "out"
    out.mkdir()
    assert main(["eval", str(out), "--lm-eval", "my_mc,my_gen", "--lm-eval-include", str(yamls),
                 f"parent={model_dir}", "throughput=false"]) == 0
    parent = json.loads((out / "eval" / "eval.json").read_text())["models"]["parent"]
    assert parent["lm_eval"]["my_mc"]["acc"] == 1.0 and parent["lm_eval"]["my_mc"]["n"] == len(CONTEXTS)
    assert parent["lm_eval"]["my_gen"]["exact_match"] == 1.0
    assert parent["tasks"]["lm-eval:my_mc"]["accuracy"] == 1.0  # in the task table and retention
    assert parent["tasks"]["lm-eval:my_mc"]["metric"] == "acc_norm"  # as for a multiple-choice task file
    assert "lm-eval:my_mc" in capsys.readouterr().out
