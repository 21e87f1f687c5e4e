"""What a first run shows: plots in the base install, readable plots, estimates labelled as estimates,
progress for the data and eval stages, and the library's long table in a file."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch

from gkd_helpers import ByteTokenizer, one_torch_thread, tiny_parent, token_arrays  # noqa: F401 (autouse)
from puzzle.core.artifacts import write_json
from puzzle.model.blocks import AttentionConfig, FFNConfig
from puzzle.stages.data import DataConfig, run_data
from puzzle.stages.evaluate.stage import EvalConfig, evaluate_models
from puzzle.stages.library.store import LibraryEntry
from puzzle.stages.library.summary import write_summary
from puzzle.stages.report import plots as report_plots
from puzzle.stages.report.stage import ReportConfig, run_report
from puzzle.stages.report.summary import print_summary

ROOT = Path(__file__).resolve().parents[1]
ROOFLINE = {"peak_flops": 989e12, "mem_bandwidth": 4.8e12}


def test_matplotlib_is_a_base_dependency() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("matplotlib") for d in deps)  # `pip install -e .` then `puzzle demo` draws plots


# ---- a run directory with search, estimated costs, a GKD log and BLD sidecars (no models) ------------------


def _fake_run(run: Path, variants: int = 12) -> None:
    pred = lambda tps: {"gen": {"throughput_tok_s": tps, "speedup": tps / 2e6, "estimate": True, "device": "estimate"}}
    sol = lambda name, target, obj, tps: {"name": name, "target": target, "objective": obj, "attention_layers": 2,
                                          "predicted": pred(tps)}
    write_json(run / "search" / "solutions.json", {
        "metric": "kl", "parent": pred(2e6), "constraints": [{"kind": "throughput", "target": "1.5x",
                                                               "workload": "gen"}],
        "config": {"sweep_constraint": 0},
        "solutions": [sol("c-1.5x", "1.5x", 0.1, 3.1e6), sol("c-2x", "2x", 0.3, 4.2e6)],
        "baselines": [{**sol("", "1.5x", 0.2, 3.1e6), "method": "greedy", "feasible": True},
                      {**sol("", "2x", 0.5, 4.0e6), "method": "max_params", "feasible": True}],
        "infeasible": []})
    write_json(run / "costs" / "estimate-gen.json", {
        "schema": "puzzle-costs/1", "kind": "estimate", "device": "estimate", "dtype": "bfloat16",
        "roofline": ROOFLINE, "workload": {"name": "gen", "batch_size": 1, "prompt_len": 8, "gen_len": 4},
        "attention": {}, "ffn": {}, "fixed": {}})
    train = [{"step": s, "loss": 1.0 / s} for s in range(1, 11)]
    valid = [{"step": s, "kl": 0.5 / (s + 1)} for s in (0, 5, 10)]
    write_json(run / "children" / "c-1.5x" / "uptrained" / "training_log.json", {"train": train, "valid": valid})
    for i in range(variants):  # the parent's own variant (index 0) has loss 0 in every layer
        entry = {"kind": "ffn", "attention": None, "ffn": FFNConfig("swiglu", 32 * (i + 1)).to_dict()}
        for layer in range(3):
            write_json(run / "library" / f"layer{layer:03d}" / f"ffn-{i}.json",
                       {**entry, "layer": layer, "metrics": {"val_nmse_after": 0.0 if i == 0 else 0.01 * i}})


@pytest.fixture
def figures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Every figure the report draws, by file name (kept open instead of saved)."""
    drawn: dict[str, Any] = {}

    def keep(fig: Any, path: Path) -> Path:
        drawn[path.name] = fig
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        return path

    monkeypatch.setattr(report_plots, "_save", keep)
    _fake_run(tmp_path)
    run_report(tmp_path, ReportConfig())
    return drawn


def test_bld_plot_gives_every_variant_its_own_colour_and_marker(figures: dict[str, Any]) -> None:
    ax = figures["bld_losses.png"].axes[0]
    lines = ax.get_lines()
    assert len(lines) == 11  # 12 variants, less the parent's own (loss 0 cannot sit on a log axis)
    assert len({line.get_color() for line in lines}) == 11
    assert len({line.get_marker() for line in lines}) == 11
    legend = ax.get_legend()
    assert "ffn swiglu32" not in [t.get_text() for t in legend.get_texts()]
    assert "ffn swiglu32" in legend.get_title().get_text()  # named as left out, not silently dropped
    # the legend sits outside the data: it starts right of the axes
    fig = figures["bld_losses.png"]
    fig.canvas.draw()
    assert legend.get_window_extent().x0 >= ax.get_window_extent().x1


def test_gkd_plot_puts_train_loss_and_valid_kl_on_separate_axes(figures: dict[str, Any]) -> None:
    axes = figures["gkd_curves.png"].axes
    assert len(axes) == 2
    assert "train loss" in axes[0].get_ylabel() and "KL" in axes[1].get_ylabel()


def test_pareto_plot_says_estimate_in_readable_units_without_overlapping_labels(figures: dict[str, Any]) -> None:
    ax = figures["quality_vs_throughput.png"].axes[0]
    xlabel = ax.get_xlabel()
    assert "M tok/s" in xlabel and "ESTIMATE" in xlabel and "H200" in xlabel
    assert not ax.texts  # no per-point text labels to overlap: a legend names methods and targets
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"mip", "greedy", "max_params", "target 1.5x", "target 2x"} <= set(legend)
    # each target's throughput as a vertical line: 1.5x and 2x of the parent's 2 M tok/s
    assert sorted(line.get_xdata()[0] for line in ax.get_lines()) == pytest.approx([3.0, 4.0])


