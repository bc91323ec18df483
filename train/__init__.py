"""torchgraft.train."""
