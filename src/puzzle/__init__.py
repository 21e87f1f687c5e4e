"""puzzle: distillation-based neural architecture search that makes an LLM faster on its target GPU."""

__version__ = "0.1.0"
