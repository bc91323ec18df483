"""torchgraft.tools."""
