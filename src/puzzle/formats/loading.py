"""Format detection and the single entry points `load_model` / `load_model_config`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from puzzle.core.errors import PuzzleError
from puzzle.formats import gguf, hf, llama2c, native
from puzzle.formats.weights import model_from_state_dict
from puzzle.model.blocks import ModelConfig
from puzzle.model.decoder import PuzzleModel, build_model

FORMATS = ("native", "hf", "nemotron-nas", "llama2c", "gguf", "config")
SIDECAR = "puzzle.json"  # written by export_hf: our exact ModelConfig, so a round trip keeps every field


def _llama2c_in_dir(path: Path) -> Path | None:
    bins = [p for p in sorted(path.glob("*.bin")) if not p.name.startswith(("tok", "pytorch_model"))]
    hits = [p for p in bins if llama2c.looks_like_llama2c(p)]
    return hits[0] if len(hits) == 1 else None


def _resolve(path: str | Path) -> tuple[str, Path]:
    """(format, the file or directory to read)."""
    path = Path(path)
    if not path.exists():
        raise PuzzleError(f"{path} does not exist; pass a model directory, a llama2.c .bin, or a config.json")
    if path.is_file():
        if path.suffix == ".json":
            return "config", path
        if path.suffix == ".gguf" or gguf.looks_like_gguf(path):
            return "gguf", path
        if path.suffix == ".bin" and llama2c.looks_like_llama2c(path):
            return "llama2c", path
        if path.suffix == ".bin":
            raise PuzzleError(
                f"{path} is not a llama2.c v0 checkpoint (its header does not match its size); pass a valid "
                "llama2.c .bin or the model directory"
            )
        raise PuzzleError(f"{path} is not a model file this package reads; pass a model directory, a .gguf "
                          "or a llama2.c .bin")
    config = path / "config.json"
    if config.exists():
        data = hf.read_json_file(config)
        if native.is_native_config(data):
            return "native", path
        return ("nemotron-nas" if hf.architecture_of(data) == "DeciLMForCausalLM" else "hf"), path
    found = _llama2c_in_dir(path)
    if found is not None:
        return "llama2c", found
    raise PuzzleError(
        f"{path} holds no model (no config.json and no llama2.c .bin); pass a Hugging Face model directory, "
        "a Nemotron-NAS directory, a native puzzle directory or a llama2.c .bin"
    )


def detect_format(path: str | Path) -> str:
    """One of FORMATS: 'native', 'hf' (Llama/Mistral/Qwen2), 'nemotron-nas', 'llama2c', 'gguf' (llama.cpp),
    'config' (bare json)."""
    return _resolve(path)[0]


def _config_from_json(data: dict[str, Any]) -> ModelConfig:
    if native.is_native_config(data):
        return native.native_config_from_dict(data)
    return hf.config_from_hf(data)


def _sidecar_config(model_dir: Path) -> ModelConfig | None:
    sidecar = model_dir / SIDECAR
    if not sidecar.exists():
        return None
    data = hf.read_json_file(sidecar).get("model_config")
    return ModelConfig.from_dict(data) if isinstance(data, dict) else None


def load_model_config(path: str | Path) -> ModelConfig:
    """The architecture alone (no weights are read): for inspect, costs and meta-device models."""
    fmt, target = _resolve(path)
    if fmt == "llama2c":
        return llama2c.load_llama2c_config(target)
    if fmt == "gguf":
        return gguf.load_gguf_config(target)
    if fmt == "config":
        return _config_from_json(hf.read_json_file(target))
    return (_sidecar_config(target) if fmt != "native" else None) or _config_from_json(
        hf.read_json_file(target / "config.json")
    )


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> PuzzleModel:
    """Any supported checkpoint as a PuzzleModel (eval mode). dtype None keeps the stored dtype.

    device="meta" builds the architecture without reading weights.
    """
    if torch.device(device).type == "meta":
        return build_model(load_model_config(path), device="meta", dtype=dtype or torch.float32)
    fmt, target = _resolve(path)
    if fmt == "config":
        raise PuzzleError(f"{target} is a config with no weights; pass the model directory that holds its weights "
                          f"(`puzzle inspect {target}` reads the config alone)")
    if fmt == "llama2c":
        return llama2c.load_llama2c(target, device, dtype)
    if fmt == "gguf":
        return gguf.load_gguf(target, device, dtype)
    if fmt == "native":
        return native.load_native(target, device, dtype)
    config = load_model_config(target)
    state = hf.state_dict_from_hf(hf.read_hf_weights(target), config)
    return model_from_state_dict(config, state, str(target), device, dtype)

