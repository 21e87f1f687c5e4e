"""search.metric_weights: more terms in the MIP's objective (e.g. long-context accuracy next to the KL)."""

from __future__ import annotations

import numpy as np
import pytest

from puzzle.core.errors import PuzzleError
from puzzle.model.blocks import AttentionConfig, BlockConfig, FFNConfig
from puzzle.stages.search.solve import objective_from_scores
from puzzle.stages.search.stage import SearchConfig

PARENT = BlockConfig(AttentionConfig.gqa(2), FFNConfig.swiglu(128))
LINEAR = BlockConfig(AttentionConfig.linear(), FFNConfig.swiglu(128))
NO_OP = BlockConfig(AttentionConfig.no_op(), FFNConfig.swiglu(128))


def scores() -> dict:
    # The linear block is cheap in KL but loses long range; no-op attention costs more KL and keeps... nothing
    # either; the parent's block is free on both.
    rows = [(PARENT, 0.0, 0.9), (LINEAR, 0.05, 0.1), (NO_OP, 0.20, 0.5)]
    return {"layers": [{"layer": 0, "candidates": [{"block": b.to_dict(), "kl": kl, "long_context": lc}
                                                   for b, kl, lc in rows]}]}


def test_weights_add_terms_and_can_change_the_cheapest_replacement() -> None:
    _, kl_only = objective_from_scores(scores(), "kl")
    assert np.allclose(kl_only[0], [0.0, 0.05, 0.20])
    _, both = objective_from_scores(scores(), "kl", {"long_context": 1.0})
    assert np.allclose(both[0], [-0.9, 0.05 - 0.1, 0.20 - 0.5])  # long_context enters as its loss
    replacements = both[0][1:]  # which non-parent block the MIP would rather take
    assert int(np.argmin(kl_only[0][1:])) == 0 and int(np.argmin(replacements)) == 1
    _, reweighted = objective_from_scores(scores(), "kl", {"kl": 2.0, "long_context": 1.0})
    assert np.allclose(reweighted[0], [-0.9, 0.1 - 0.1, 0.4 - 0.5])


def test_missing_metric_and_bad_weights_are_one_line() -> None:
    with pytest.raises(PuzzleError, match="no 'top1' values"):
        objective_from_scores(scores(), "kl", {"top1": 1.0})
    with pytest.raises(PuzzleError, match="unknown metric 'recall'"):
        SearchConfig(metric_weights={"recall": 1.0})
    with pytest.raises(PuzzleError, match="must be a number >= 0"):
        SearchConfig(metric_weights={"long_context": -1.0})


def test_weights_come_from_a_command_line_override() -> None:
    from puzzle.core.config import apply_overrides, from_dict

    cfg = from_dict(SearchConfig, apply_overrides({}, ["metric_weights={long_context: 2.5}"]))
    assert cfg.metric_weights == {"long_context": 2.5}
