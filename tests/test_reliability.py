"""Shared fingerprint / LR-schedule helpers, config validation, and stage inputs that must invalidate outputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from puzzle.cli import main
from puzzle.core.artifacts import fingerprint_files
from puzzle.core.config import from_dict
from puzzle.core.errors import PuzzleError
from puzzle.demo.pretrain import cosine_lr
from puzzle.stages.data import DataConfig, run_data
from puzzle.stages.evaluate.stage import EvalConfig
from puzzle.stages.library.train import _schedule
from puzzle.stages.uptrain.lr_schedule import warmup_cosine
from puzzle.stages.uptrain.stage import UptrainConfig, lr_lambda

# ---- fingerprints ------------------------------------------------------------------------------------------


def test_fingerprint_files(tmp_path: Path) -> None:
    d = tmp_path / "model"
    (d / "sub").mkdir(parents=True)
    (d / ".work").mkdir()
    (d / "a.safetensors").write_bytes(b"12345")
    (d / "sub" / "b.json").write_text("{}")
    (d / ".tmp-a").write_text("half-written")
    (d / ".work" / "ckpt.pt").write_text("x")
    top = fingerprint_files(d)
    assert [row[:2] for row in top] == [["a.safetensors", 5]]
    assert [row[0] for row in fingerprint_files(d, recursive=True)] == ["a.safetensors", "sub/b.json"]
    assert fingerprint_files(d / "a.safetensors")[0][:2] == ["a.safetensors", 5]
    assert fingerprint_files(tmp_path / "missing") == []
    st = (d / "a.safetensors").stat()
    os.utime(d / "a.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten, same size
    assert fingerprint_files(d) != top


# ---- the one LR schedule -----------------------------------------------------------------------------------


def test_warmup_cosine_shape() -> None:
    steps, warmup = 20, 4
    f = [warmup_cosine(s, steps, warmup, 0.1) for s in range(steps + 3)]
    assert f[:warmup] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f[warmup] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[warmup:], f[warmup + 1:], strict=False))  # decays monotonically
    assert f[steps] == pytest.approx(0.1) and f[-1] == pytest.approx(0.1)  # held at the floor past the end
    assert f[warmup + (steps - warmup) // 2] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: halfway down


def test_trainers_share_the_schedule() -> None:
    cfg = from_dict(UptrainConfig, {"warmup_steps": 3, "min_lr_ratio": 0.2})
    up = lr_lambda(cfg, 10)
    assert [up(s) for s in range(12)] == [warmup_cosine(s, 10, 3, 0.2) for s in range(12)]
    bld = _schedule(40, 0.1, 0.05)  # warm-up = ceil(0.1 * 40) = 4 steps
    assert [bld(s) for s in range(41)] == [warmup_cosine(s, 40, 4, 0.05) for s in range(41)]
    assert cosine_lr(7, 30, 5, 2e-3) == pytest.approx(2e-3 * warmup_cosine(7, 30, 5, 0.1))


# ---- config values that used to reach torch and end in a traceback ----------------------------------------


@pytest.mark.parametrize("override", [{"lr": -1.0}, {"weight_decay": -0.1}, {"min_lr_ratio": 1.5},
                                      {"warmup_steps": -1}, {"val_batches": 0}, {"checkpoint_every": -2}])
def test_uptrain_config_rejects(override: dict) -> None:
    with pytest.raises(PuzzleError, match="uptrain"):
        from_dict(UptrainConfig, override)


@pytest.mark.parametrize("override", [{"batch_size": 0}, {"max_sequences": 0}, {"task_limit": -1}])
def test_eval_config_rejects(override: dict) -> None:
    with pytest.raises(PuzzleError, match="eval"):
        from_dict(EvalConfig, override)


def test_cli_bad_lr_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["uptrain", str(tmp_path), "lr=-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "uptrain.lr must be positive" in err[0]


@pytest.mark.parametrize(("argv", "names"), [(["search"], "puzzle score"), (["realize", "RUN", "best"], "puzzle search")])
def test_missing_stage_input_names_the_stage(tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str],
                                             names: str) -> None:
    args = [a.replace("RUN", str(tmp_path)) for a in argv]
    if len(args) == 1:
        args.append(str(tmp_path))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert names in err and "Traceback" not in err


# ---- the data stage's inputs include the tokenizer's contents ----------------------------------------------


class FileTokenizer:
    """Stand-in tokenizer backed by a file: same size and special ids whatever the file says."""

    bos_id: int | None = 1
    eos_id: int | None = 2
    vocab_size = 258

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def files(self) -> list[Path]:
        return [self.path]

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode()]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode(errors="replace")


def test_data_reruns_when_the_tokenizer_file_changes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("\n".join(f"line {i} of the little corpus, long enough." for i in range(60)))
    tok_file = tmp_path / "tok" / "tokenizer.json"
    tok_file.parent.mkdir()
    tok_file.write_text('{"merges": 1}')
    cfg = DataConfig(sources=[str(corpus)], seq_len=16, valid_fraction=0.3, txt_documents="lines")
    run = tmp_path / "run"
    run_data(run, cfg, tokenizer_path=tok_file.parent, tokenizer=FileTokenizer(tok_file))
    run_data(run, cfg, tokenizer_path=tok_file.parent, tokenizer=FileTokenizer(tok_file))
    assert "is current" in capsys.readouterr().out
    tok_file.write_text('{"merges": 2}')  # retrained: same vocabulary size, same special ids
    run_data(run, cfg, tokenizer_path=tok_file.parent, tokenizer=FileTokenizer(tok_file))
    assert "is current" not in capsys.readouterr().out
