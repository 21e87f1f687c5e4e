"""lm-evaluation-harness in-process: `puzzle eval --lm-eval TASK` hands the model object to lm-eval's HFLM and
runs a local task YAML offline; lm-eval's log-likelihoods and greedy generations are this package's own.
Runs only where lm-eval is installed (`pip install puzzle-llm[lm-eval]`); the missing-extra error always runs."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from gkd_helpers import make_run_dir, one_torch_thread  # noqa: F401  (autouse fixture)
from puzzle.core.errors import PuzzleError
from puzzle.stages.evaluate.lm_harness import LmEvalConfig, offline, run_lm_eval

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
    assert "lm-eval:my_mc" in capsys.readouterr().out
