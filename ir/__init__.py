"""torchgraft.ir."""
