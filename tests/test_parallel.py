"""Tensor parallelism, FSDP2 and distributed checkpoints on converted graphs (2 gloo ranks).

Multi-process workers live in ``dist_helpers``; each test spawns the ranks once and runs
several scenarios in them (a spawn costs seconds on 2 cores).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pkgutil
import shutil
import subprocess
from pathlib import Path

import dist_helpers as dh
import pytest
import torch
from engine_rules import LowRankAdapters
from hf_configs import qwen2_config
from torch.distributed.tensor import Replicate, Shard

import torchgraft as tg
import torchgraft.ops
from torchgraft.config import ParallelConfig, load_config, parse_config
from torchgraft.ir.errors import TorchgraftError
from torchgraft.ops import sqnr
from torchgraft.ops.sharding import dtensor_support, torchgraft_ops
from torchgraft.passes.parallelize import init_distributed
from torchgraft.passes.split_blocks import split_blocks
from torchgraft.passes.tensor_parallel import TensorParallelError, module_styles
from torchgraft.train import train
from torchgraft.train.job import run_job

# --- single process ---------------------------------------------------------------------------


def test_every_torchgraft_op_runs_on_dtensors():
    for module in pkgutil.iter_modules(torchgraft.ops.__path__):
        importlib.import_module(f"torchgraft.ops.{module.name}")
    ops = torchgraft_ops()
    assert len(ops) >= 17
    missing = [str(op) for op in ops if dtensor_support(op) is None]
    assert not missing, f"ops without DTensor sharding (add them to ops/sharding.py): {missing}"
    assert dtensor_support(torch.ops.torchgraft.float8_linear.default) == "distributed execution"
    assert dtensor_support(torch.ops.torchgraft.rms_norm.default) == "placement rule"


def test_an_op_without_sharding_is_reported():
    @torch.library.custom_op("torchgraft_test::twice", mutates_args=())
    def twice(x: torch.Tensor) -> torch.Tensor:
        return 2 * x

    assert dtensor_support(torch.ops.torchgraft_test.twice.default) is None


def test_plan_globs_must_match_and_styles_must_exist():
    gm = dh.converted_llama([], with_loss=True)
    styles = module_styles(gm, {"layers.*.attention.wq": "colwise", "output": "replicate"})
    assert styles == {
        "model.layers.0.attention.wq": "colwise",
        "model.layers.1.attention.wq": "colwise",
        "model.output": "replicate",
    }
    with pytest.raises(TensorParallelError, match=r"\['layers.\*.attn.wq'\] match no module"):
        module_styles(gm, {"layers.*.attn.wq": "colwise"})
    with pytest.raises(TensorParallelError, match="style 'columnwise'"):
        module_styles(gm, {"output": "columnwise"})


def test_split_blocks_keeps_outputs_parameters_and_fqns():
    tokens, labels = dh.batches(1)[0]
    gm = dh.converted_llama([], with_loss=True)
    before = dict(gm.named_parameters())
    expected = gm(tokens, labels)
    assert split_blocks(gm) == ["model.layers.0", "model.layers.1"]
    after = dict(gm.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is p for n, p in before.items())
    assert isinstance(gm.get_submodule("model.layers.1"), torch.fx.GraphModule)
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls[-2:] == ["model.layers.0", "model.layers.1"]
    assert torch.equal(gm(tokens, labels), expected)


def test_parallelize_outside_torchrun_says_how_to_launch(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(TorchgraftError, match="launch with torchrun"):
        init_distributed()


# --- 2 ranks ----------------------------------------------------------------------------------

MESHES = {
    "tp": {"tp": 2},
    "fsdp": {"fsdp": 2},
    "fsdp2 x tp1": {"fsdp": 2, "tp": 1},
    "fsdp1 x tp2": {"fsdp": 1, "tp": 2},
}
"""2 ranks cannot make a 2 x 2 mesh: the 2-D cases put 2 ranks on one dim and 1 on the other."""


def test_training_matches_single_process():
    """fp32, float8 and a plan whose replacements add parameters (``tg.new_parameter``), each
    trained on every mesh against one process."""
    handlers = {"fp32": [], "float8": ["float8"], "adapters": [LowRankAdapters]}
    scenarios = [
        (f"{mesh} {precision}", shape, handlers[precision])
        for mesh, shape in MESHES.items()
        for precision in handlers
    ]
    ranks = dh.run_ranks(dh.train_scenarios, scenarios)
    # Data parallelism over dp ranks computes what one process does with dp micro-batches
    # (float8 takes each micro-batch's own activation scale, as each rank does).
    data = dh.batches()
    reference = {
        (precision, dp): dh.train_logits(dh.converted_llama(h, dh.BATCH // dp), data, dp)
        for precision, h in handlers.items()
        for dp in (1, 2)
    }
    for name, (losses, logits, float8_collectives) in ranks[0].items():
        assert ranks[1][name][0] == losses, f"{name}: ranks disagree"
        mesh, _, precision = name.rpartition(" ")
        ref_losses, ref_logits = reference[precision, MESHES[mesh].get("fsdp", 1)]
        if precision != "float8":  # float32 throughout: equal up to summation order
            torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=0, msg=name)
        else:
            _assert_as_accurate_as_one_process(
                name, logits, ref_logits, reference["fp32", MESHES[mesh].get("fsdp", 1)][1]
            )
        # Under tensor parallelism (sequence parallel), per block, the inputs of the attention
        # and feed-forward float8 linears are gathered as float8, and so are the gradients
        # of their two reduce-scattered outputs: 4 per block, 2 blocks.
        expected = 8 if "tp" in MESHES[mesh] and precision == "float8" else 0
        assert float8_collectives == expected, name


# 20·log10(2): ‖a − b‖ ≤ ‖a − r‖ + ‖b − r‖, and two errors of the same size at most double.
TRIANGLE_DB = 6.03


def _assert_as_accurate_as_one_process(name, logits, single_logits, fp32_logits):
    """Judge a distributed low-precision run by the single-process one, not bit for bit.

    Sharding changes the float32 summation order (partial sums, all-reduces), which moves
    some values across a float8 rounding boundary, so a few elements round one float8 step
    differently; which ones depends on the GEMM kernel. What must hold: per step, the
    distributed logits are as close to the float32 run's as the single-process float8 ones
    (within 1 dB), and hence (triangle inequality) differ from them by at most twice that
    error (``TRIANGLE_DB``)."""
    for step, (out, single, fp32) in enumerate(zip(logits, single_logits, fp32_logits)):
        error_db, single_error_db = sqnr(out, fp32), sqnr(single, fp32)
        assert error_db >= single_error_db - 1.0, (
            f"{name} step {step}: {error_db:.1f} dB from fp32, one process {single_error_db:.1f}"
        )
        gap_db = sqnr(out, single)
        assert gap_db >= single_error_db - TRIANGLE_DB, (
            f"{name} step {step}: {gap_db:.1f} dB from one process, whose error is "
            f"{single_error_db:.1f} dB"
        )


def test_quantized_linears_sharded_equal_the_single_process_op():
    cases = [
        ("float8_linear", ("tensorwise",)),
        ("float8_linear", ("rowwise",)),
        ("int8_linear", ("weight_only",)),
        ("int8_linear", ("dynamic",)),
        ("int8_linear", ("training",)),
        ("mx_linear", ("mxfp8",)),
        ("mx_linear", ("mxfp4",)),
        ("bitnet_linear", ()),
    ]
    results = dh.run_ranks(dh.quantized_linears, cases)[0]
    assert len(results) == 2 * len(cases)
    low = {case: db for case, db in results.items() if db < 60.0}
    assert not low, f"sharded result differs from the single-process op (SQNR dB): {low}"


def test_every_registered_handler_composes_with_tensor_parallel():
    # The built-in handlers: other test modules register throw-away handlers (and plugins)
    # in this process only, which the spawned ranks do not have.
    names = sorted(
        name
        for name, cls in tg.registered().items()
        if cls.__module__.startswith("torchgraft.handlers.")
    )
    ranks = dh.run_ranks(dh.handler_steps, names, timeout_s=240)
    tokens, labels = dh.batches(1)[0]
    for name in names:
        gm = dh.converted_llama([name], with_loss=True)
        loss = gm(tokens, labels)
        loss.backward()
        tp_loss, tp_grads = ranks[0][name]
        assert sqnr(tp_loss, loss.detach()) >= 60.0, name
        for param, p in gm.named_parameters():
            assert sqnr(tp_grads[param], p.grad) >= 40.0, f"{name}: {param}"


def test_checkpoints_reshard_between_world_sizes_and_layouts(tmp_path):
    """One run, four segments: 1 process, TP over 2, FSDP over 2, 1 process again."""
    uninterrupted = train(dh.converted_llama([], with_loss=True), dh.resume_config(None, 8))
    segments = [
        train(dh.converted_llama([], with_loss=True), dh.resume_config(tmp_path, 2)).losses,
        dh.run_ranks(dh.resume_parallel, str(tmp_path), 4, {"tp": 2})[0],
        dh.run_ranks(dh.resume_parallel, str(tmp_path), 6, {"fsdp": True})[0],
        train(dh.converted_llama([], with_loss=True), dh.resume_config(tmp_path, 8)).losses,
    ]
    assert [len(s) for s in segments] == [2, 2, 2, 2]
    resumed = [loss for segment in segments for loss in segment]
    torch.testing.assert_close(resumed, uninterrupted.losses, rtol=1e-5, atol=0)


# --- torchrun ---------------------------------------------------------------------------------

CONFIGS = Path(torchgraft.__file__).parent / "configs"


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
# llama_logits_tp2: a model returning logits, its loss added by torchgraft, under TP
@pytest.mark.parametrize("name", ["llama_tp2", "llama_fsdp2", "llama_logits_tp2"])
def test_torchrun_trains_the_config_like_one_process(tmp_path, name):
    config_path = CONFIGS / f"{name}.yaml"
    steps = ["--steps", "3", "--no-progress"]
    command = ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "torchgraft", "run"]
    done = subprocess.run(
        [*command, str(config_path), *steps, "--out", str(tmp_path / name)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    losses = json.loads((tmp_path / name / "metrics.json").read_text())["losses"]
    config = dataclasses.replace(load_config(config_path), parallel=ParallelConfig())
    single = run_job(config, steps=3, out_dir=tmp_path / "single", progress=False).train.losses
    if not config.handlers:
        torch.testing.assert_close(losses, single, rtol=1e-5, atol=0)
        return
    # A low-precision plan: sharding moves some values across a rounding boundary (see
    # _assert_as_accurate_as_one_process), so the gap to one process is bounded by what the
    # conversion itself changes in the loss, measured against the unconverted run.
    unconverted = dataclasses.replace(config, handlers=())
    fp32 = run_job(unconverted, steps=3, out_dir=tmp_path / "fp32", progress=False).train.losses
    for step, (loss, one, full) in enumerate(zip(losses, single, fp32)):
        bound = 2 * abs(one - full) + 1e-6 * abs(full)
        assert abs(loss - one) <= bound, f"step {step}: {loss} vs {one} (fp32 {full})"


# --- models as their authors wrote them ------------------------------------------------------


def test_gpt2_conv1d_is_sharded_by_its_weight_layout_with_a_dynamic_batch():
    """GPT-2's ``Conv1D`` weights are ``[in, out]`` (``aten.addmm``): colwise shards dim 1,
    rowwise dim 0, read from the graph. TP 2 (with and without sequence parallelism) on a
    graph with a symbolic batch computes one process's loss and gradients at the captured
    batch size and at another. Sharded as ``[out, in]`` it computed the same values with 24
    all-gathers instead of 4: only the fused qkv ``split`` gathers (once per layer, forward
    and backward)."""
    pytest.importorskip("transformers")
    rows = (dh.BATCH, 3)
    single = [dh.loss_and_grads(dh.gpt2_graph(), n) for n in rows]
    ranks = dh.run_ranks(dh.gpt2_tensor_parallel, rows, timeout_s=240)
    layers = dh.GPT2["n_layer"]
    for sequence_parallel, (steps, placements, gathers) in ranks[0].items():
        assert placements["transformer.h.0.mlp.c_fc.weight"] == (Shard(1),)
        assert placements["transformer.h.0.mlp.c_fc.bias"] == (Shard(0),)
        assert placements["transformer.h.1.attn.c_proj.weight"] == (Shard(0),)
        assert placements["transformer.h.1.attn.c_proj.bias"] == (Replicate(),)
        if not sequence_parallel:
            assert gathers <= 2 * layers * len(rows), gathers
        for (loss, grads), (ref_loss, ref_grads) in zip(steps, single):
            assert sqnr(loss, ref_loss) > 100
            worst = min(sqnr(grads[n], ref_grads[n]) for n in ref_grads)
            assert worst > 80, (sequence_parallel, worst)


QWEN2_FSDP = qwen2_config(
    4,
    16,
    """\
