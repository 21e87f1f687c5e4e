"""Bad model configs: one line naming the layer (for Nemotron-NAS block_configs) or the field, its wrong value and
the fix; exit 2, no traceback. A wrong type is never converted (bool("false") is True, int("128") hides a typo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from puzzle.cli import main

BASE = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2}
GQA = {"n_heads_in_group": 2, "no_op": False, "replace_with_linear": False}
SWIGLU = {"intermediate_size": 64, "no_op": False, "replace_with_linear": False}
GOOD = {"attention": GQA, "ffn": SWIGLU}


def _inspect_fails(tmp_path: Path, config: dict, capsys: pytest.CaptureFixture, *words: str) -> str:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    assert main(["inspect", str(d)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


def _nemotron(layer1: object) -> dict:
    return {**BASE, "architectures": ["DeciLMForCausalLM"], "block_configs": [GOOD, layer1, GOOD]}


NEMOTRON_CASES = {
    "group-does-not-divide": ({"attention": {**GQA, "n_heads_in_group": 3}, "ffn": SWIGLU},
                              ("n_heads_in_group=3", "num_attention_heads=4", "use one of [1, 2, 4]")),
    "group-is-a-bool": ({"attention": {**GQA, "n_heads_in_group": True}, "ffn": SWIGLU},
                        ("attention.n_heads_in_group must be a positive integer", "true (a boolean)")),
    "group-missing": ({"attention": {"no_op": False}, "ffn": SWIGLU}, ("n_heads_in_group is missing",)),
    "no-ffn": ({"attention": GQA}, ("needs an 'ffn' object, got nothing", "intermediate_size")),
    "ffn-is-null": ({"attention": GQA, "ffn": None}, ("needs an 'ffn' object, got null",)),
    "no-op-and-linear": ({"attention": {**GQA, "no_op": True, "replace_with_linear": True}, "ffn": SWIGLU},
                         ("attention has both no_op and replace_with_linear true",)),
    "ffn-no-op-and-linear": ({"attention": GQA, "ffn": {"no_op": True, "replace_with_linear": True}},
                             ("ffn has both no_op and replace_with_linear true",)),
    "ffn-mult-string": ({"attention": GQA, "ffn": {"ffn_mult": "2.0", "no_op": False}},
                        ("ffn.ffn_mult must be a positive number", '"2.0" (a string)')),
    "ffn-mult-negative": ({"attention": GQA, "ffn": {"ffn_mult": -1.0}}, ("ffn.ffn_mult", "-1.0")),
    "size-string": ({"attention": GQA, "ffn": {"intermediate_size": "128"}},
                    ("ffn.intermediate_size must be a positive integer", '"128" (a string)')),
    "size-negative": ({"attention": GQA, "ffn": {"intermediate_size": -64}}, ("ffn.intermediate_size", "-64")),
    "flag-as-number": ({"attention": {**GQA, "no_op": 1}, "ffn": SWIGLU},
                       ("attention.no_op must be true or false, got 1",)),
    "not-an-object": ([1, 2], ("must be an object with 'attention' and 'ffn'",)),
}


@pytest.mark.parametrize("case", list(NEMOTRON_CASES))
def test_bad_nemotron_layer_names_the_layer(tmp_path: Path, capsys: pytest.CaptureFixture, case: str) -> None:
    layer1, words = NEMOTRON_CASES[case]
    _inspect_fails(tmp_path, _nemotron(layer1), capsys, "layer 1 (block_configs[1])", "fix config.json", *words)


HF_CASES = {
    "tie-string": ({"tie_word_embeddings": "false"}, ("'tie_word_embeddings' must be true or false", '"false"')),
    "bias-number": ({"attention_bias": 0}, ("'attention_bias' must be true or false, got 0",)),
    "eps-string": ({"rms_norm_eps": "1e-5"}, ("'rms_norm_eps' must be a positive number", '"1e-5" (a string)')),
    "theta-negative": ({"rope_theta": -10000.0}, ("'rope_theta' must be a positive number",)),
    "head-dim-string": ({"head_dim": "8"}, ("'head_dim' must be a positive integer",)),
    "layers-zero": ({"num_hidden_layers": 0}, ("'num_hidden_layers' must be a positive integer, got 0",)),
    "size-negative": ({"intermediate_size": -64}, ("'intermediate_size' must be a positive integer, got -64",)),
    "bos-string": ({"bos_token_id": "1"}, ("'bos_token_id' must be a token id",)),
    "window-string": ({"architectures": ["MistralForCausalLM"], "sliding_window": "4096"},
                      ("'sliding_window' must be a positive integer",)),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_bad_hf_field_names_the_field(tmp_path: Path, capsys: pytest.CaptureFixture, case: str) -> None:
    fields, words = HF_CASES[case]
    _inspect_fails(tmp_path, {"architectures": ["LlamaForCausalLM"], **BASE, **fields}, capsys, *words)


def test_good_configs_still_load(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    linear = {"attention": {"n_heads_in_group": None, "no_op": False, "replace_with_linear": True},
              "ffn": {"ffn_mult": 2, "no_op": False, "replace_with_linear": False}}
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**_nemotron(linear), "eos_token_id": [2, 3], "pad_token_id": None,
                                               "tie_word_embeddings": None, "rope_theta": 500000}))
    assert main(["inspect", str(d)]) == 0
    assert "linear" in capsys.readouterr().out


def test_bare_config_error_names_the_cli_not_a_python_argument(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"architectures": ["LlamaForCausalLM"], **BASE}))
    assert main(["export", str(config), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "device=" not in err and f"puzzle inspect {config}" in err, err
    assert not (tmp_path / "out").exists()
