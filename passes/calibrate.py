"""Noise calibration: what a lossy handler's own per-op error costs on this model.

A lossy handler (float8, MX, ...) approximates each op it rewrites with some local error;
how much of it reaches the model's outputs and gradients depends on the model: a residual
stream dilutes each branch's noise, a norm after a branch (Gemma2's post-norms) rescales
it back to unit size. :class:`NoisyInterpreter` measures that amplification: it runs the
graph *before* the handler, and at each rewritten place (a :class:`Region`) computes both
the matched nodes (exact) and the handler's replacement on the same inputs, and passes on
the exact values plus **random noise of exactly the replacement's error norm** — in the
forward at the region's outputs, in the backward at the gradient of each of its inputs
(activations and parameters), measured there with the real cotangent. The noise is the
replacement's error with a random sign per element (the same size, element by element,
but no systematic part: no bias, no correlation with the signal or across layers). The
model-level SQNR of that run is what the handler's error would cost if it were noise;
the per-region pairs (replacement, exact) are its local error, which the verify stage
holds to the handler's ``op_sqnr_tolerance`` (see :mod:`torchgraft.passes.verify`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import fx
from torch.fx.node import map_arg
from torch.utils._pytree import tree_leaves

from torchgraft.ir.matcher import is_assertion
from torchgraft.ir.rewriter import GraphEditor, MatchRecord

Values = dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Region:
    """One applied match: the nodes it replaced (in the graph before the handler) and the
    nodes its replacement created (in the graph after)."""

    where: str
    """The module FQN (else the anchor's name), for messages."""
    replaced: tuple[str, ...]
    created: tuple[str, ...]
    stand_ins: dict[str, str]
    """Created node → the replaced output it stands for."""


@dataclasses.dataclass(frozen=True)
class Rewritten:
    """A graph before and after one handler, and where the handler rewrote it."""

    before: fx.GraphModule
    after: fx.GraphModule
    regions: tuple[Region, ...]


def regions(records: Iterable[MatchRecord], editor: GraphEditor) -> tuple[Region, ...]:
    """The regions of ``records``, applied through ``editor`` (before its commit)."""
    nodes = {n.name: n for n in editor.graph.nodes}
    found = []
    for record in records:
        stand_ins = {}
        for name in record.replaced:
            stand_in = editor.resolve(nodes[name])
            if stand_in is not nodes[name]:
                stand_ins[stand_in.name] = name
        where = record.module_fqn or record.anchor
        found.append(Region(where, tuple(record.replaced), tuple(record.created), stand_ins))
    return tuple(found)


class CalibrationUnsupported(Exception):
    """The rewritten places cannot be evaluated on their own (the handler is then held to
    its declared tolerance only)."""


@dataclasses.dataclass
class _Site:
    """One region in the noisy run: evaluates its exact nodes and their replacement."""

    region: Region
    exact: Callable[[Sequence[Any]], list[Any]]
    approx: Callable[[Sequence[Any]], list[Any]]
    noise: Callable[[torch.Tensor], torch.Tensor]
    inputs: list[str]
    """Names of the boundary values (parameter FQNs, ``input 'node'``), for messages."""
    approximations: Values = dataclasses.field(default_factory=dict)
    references: Values = dataclasses.field(default_factory=dict)

    def record(self, what: str, approx: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
        """Remember the local pair; return the exact value plus noise of the error's size."""
        approx, exact = approx.detach(), exact.detach()
        self.approximations[what], self.references[what] = approx, exact
        return exact + self.noise(approx - exact)


class _NoisyRegion(torch.autograd.Function):
    """The exact region, plus noise of the replacement's error, forward and backward. Both
    are traced once, in the forward, on local copies of the inputs; the backward takes their
    gradients with the real cotangent."""

    @staticmethod
    def forward(ctx, site: _Site, *inputs: Any) -> tuple[torch.Tensor, ...]:
        ctx.site = site
        ctx.wanted = [i for i, v in enumerate(inputs) if ctx.needs_input_grad[1 + i]]
        with torch.enable_grad():
            local = [
                v.detach().requires_grad_() if i in ctx.wanted else v for i, v in enumerate(inputs)
            ]
            ctx.exact = site.exact(local)  # draws random numbers as the original does
            with torch.random.fork_rng(devices=[]):  # the replacement's draws: not counted
                ctx.approx = site.approx(local)
        ctx.leaves = [local[i] for i in ctx.wanted]
        return tuple(
            site.record(f"output {i}", a, e) for i, (e, a) in enumerate(zip(ctx.exact, ctx.approx))
        )

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple[Any, ...]:
        site = ctx.site
        exact = _grads(ctx.exact, ctx.leaves, grads)
        approx = _grads(ctx.approx, ctx.leaves, grads)
        out: list[Any] = [None] * (1 + len(site.inputs))
        for i, e, a in zip(ctx.wanted, exact, approx):
            out[1 + i] = site.record(f"gradient of {site.inputs[i]}", a, e)
        return tuple(out)


def _grads(
    outputs: list[torch.Tensor], leaves: list[torch.Tensor], grads: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """``d<outputs, grads>/d leaves`` (zeros where a leaf is unused)."""
    if not leaves:
        return []
    pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
    found = torch.autograd.grad(
        [o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True
    )
    return [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, found)]


def signed_like(generator: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor]:
    """Noise of the calibration: ``error`` with an independent random sign per element."""

    def noise(error: torch.Tensor) -> torch.Tensor:
        if not error.is_floating_point():
            return torch.zeros_like(error)
        signs = torch.randint(0, 2, error.shape, generator=generator, dtype=error.dtype)
        return error * (2 * signs.to(error.device) - 1)

    return noise


class NoisyInterpreter(fx.Interpreter):
    """Runs ``rewritten.before`` with each region computed by :class:`_NoisyRegion`
    (raises :class:`CalibrationUnsupported` for a region it cannot evaluate alone)."""

    def __init__(self, rewritten: Rewritten, noise: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__(rewritten.before)
        last_uses = self.user_to_last_uses
        before = {n.name: n for n in rewritten.before.graph.nodes}
        after = {n.name: n for n in rewritten.after.graph.nodes}
        stand_ins = {c: r for region in rewritten.regions for c, r in region.stand_ins.items()}
        approx_interpreter = fx.Interpreter(rewritten.after)
        self.sites: list[_Site] = []
        self._last: dict[fx.Node, tuple[_Site, list[fx.Node], list[fx.Node]]] = {}
        self._skipped: set[fx.Node] = set()
        for region in rewritten.regions:
            try:
                replaced = sorted(before[n] for n in region.replaced)
                created = [after[n] for n in region.created]
                approx_outputs = [c for c in created if c.name in region.stand_ins]
                outputs = [before[region.stand_ins[c.name]] for c in approx_outputs]
                approx_inputs = _inputs(created)
                sources = [before[stand_ins.get(n.name, n.name)] for n in approx_inputs]
            except KeyError as exc:
                raise CalibrationUnsupported(f"node {exc} is in one graph only") from exc
            exact_inputs = _inputs(replaced)
            boundary = list(dict.fromkeys([*exact_inputs, *sources]))
            index = {node: i for i, node in enumerate(boundary)}
            _check_order(replaced, outputs)
            site = _Site(
                region,
                _evaluator(self, replaced, outputs, [(n, index[n]) for n in exact_inputs]),
                _evaluator(
                    approx_interpreter,
                    created,
                    approx_outputs,
                    [(n, index[s]) for n, s in zip(approx_inputs, sources)],
                ),
                noise,
                [str(n.target) if n.op == "get_attr" else f"input '{n.name}'" for n in boundary],
            )
            self.sites.append(site)
            self._last[replaced[-1]] = (site, boundary, outputs)
            for node in replaced[:-1]:  # what they read last is read at the region's end
                last_uses.setdefault(replaced[-1], []).extend(last_uses.pop(node, []))
            self._skipped.update(replaced)
            self._skipped.update(u for n in replaced for u in n.users if is_assertion(u))

    def run_node(self, n: fx.Node) -> Any:
        if n not in self._skipped:
            return super().run_node(n)
        if n not in self._last:
            return None  # computed with its region, at the region's last node
        site, boundary, outputs = self._last[n]
        values = [self.env[b] for b in boundary]
        if any(
            isinstance(v, (list, tuple, dict))
            and any(isinstance(t, torch.Tensor) for t in tree_leaves(v))
            for v in values
        ):
            # their gradients would not flow through the region (and read as lost)
            raise CalibrationUnsupported(f"region '{site.region.where}' reads a container")
        results = _NoisyRegion.apply(site, *values)
        for out, value in zip(outputs, results):
            self.env[out] = value
        return self.env.get(n)


def _inputs(nodes: list[fx.Node]) -> list[fx.Node]:
    inner = set(nodes)
    return list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a not in inner))


def _check_order(replaced: list[fx.Node], outputs: list[fx.Node]) -> None:
    """The region is computed at its last node: nothing outside may read it earlier."""
    inner, last = set(replaced), replaced[-1]
    for out in outputs:
        for user in out.users:
            if user not in inner and not is_assertion(user) and user < last:
                raise CalibrationUnsupported(f"'{user.name}' reads '{out.name}' inside its region")
    if not outputs:
        raise CalibrationUnsupported("the region has no output")


def _evaluator(
    interpreter: fx.Interpreter,
    nodes: list[fx.Node],
    outputs: list[fx.Node],
    bindings: list[tuple[fx.Node, int]],
) -> Callable[[Sequence[Any]], list[Any]]:
    """``nodes`` of ``interpreter``'s graph evaluated on the region's boundary values (input
    node → its index there); the values of ``outputs``."""

    def evaluate(values: Sequence[Any]) -> list[Any]:
        env: dict[fx.Node, Any] = {node: values[i] for node, i in bindings}
        for node in nodes:
            args, kwargs = map_arg((node.args, node.kwargs), env.__getitem__)
            env[node] = getattr(interpreter, node.op)(node.target, args, kwargs)
        found = [env[o] for o in outputs]
        if not all(isinstance(v, torch.Tensor) for v in found):
            raise CalibrationUnsupported("a region output is not a tensor")
        return found

    return evaluate
