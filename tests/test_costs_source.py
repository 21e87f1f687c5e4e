"""Where a predicted number comes from: one label for an estimate wherever it is shown."""

from puzzle.costs.source import costs_source, is_estimated, prediction_costs, prediction_label, short_source

MEASURED = {"kind": "measured", "device": "NVIDIA H200"}
ESTIMATE = {"kind": "estimate", "dtype": "bfloat16", "roofline": {"peak_flops": 989e12, "mem_bandwidth": 4.8e12}}


def test_prediction_label_follows_the_prediction_not_the_costs_file() -> None:
    assert is_estimated({"estimate": True}) and not is_estimated({"estimate": False}) and not is_estimated(None)
    assert prediction_label({"estimate": True}) == "est." and prediction_label({}) == "pred."
    assert prediction_label({"estimate": True}, "ESTIMATED", "predicted") == "ESTIMATED"
    assert prediction_label({"estimate": False}, "_est", "") == ""


def test_an_estimated_prediction_never_names_measured_costs() -> None:
    estimated, measured = {"estimate": True}, {"estimate": False}
    assert prediction_costs(MEASURED, estimated) == {"kind": "estimate"}  # costs measured after the search
    assert prediction_costs(None, estimated) == {"kind": "estimate"}
    assert prediction_costs(ESTIMATE, estimated) is ESTIMATE  # keeps its roofline for the words below
    assert prediction_costs(MEASURED, measured) is MEASURED and prediction_costs(None, measured) is None
    assert costs_source(prediction_costs(MEASURED, estimated)).startswith("ESTIMATE from an analytic roofline")


def test_sources_name_the_datasheet_gpu_or_the_device() -> None:
    assert "datasheet H200" in costs_source(ESTIMATE) and "not measured" in costs_source(ESTIMATE)
    assert short_source(ESTIMATE).startswith("ESTIMATE, datasheet H200")
    assert short_source({"kind": "estimate"}) == "ESTIMATE, analytic roofline"  # no roofline recorded
    assert costs_source({"kind": "estimate"}).endswith("a datasheet GPU; not measured")
    assert costs_source(MEASURED) == "per-block costs measured on NVIDIA H200"
    assert short_source(MEASURED) == "measured, NVIDIA H200" and short_source(None) == "no costs"
