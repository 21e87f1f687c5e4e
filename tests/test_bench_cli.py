"""`puzzle bench` command line: a run's own workload shapes with --costs RUN, --repeats >= 1, a readable table."""

from __future__ import annotations

import pytest
import torch

import puzzle.runtime.bench
from puzzle.cli import main
from puzzle.core.artifacts import write_json
from puzzle.core.workloads import Workload
from puzzle.costs.stage import CostsConfig, costs_for_workload
from puzzle.formats import export_hf
from puzzle.model.decoder import build_model
from puzzle.model.presets import tiny_llama_config
from puzzle.runtime.bench import bench, format_table

PARENT = tiny_llama_config(num_layers=2)
TINY = Workload("tiny", 2, 8, 6)


def test_costs_run_gives_the_runs_own_workload_shapes(tmp_path, monkeypatch):
    model = export_hf(build_model(PARENT, seed=0), tmp_path / "parent", format="llama")
    run = tmp_path / "run"
    write_json(run / "config.json", {"workloads": [TINY.to_dict()]})
    write_json(run / "costs" / "estimate-tiny.json", costs_for_workload(PARENT, list(PARENT.blocks), TINY,
                                                                        CostsConfig(mode="estimate")))
    seen = []
    report = {"device": "cpu", "torch": torch.__version__, "reference": "parent", "bandwidth_bytes_per_s": None,
              "datasheet": None, "results": [], "warnings": []}
    monkeypatch.setattr(puzzle.runtime.bench, "bench", lambda models, workloads, **k: seen.append(workloads) or report)
    assert main(["bench", str(model), "--costs", str(run)]) == 0  # default: the run's workloads
    assert main(["bench", str(model), "--costs", str(run), "--workload", "tiny"]) == 0
    assert seen == [[TINY], [TINY]]


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_repeats_must_be_a_positive_integer(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as e:
        main(["bench", str(tmp_path), "--repeats", value])
    assert e.value.code == 2
    assert "--repeats" in capsys.readouterr().err


def test_table_without_hf_has_no_nan_and_says_cpu_timings_vary():
    report = bench({"parent": build_model(PARENT, seed=0).eval()}, [TINY], repeats=1, measure_bw=False)
    table = format_table(report)
    assert "nan" not in table
    assert "CPU timings vary" in table


def test_workload_help_lists_the_built_in_names(capsys):
    from puzzle.core.workloads import DEFAULT_WORKLOADS

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert all(w.name in out for w in DEFAULT_WORKLOADS)


class _BrokenGenerate:
    """A transformers model whose generate fails inside transformers (e.g. a compile error on CPU)."""

    def __init__(self, inner):
        self.inner = inner

    def parameters(self):
        return self.inner.parameters()

    def generate(self, ids, **kwargs):
        raise RuntimeError("inductor: C++ compile failed\ntraceback lines")


def test_a_failing_hf_baseline_is_a_warning_not_a_traceback():
    from puzzle.runtime.bench import hf_llama_like

    hf = {"parent": _BrokenGenerate(hf_llama_like(PARENT, torch.device("cpu"), torch.float32))}
    report = bench({"parent": build_model(PARENT, seed=0).eval()}, [TINY], repeats=1, hf_models=hf, measure_bw=False)
    (result,) = report["results"]
    assert "hf_generate" not in result and result["output_tokens_per_s"] > 0
    (warning,) = report["warnings"]
    assert "HF baseline failed (RuntimeError: inductor: C++ compile failed)" in warning
    assert f"warning: {warning}" in format_table(report).splitlines()
