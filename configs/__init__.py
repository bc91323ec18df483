"""torchgraft.configs."""
