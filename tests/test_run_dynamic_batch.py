"""`torchgraft run` captures the batch dimension as dynamic: the trained graph takes any
batch size (a last partial batch, an eval batch), and the combinations that cannot work
are refused naming ``capture.dynamic_batch``."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from hf_configs import qwen2_config

from torchgraft.config import ConfigError, parse_config
from torchgraft.ir.dynamic_batch import has_dynamic_batch
from torchgraft.ops.numerics import sqnr
from torchgraft.passes import PassManager
from torchgraft.train.job import run_job
from torchgraft.train.lm import NextTokenLoss

QWEN2 = qwen2_config(
    4,
    32,
    """\
handlers:
  - chunked_cross_entropy: {chunk_size: 32}
  - float8
train: {steps: 2, lr: 3.0e-3, warmup_steps: 1, progress: false}
""",
)


def _loss_and_grads(module: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor):
    loss = module(tokens, labels)
    grads = torch.autograd.grad(loss, [p for _, p in module.named_parameters()])
    names = [n for n, _ in module.named_parameters()]
    return loss.detach(), dict(zip(names, grads))


def test_the_trained_graph_takes_other_batch_sizes(tmp_path):
    """A transformers Qwen2 trained at batch 4 (float8 + chunked loss, rewritten on the
    symbolic graph), then fed 3 rows and 1 row, with the trained weights: loss and
    gradients equal those of the same plan on a graph captured at that batch size, and
    are float8-close to the model's own code (eager, fp32)."""
    pytest.importorskip("transformers")
    config = parse_config(QWEN2, tmp_path / "run.yaml")
    result = run_job(config, out_dir=tmp_path / "out")
    assert result.metrics["dynamic_batch"] is True
    assert result.report.matches == {"chunked_cross_entropy": 1, "float8": 14}
    reference = config.build_model()
    trained = dict(result.module.named_parameters())
    with torch.no_grad():
        for name, param in reference.named_parameters():
            param.copy_(trained[name])
    g = torch.Generator().manual_seed(7)
    for rows in (3, 1):
        tokens, labels = (torch.randint(0, 256, (rows, 32), generator=g) for _ in range(2))
        loss, grads = _loss_and_grads(result.module, tokens, labels)
        static, _ = config.judged_graph(reference, (tokens,))
        assert not has_dynamic_batch(static)
        PassManager(list(config.handlers)).run(static)
        same_loss, same_grads = _loss_and_grads(static, tokens, labels)
        assert sqnr(loss, same_loss) > 100
        assert min(sqnr(grads[n], same_grads[n]) for n in same_grads) > 100
        fp32_loss, fp32_grads = _loss_and_grads(NextTokenLoss(reference), tokens, labels)
        assert sqnr(loss, fp32_loss) > 30  # measured 72-73 dB
        assert min(sqnr(grads[n], fp32_grads[n]) for n in fp32_grads) > 12  # measured 15.2


def test_dynamic_batch_false_bakes_the_batch_size_in(tmp_path):
    pytest.importorskip("transformers")
    config = parse_config(QWEN2 + "capture: {dynamic_batch: false}\n", tmp_path / "run.yaml")
    assert not config.dynamic_batch({"graph"})
    gm, _ = config.judged_graph(config.build_model(), dynamic_batch=False)
    assert not has_dynamic_batch(gm)
    tokens = torch.zeros(3, 32, dtype=torch.long)
    with pytest.raises(Exception, match="4"):
        gm(tokens, tokens)


FIXED_BATCH = '''
import torch.nn.functional as F
from torch import nn


class FixedBatch(nn.Module):
    """A loss model whose code reshapes to a literal batch size."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(256, 16)
        self.out = nn.Linear(16, 256)

    def forward(self, tokens, labels):
        logits = self.out(self.embed(tokens).reshape(4, 32, 16))
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())
'''


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (
            "capture: {dynamic_batch: true}\nhandlers: [selective_recompute]\n",
            "handlers at stage 'joint'",
        ),
        (
            "capture: {method: symbolic_trace, dynamic_batch: true}\n",
            "needs capture.method: export",
        ),
        (
            "capture: {dynamic_batch: true}\nmodel: {factory: 'fixed_batch_model:FixedBatch'}\n"
            "handlers: []\ntrain: {batch_size: 4, seq_len: 32}\n",
            "FixedBatch fixes the batch size",
        ),
    ],
    ids=["joint-stage", "symbolic-trace", "fixed-batch-model"],
)
def test_a_dynamic_batch_that_cannot_work_is_refused_naming_the_key(tmp_path, extra, says):
    (tmp_path / "fixed_batch_model.py").write_text(FIXED_BATCH)
    model = "model: {factory: 'torchgraft.models:build_llama', kwargs: {preset: tiny}}\n"
    text = extra if extra.count("model:") else model + extra
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(text))
    config = parse_config(text, path)
    with pytest.raises(ConfigError, match=rf"run.yaml:\d+:\d+: capture.dynamic_batch.*{says}"):
        run_job(config, steps=1, out_dir=tmp_path / "out")
    assert not Path(tmp_path / "out" / "metrics.json").exists()


def test_unset_dynamic_batch_is_static_with_joint_handlers(tmp_path):
    config = parse_config("model: {factory: 'torchgraft.models:build_llama'}\n")
    assert config.dynamic_batch({"graph"}) and not config.dynamic_batch({"graph", "joint"})
