"""Config text of the tiny ``transformers`` Qwen2 that the run-level tests train."""

from __future__ import annotations


def qwen2_config(rows: int, seq_len: int, rest: str) -> str:
    """A config whose model is a 2-layer random Qwen2 (vocab 256, GQA 4/2) taking
    ``[rows, seq_len]`` tokens, followed by the YAML ``rest`` (handlers, train ...)."""
    return f"""\
model:
  factory: "torchgraft.models.hf:build_causal_lm"
  kwargs: {{model_type: qwen2, vocab_size: 256, hidden_size: 64, intermediate_size: 128,
           num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2,
           max_position_embeddings: 64}}
  inputs: [{{shape: [{rows}, {seq_len}], dtype: int64, high: 256}}]
{rest}"""
