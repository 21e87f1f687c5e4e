"""Export a PuzzleModel as a normal Hugging Face directory.

nemotron-nas (any child): sharded safetensors + index under HF/Nemotron-NAS key names, config.json in the
DeciLM schema with `block_configs` and `auto_map`, generation_config.json, tokenizer files, and our own
self-contained `configuration_decilm.py` / `modeling_decilm.py` (torch + transformers only).
llama (homogeneous models only): a plain LlamaForCausalLM (Qwen2ForCausalLM when q/k/v carry bias).
A `puzzle.json` sidecar keeps our exact ModelConfig and whatever the caller adds.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file

from puzzle.core.artifacts import atomic_dir
from puzzle.core.errors import PuzzleError
from puzzle.core.tmpfiles import match_umask
from puzzle.formats import hf
from puzzle.formats.llama2c_hf import write_hf_tokenizer
from puzzle.formats.loading import SIDECAR
from puzzle.formats.native import copy_tokenizer_files, make_readable, save_model
from puzzle.formats.nemotron_nas import nemotron_ffn_missing
from puzzle.formats.tokenizers import Llama2cTokenizer
from puzzle.model.decoder import PuzzleModel

EXPORT_FORMATS = ("nemotron-nas", "llama")
REMOTE_CODE_DIR = Path(__file__).parent / "remote_code"
REMOTE_CODE_FILES = ("configuration_decilm.py", "modeling_decilm.py")


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


_SIZE = re.compile(r"^\s*(-?\d+(?:\.\d*)?)\s*(TB|GB|MB|KB|B)?\s*$", re.IGNORECASE)
_UNIT = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}  # decimal, as transformers' max_shard_size


def parse_shard_size(value: int | str) -> int:
    """Bytes of a shard size: a positive int, or text such as "5GB", "500MB", "2000000" (bytes)."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        m = _SIZE.match(str(value))
        if not m:
            raise PuzzleError(f"max shard size {value!r} is not a size; write e.g. 5GB, 500MB or a byte count")
        size = int(float(m.group(1)) * _UNIT[(m.group(2) or "B").upper()])
    if size <= 0:
        raise PuzzleError(f"max shard size {value!r} must be positive; write e.g. 5GB or 500MB")
    return size


def write_sharded_safetensors(state: dict[str, torch.Tensor], out_dir: Path, max_shard_size: int | str) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    split = split_torch_state_dict_into_shards(state, max_shard_size=parse_shard_size(max_shard_size))
    for filename, keys in split.filename_to_tensors.items():
        shard = {k: state[k].detach().to("cpu").contiguous() for k in keys}
        save_file(shard, str(out_dir / filename), metadata={"format": "pt"})
    if split.is_sharded:
        _write_json(out_dir / "model.safetensors.index.json",
                    {"metadata": {**split.metadata, "total_size": sum(t.numel() * t.element_size() for t in state.values())},
                     "weight_map": split.tensor_to_filename})
    return sorted(split.filename_to_tensors)


def export_hf(model: PuzzleModel, out_dir: str | Path, tokenizer_source: Any = None,
              extra_sidecar: dict[str, Any] | None = None, format: str = "nemotron-nas",
              max_shard_size: int | str = "5GB", dtype: torch.dtype | None = None) -> Path:
    """Write `model` to out_dir (atomically replacing it). dtype None keeps the model's dtype."""
    if format not in EXPORT_FORMATS:
        raise PuzzleError(f"unknown export format {format!r}; use one of {', '.join(EXPORT_FORMATS)}")
    parse_shard_size(max_shard_size)  # a bad size fails before anything is written
    config = model.config
    state = {k: v for k, v in model.state_dict().items()}
    if any(t.is_meta for t in state.values()):
        raise PuzzleError("cannot export a model on the meta device (it has no weights); load its weights first")
    dtype = dtype or next(t.dtype for t in state.values() if t.is_floating_point())
    state = {hf.key_to_hf(k): (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    if format == "llama":
        hf_config = hf.config_to_llama(config, dtype)
    else:
        hf_config = hf.config_to_nemotron(config, dtype)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_sharded_safetensors(state, tmp, max_shard_size)
        _write_json(tmp / "config.json", hf_config)
        generation = {"_from_model_config": True, "bos_token_id": config.bos_token_id,
                      "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id}
        _write_json(tmp / "generation_config.json", {k: v for k, v in generation.items() if v is not None})
        if format == "nemotron-nas":
            for name in REMOTE_CODE_FILES:
                shutil.copy2(REMOTE_CODE_DIR / name, tmp / name)
        copy_tokenizer_files(tokenizer_source, tmp)
        for tok_bin in sorted(tmp.glob("tok*.bin"))[:1]:  # llama2.c's: also as tokenizer.json for AutoTokenizer
            write_hf_tokenizer(Llama2cTokenizer(tok_bin), tmp)
        write_sidecar(model, tmp, format, extra_sidecar)
        make_readable(tmp)
    return out_dir


def export_model_dir(model: PuzzleModel, out_dir: str | Path, tokenizer_source: Any = None,
                     extra_sidecar: dict[str, Any] | None = None) -> str:
    """A Nemotron-NAS HF directory, or the native format (with the same sidecar) when an FFN kind has no
    Nemotron-NAS mapping (`puzzle.model.kinds`). Returns the format written: 'nemotron-nas' or 'native'."""
    if not nemotron_ffn_missing(model.block_configs):
        export_hf(model, out_dir, tokenizer_source=tokenizer_source, extra_sidecar=extra_sidecar)
        return "nemotron-nas"
    save_model(model, out_dir, tokenizer_source=tokenizer_source)
    write_sidecar(model, Path(out_dir), "native", extra_sidecar)
    return "native"


def write_sidecar(model: PuzzleModel, model_dir: Path, format: str, extra: dict[str, Any] | None = None) -> None:
    """The `puzzle.json` sidecar: our exact ModelConfig, the format written and whatever the caller adds."""
    path = Path(model_dir) / SIDECAR
    _write_json(path, {"model_config": model.config.to_dict(), "export_format": format, **(extra or {})})
    match_umask(path)
