"""The ``joint`` stage: rules over the joint forward + backward ATen graph of the step.

:class:`JointModule` runs a captured graph module's training step through AOTAutograd
(``aot_module_simplified``): on the first call it traces forward and backward into one
ATen graph (``primals`` = parameters, buffers and inputs, ``tangents`` = output
gradients), with the ops undecomposed as ATen's autograd formulas emit them (the
backward of ``silu`` is ``aten.silu_backward``, of a linear two ``aten.mm``). The plan's
``joint``-stage handlers rewrite that graph with the same rule machinery as the forward
graph (one transaction, provenance, ``no_match`` / ``clobber`` checks) and may set the
partitioner's save-or-recompute policy per forward node
(:meth:`~torchgraft.Handler.activation_policy`). The min-cut partitioner then splits it
into forward and backward graphs, run eagerly as one ``autograd.Function``.

The module has the captured graph's parameters and buffers, the same objects under the
same FQNs, so optimizers, checkpoints and hooks see the model's own. The step is traced
for the first call's shapes (the captured graph's are static too); another shape raises.
Backward nodes carry the forward module's FQN (``fwd_nn_module_stack``), which is copied
to ``nn_module_stack`` so ``include`` / ``exclude`` / ``where`` filters and provenance work
on them as on forward nodes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from functorch.compile import make_boxed_func
from torch import fx, nn
from torch._functorch.aot_autograd import aot_module_simplified
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import CheckpointPolicy

if TYPE_CHECKING:
    from torchgraft.passes.manager import PassManager

from torchgraft.ir.graph_copy import copy_graph_module
from torchgraft.passes.plan import Step
from torchgraft.passes.problems import CheckError, Problem
from torchgraft.passes.report import Report
from torchgraft.passes.stages import backward_module_stacks, policy_handler, stage_names
from torchgraft.passes.verify import verify_stage

_POLICIES = {"save": CheckpointPolicy.MUST_SAVE, "recompute": CheckpointPolicy.MUST_RECOMPUTE}


class JointModule(nn.Module):
    """A graph module whose training step runs through its rewritten joint graph.

    ``rewrite(joint)`` applies the joint-stage handlers to the traced joint graph in place
    and returns their report, which is merged into ``report`` when the step is traced.
    """

    def __init__(
        self,
        gm: fx.GraphModule,
        rewrite: Callable[[fx.GraphModule], Report],
        steps: list[Step],
        report: Report,
    ) -> None:
        super().__init__()
        for name, child in gm.named_children():
            self.add_module(name, child)
        for name, param in gm._parameters.items():
            self.register_parameter(name, param)
        for name, buffer in gm._buffers.items():
            self.register_buffer(name, buffer)
        codegen = gm.graph._codegen
        self._out_spec = getattr(getattr(codegen, "pytree_info", None), "out_spec", None)
        self.__dict__["_flat"] = _flat_outputs(gm)  # not a submodule: no second FQN prefix
        self._rewrite, self.steps, self.report = rewrite, steps, report
        self._compiled: Callable[..., Any] | None = None
        self._shapes: list[tuple[int, ...]] | None = None
        self.joint_before: fx.GraphModule | None = None
        """The joint graph as traced, before the joint-stage handlers (for the tools)."""
        self.joint_graph: fx.GraphModule | None = None
        """The rewritten joint graph, once traced (for inspection)."""
        self.partitioned: tuple[fx.GraphModule, fx.GraphModule] | None = None
        """The forward and backward graphs the partitioner made of it."""

    def forward(self, *args: Any) -> Any:
        flat = pytree.arg_tree_leaves(*args)
        shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in flat]
        if self._compiled is None:
            self._shapes = shapes
            self._compiled = aot_module_simplified(
                self._flat,
                flat,
                fw_compiler=self._keep,
                bw_compiler=self._keep,
                partition_fn=self._partition,
            )
        elif shapes != self._shapes:
            raise ValueError(
                f"the joint step was traced for inputs {self._shapes} and is called with "
                f"{shapes}; capture and convert again for other shapes"
            )
        outputs = list(self._compiled(*flat))
        if self._out_spec is not None:
            return pytree.tree_unflatten(outputs, self._out_spec)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    @staticmethod
    def _keep(gm: fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
        return make_boxed_func(gm.forward)

    def _partition(
        self, joint: fx.GraphModule, joint_inputs: Any, **kwargs: Any
    ) -> tuple[fx.GraphModule, fx.GraphModule]:
        backward_module_stacks(joint.graph)
        self.__dict__["joint_before"] = copy_graph_module(joint)  # for the tools
        stage_report = self._rewrite(joint)
        stage_report.stages = {}
        policies, problems = _apply_policies(joint, self.steps)
        for name, count in policies.items():
            stage_report.rule_matches.setdefault(name, {})["activation_policy"] = count
        stage_report.problems += problems
        joint.graph.eliminate_dead_code()
        joint.recompile()
        self.report.merge(stage_report)
        self.__dict__["joint_graph"] = joint  # not a submodule: state_dict stays the model's
        self.partitioned = min_cut_rematerialization_partition(joint, joint_inputs, **kwargs)
        return self.partitioned


def _flat_outputs(gm: fx.GraphModule) -> fx.GraphModule:
    """A graph module sharing ``gm``'s parameters whose forward takes the flat inputs and
    returns the flat outputs as a tuple (what AOTAutograd traces)."""
    graph = copy.deepcopy(gm.graph)
    graph.set_codegen(fx.graph.CodeGen())
    for node in list(graph.nodes):
        if node.op == "call_module" and not node.users:  # export's input guards
            graph.erase_node(node)
    output = graph.output_node()
    if not isinstance(output.args[0], (tuple, list)):
        output.args = ((output.args[0],),)
    return fx.GraphModule(gm, graph)


def _apply_policies(
    joint: fx.GraphModule, steps: list[Step]
) -> tuple[dict[str, int], list[Problem]]:
    """Ask each step's ``activation_policy`` about every forward op node (one that does not
    depend on a tangent) and tag it for the partitioner; the first handler with an opinion
    wins. Returns the tags per handler, and a ``no_match`` problem per non-optional handler
    that tagged nothing."""
    deciders = [s for s in steps if policy_handler(s.handler)]
    counts = {s.name: 0 for s in deciders}
    backward: set[fx.Node] = set()
    for node in joint.graph.nodes:
        if (node.op == "placeholder" and "tangents" in node.name) or any(
            a in backward for a in node.all_input_nodes
        ):
            backward.add(node)
    for node in joint.graph.nodes:
        if node.op != "call_function" or node in backward or not deciders:
            continue
        for step in deciders:
            policy = step.handler.activation_policy(node)
            if policy is None:
                continue
            if policy not in _POLICIES:
                raise ValueError(
                    f"handler '{step.name}'.activation_policy returned {policy!r} for node "
                    f"'{node.name}'; expected 'save', 'recompute' or None"
                )
            node.meta["recompute"] = _POLICIES[policy]
            node.meta["ac_graph_id"] = 1
            counts[step.name] += 1
            break
    problems = [
        Problem(
            "no_match",
            (step.name,),
            "activation_policy",
            None,
            step.source,
            f"handler '{step.name}' (stage 'joint') set the policy of no forward node. Mark it "
            f"optional ({{{step.name}: {{optional: true}}}}) if that is expected",
        )
        for step in deciders
        if not counts[step.name] and not step.optional
    ]
    return counts, problems


def verify_joint(
    gm: fx.GraphModule, step: JointModule, inputs: Sequence[torch.Tensor] | None = None
) -> list[Problem]:
    """``numerics``: the joint step's outputs and parameter gradients against ``gm``'s
    eager step (:func:`~torchgraft.passes.verify.verify_stage`). Traces ``step`` if it was
    not yet called."""
    return verify_stage(gm, step, step.steps, "joint step", inputs)


def check_joint(pm: PassManager, gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> Report:
    """What ``torchgraft check`` does for the joint stage: convert ``gm`` (a fresh capture)
    with the graph stage, trace its joint step on ``inputs`` and verify it. Returns the
    joint handlers' matches with every problem found (``no_match``, ``clobber``,
    ``numerics``)."""
    graph_report = pm.run(gm)
    report = Report(order=graph_report.order, stages=graph_report.stages)
    try:  # a verifying manager checks the numerics itself, and raises
        step = pm.joint_module(gm, report)
        report.problems += [] if pm.verify else verify_joint(gm, step, inputs)
    except CheckError as exc:
        report.problems += exc.problems
    return report


def joint_step(pm: PassManager, gm: fx.GraphModule, report: Report | None = None) -> nn.Module:
    """:meth:`PassManager.joint_module`: the :class:`JointModule` of ``pm``'s joint-stage
    handlers over ``gm`` (verified at once when ``pm.verify``), or ``gm`` without them."""
    if pm.problems:
        raise CheckError(pm.problems)
    steps = pm.stage_steps("joint")
    if not steps:
        return gm
    if report is None:
        report = Report(order=pm.order, stages=stage_names(pm.steps))
    step = JointModule(gm, lambda joint: pm.rewrite_stage(joint, "joint"), steps, report)
    if pm.verify:  # trace now and compare with gm's eager step
        problems = verify_joint(gm, step, pm.inputs)
        if problems:
            raise CheckError(problems)
    return step


def dump_joint(step: JointModule, out_dir: str | Path) -> list[Path]:
    """Write the traced step's rewritten joint graph and the forward / backward graphs the
    partitioner made of it (``joint.py``, ``joint_forward.py``, ``joint_backward.py``) to
    ``out_dir``; nothing before the step was traced. Returns the files written."""
    if step.joint_graph is None or step.partitioned is None:
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    graphs = {
        "joint": step.joint_graph,
        **dict(zip(("joint_forward", "joint_backward"), step.partitioned)),
    }
    paths = []
    for name, graph in graphs.items():
        path = out / f"{name}.py"
        path.write_text(graph.code.strip() + "\n", encoding="utf-8")
        paths.append(path)
    return paths
