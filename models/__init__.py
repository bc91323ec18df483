"""Built-in models: a Llama-style decoder with presets (see :mod:`torchgraft.models.llama`)."""

from torchgraft.models.llama import PRESETS, Llama, LlamaConfig, LlamaWithLoss, build_llama

__all__ = ["PRESETS", "Llama", "LlamaConfig", "LlamaWithLoss", "build_llama"]
