"""One-line errors for bad input: YAML positions, a missing run directory, sizes and counts, dtype names."""

from __future__ import annotations

from pathlib import Path

import pytest

from puzzle.cli import main
from puzzle.core.config import read_yaml
from puzzle.core.errors import PuzzleError


def test_yaml_error_names_line_and_column(tmp_path: Path) -> None:
    bad = tmp_path / "run.yaml"
    bad.write_text("data:\n  seq_len: 32\n   oops: [1, 2\nlibrary: {}\n")
    with pytest.raises(PuzzleError) as e:
        read_yaml(bad)
    assert f"{bad}:3:" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("command", ["eval", "score", "search", "library"])
def test_a_missing_run_directory_is_named(tmp_path: Path, capsys, command: str) -> None:
    missing = tmp_path / "nonexistent"
    assert main([command, str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"run directory {missing} does not exist" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("size, message", [("banana", "is not a size"), ("-5GB", "must be positive"),
                                           ("0", "must be positive")])
def test_bad_shard_size_is_a_usage_error(tmp_path: Path, capsys, size: str, message: str) -> None:
    with pytest.raises(SystemExit) as e:
        main(["export", str(tmp_path / "m"), str(tmp_path / "out"), f"--max-shard-size={size}"])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_export_hf_refuses_a_negative_shard_size_before_writing(tmp_path: Path) -> None:
    from puzzle.formats import export_hf
    from puzzle.formats.export import parse_shard_size
    from puzzle.model.decoder import build_model
    from puzzle.model.presets import tiny_llama_config

    assert parse_shard_size("500MB") == 500 * 10**6 and parse_shard_size("2000") == 2000
    with pytest.raises(PuzzleError, match="must be positive"):
        export_hf(build_model(tiny_llama_config(num_layers=1)), tmp_path / "out", max_shard_size="-5GB")
    assert not (tmp_path / "out").exists()


def test_generate_refuses_negative_new_tokens_before_printing(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["generate", str(tmp_path), "--prompt", "Once upon", "--max-new-tokens", "-5"])
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and "--max-new-tokens" in err


@pytest.mark.parametrize("name, canonical", [("bf16", "bfloat16"), ("bfloat16", "bfloat16"), ("fp32", "float32")])
def test_every_dtype_flag_takes_both_names(name: str, canonical: str) -> None:
    from puzzle.cli import command_parser

    assert command_parser("export").parse_args(["m", "o", "--dtype", name]).dtype == canonical
    assert command_parser("bench").parse_args(["m", "--dtype", name]).dtype == canonical
    assert command_parser("generate").parse_args(["m", "--prompt", "x", "--dtype", name]).dtype == canonical


def test_version(capsys) -> None:
    import puzzle

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"puzzle {puzzle.__version__}"


@pytest.mark.parametrize("override, field", [("data.seq_len=-5", "data.seq_len"),
                                             ("library.tokens_per_variant=-1", "library.tokens_per_variant"),
                                             ("library.search_space.ffn_fractions=[-0.5]", "ffn_fractions")])
def test_run_refuses_negative_sizes_before_any_stage(tmp_path: Path, capsys, override: str, field: str) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("some text\n")
    config = tmp_path / "run.yaml"
    config.write_text(f"run_dir: {tmp_path / 'run'}\nparent: {tmp_path / 'parent'}\ndata: {{sources: [{corpus}]}}\n")
    assert main(["run", str(config), override]) == 2
    assert field in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
