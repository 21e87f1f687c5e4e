"""Checkpoint interop: load any supported format, save natively, export to Hugging Face.

    load_model(path, device="cpu", dtype=None) -> PuzzleModel
    load_model_config(path) -> ModelConfig
    save_model(model, dir, tokenizer_source=None) -> Path
    export_hf(model, dir, tokenizer_source=None, extra_sidecar=None, format="nemotron-nas", ...) -> Path
    detect_format(path) -> "native" | "hf" | "nemotron-nas" | "llama2c" | "gguf" | "config"
"""

from puzzle.formats.export import export_hf
from puzzle.formats.loading import detect_format, load_model, load_model_config
from puzzle.formats.native import save_model

__all__ = ["detect_format", "export_hf", "load_model", "load_model_config", "save_model"]