def test_summary_says_estimate_and_names_the_datasheet_gpu(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _fake_run(tmp_path)
    print_summary(tmp_path)
    out = capsys.readouterr().out
    assert "est. tok/s" in out and "pred. tok/s" not in out
    assert "ESTIMATE from an analytic roofline of datasheet H200 SXM" in out
    assert "measured" not in out.replace("not measured", "").replace("meas.", "")


def test_summary_without_search_claims_no_measured_costs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    print_summary(tmp_path)
    out = capsys.readouterr().out
    assert "no predictions" in out and "measured per-block" not in out


def test_library_prints_the_worst_rows_and_writes_every_row(tmp_path: Path) -> None:
    entries = [LibraryEntry(layer, "attention", AttentionConfig("gqa", heads), None, f"w{layer}-{heads}",
                            {"val_nmse_after": layer + heads / 10, "tokens": 100})
               for layer in range(12) for heads in (1, 2, 4, 8, 16)]
    entries += [LibraryEntry(layer, "attention", AttentionConfig.no_op(), None, None, {"val_nmse_after": 1e9})
                for layer in range(12)]  # no weights, nMSE 1 by definition: never the "worst"
    text = write_summary(tmp_path, entries, limit=5)
    lines = text.splitlines()
    assert len(lines) == 1 + 1 + 5  # what it is, the header, five rows
    assert "72 entries" in lines[0] and str(tmp_path / "summary.csv") in lines[0]
    assert lines[2].split()[:3] == ["11", "attention", "gqa16"]  # worst trained entry first
    assert len((tmp_path / "summary.csv").read_text().splitlines()) == 1 + 72


def test_data_stage_shows_progress_with_a_rate_and_a_summary_line(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "a.txt").write_text("".join(f"paragraph {i} of some text to tokenize\n\n" for i in range(200)))
    run_data(tmp_path / "run", DataConfig(sources=[str(tmp_path / "a.txt")], seq_len=16, valid_fraction=0.2,
                                          test_fraction=0.2, txt_documents="paragraphs"), tokenizer=ByteTokenizer())
    captured = capsys.readouterr()
    assert "data: tokenize" in captured.err and "B/s" in captured.err and "100%" in captured.err
    assert "data: sequences of 16 tokens" in captured.out


def test_eval_shows_progress_over_models(capsys: pytest.CaptureFixture) -> None:
    parent = tiny_parent(vocab=ByteTokenizer.vocab_size)
    _, valid = token_arrays(vocab=ByteTokenizer.vocab_size)
    evaluate_models({"parent": lambda: parent, "twin": lambda: parent}, parent, valid[:4], {}, ByteTokenizer(),
                    EvalConfig(batch_size=4, throughput=False), torch.device("cpu"))
    err = capsys.readouterr().err
    assert "eval: models" in err and "2/2" in err and "model" in err


def test_solutions_csv_names_estimated_columns(tmp_path: Path) -> None:
    from puzzle.core.artifacts import read_json
    from puzzle.stages.search.tables import pareto_csv

    _fake_run(tmp_path)
    result = read_json(tmp_path / "search" / "solutions.json")
    for s in result["solutions"] + result["baselines"]:
        s["predicted"]["gen"]["params"] = 1
    header = pareto_csv(result).splitlines()[0].split(",")
    assert "gen_est_tok_s" in header and "gen_est_speedup" in header and "gen_tok_s" not in header


def test_costs_measurement_shows_progress_over_variants(capsys: pytest.CaptureFixture) -> None:
    from puzzle.core.workloads import Workload
    from puzzle.costs.stage import CostsConfig, costs_for_workload
    from puzzle.model.blocks import BlockConfig
    from puzzle.model.presets import tiny_llama_config

    def timer(config, w, ctx, cfg, device, gen):  # a fake device: time grows with the layers' parameters
        step = 1.0 + sum(config.block_param_count(b) for b in config.blocks) * 1e-6
        return [10 * step], [step]

    blocks = [BlockConfig(AttentionConfig.gqa(k), FFNConfig.swiglu(n)) for k in (4, 2) for n in (128, 64)]
    cfg = CostsConfig(mode="measure", device="cpu", dtype="float32", repeats=1, warmup=0, input_sets=1)
    costs_for_workload(tiny_llama_config(num_layers=2, num_kv_heads=4), blocks, Workload("w", 1, 8, 4), cfg, timer)
    err = capsys.readouterr().err
    assert "costs: w" in err and "4/4" in err and "variant" in err


def test_uptrain_shows_progress_naming_the_child_and_a_summary_line(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    from gkd_helpers import damaged_child
    from puzzle.core.config import from_dict
    from puzzle.core.distributed import DistInfo
    from puzzle.stages.uptrain.stage import UptrainConfig, train_gkd

    parent = tiny_parent()
    train, valid = token_arrays()
    cfg = from_dict(UptrainConfig, {"steps": 3, "micro_batch_size": 2, "val_every": 0, "val_batches": 1,
                                    "checkpoint_every": 0, "device": "cpu"})
    train_gkd(damaged_child(parent), parent, train, valid, cfg, tmp_path / "child-0" / ".uptrain",
              DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    captured = capsys.readouterr()
    assert "uptrain child-0" in captured.err and "3/3" in captured.err and "step" in captured.err
    assert "uptrain child-0: 3 steps, train loss" in captured.out
