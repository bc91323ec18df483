"""Imports every built-in handler module so that each registers itself."""

from torchgraft.handlers import (
    bitnet,
    chunked_loss,
    flex_attention,
    float8,
    int8,
    lora,
    muon,
    mx,
    onednn_matmul,
    recompute,
    wsd,
)

MODULES = (
    bitnet,
    chunked_loss,
    flex_attention,
    float8,
    int8,
    lora,
    muon,
    mx,
    onednn_matmul,
    recompute,
    wsd,
)
"""The modules that define the built-in handlers."""
