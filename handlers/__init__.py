"""torchgraft.handlers."""
