"""torchgraft: model conversions as declarative graph rewrites."""
