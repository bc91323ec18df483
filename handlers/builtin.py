"""The built-in handler modules: importing them registers their handlers."""

import importlib

MODULES = tuple(
    importlib.import_module(f"torchgraft.handlers.{name}")
    for name in (
        "bitnet",
        "chunked_loss",
        "flex_attention",
        "float8",
        "int8",
        "lora",
        "muon",
        "mx",
        "onednn_matmul",
        "recompute",
        "wsd",
    )
)
"""The modules that define the built-in handlers."""
