"""torchgraft.ops."""
