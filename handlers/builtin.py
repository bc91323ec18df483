"""Imports every built-in handler module so that each registers itself."""

from torchgraft.handlers import (  # noqa: F401  (imported to register the handlers)
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
