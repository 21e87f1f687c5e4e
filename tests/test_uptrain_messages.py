"""`puzzle uptrain` says per child whether it wrote the uptrained model or found it current."""

from __future__ import annotations

from pathlib import Path

from gkd_helpers import make_run_dir, one_torch_thread  # noqa: F401  (autouse fixture: one intra-op thread)
from puzzle.cli import main


def test_uptrain_names_the_child_and_says_written_only_when_it_wrote(tmp_path: Path, capsys) -> None:
    run, _ = make_run_dir(tmp_path)
    args = ["uptrain", str(run), "--child", "noattn12", "steps=2", "micro_batch_size=2", "val_every=0",
            "checkpoint_every=0", "warmup_steps=1", "device=cpu"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"uptrain noattn12: wrote {run / 'children' / 'noattn12' / 'uptrained'}" in out
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "is current, nothing to do" in out and "noattn12" in out and "wrote" not in out


def test_loading_a_native_dirs_tokenizer_gives_no_rope_scaling_warning(tmp_path: Path) -> None:
    import warnings

    from puzzle.formats.tokenizers import load_tokenizer

    run, _ = make_run_dir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        load_tokenizer(run / "parent")