handlers: [{chunked_cross_entropy: {chunk_size: 16}}]
train: {steps: 3, lr: 3.0e-3, warmup_steps: 1, progress: false}
""",
)


def test_fsdp_trains_a_logits_model_with_a_dynamic_batch(tmp_path):
    """A transformers Qwen2 returning logits (the next-token loss added by torchgraft),
    ``torchgraft run`` with FSDP over 2 ranks: the losses of one process, and the trained
    graph takes another global batch that splits evenly over the ranks (6 rows: 3 each),
    computing one process's loss and gradients; 5 rows are refused."""
    pytest.importorskip("transformers")
    rows = (6, 5)
    text = QWEN2_FSDP + "parallel: {fsdp: true}\n"
    ranks = dh.run_ranks(dh.run_config, text, str(tmp_path / "fsdp"), rows, timeout_s=240)
    single = run_job(parse_config(QWEN2_FSDP), out_dir=tmp_path / "single")
    losses, dynamic, fed = ranks[0]
    assert dynamic is True and ranks[1][0] == losses
    torch.testing.assert_close(losses, single.train.losses, rtol=1e-5, atol=0)
    loss, grads = fed[6]
    ref_loss, ref_grads = dh.loss_and_grads(single.module, 6)
    assert sqnr(loss, ref_loss) > 100
    assert min(sqnr(grads[n], ref_grads[n]) for n in ref_grads) > 80
    assert "a global batch of 5 rows does not split evenly over 2" in fed[5]
