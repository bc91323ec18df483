"""torchgraft.passes."""
