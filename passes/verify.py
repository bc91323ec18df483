"""The verify stage: outputs and gradients before vs after each handler, as SQNR in dB.

The graph runs on fixed inputs (given, or random ones derived from the placeholders'
``meta["val"]``) before the plan and after each handler, on a copy of the graph as it
stands (replaced nodes dropped) that shares the parameters. Compared are every output
and, when gradients flow, the parameters' gradients of the scalar loss
``sum_i <output_i, r_i>`` for fixed random ``r_i`` (``torch.autograd.grad``: no ``.grad``
is touched). Buffers the forward mutates are restored.

**The judged SQNR of one value** is ``20·log10(S / ‖x − ref‖)`` with the scale
``S = max(‖ref‖, ν·r·√n)``: ``n`` is the value's number of elements, ``r`` the median over
the tensors of its group (the outputs, or the gradients) of their RMS — the size of a
typical value, which a few very large ones do not move — and ``ν =
10^(−EXACT_SQNR_DB[dtype]/20)`` the relative rounding room of an exact rewrite (1e-4 in
float32). A value whose reference is below the rounding level of its group is judged
against that level, not against itself: a gradient that is zero in exact arithmetic (a
key-projection bias: softmax ignores a per-query constant) is rounding noise in the
reference (norm 2e-12 on a tiny BERT, where the word embeddings' gradient has norm 6), and noise compared with noise
would read as a failure of any rewrite. A value of ordinary size is judged against its
own norm, so a gradient that stops flowing still reads 0 dB.

**Discrete choices are held:** every run compared with the original takes the original's
choices (``topk``, ``max`` / ``min`` along a dim, ``argmax`` / ``argmin``: a
mixture-of-experts router's), and changes that the scores' movement does
not explain are ``numerics`` problems (:mod:`~torchgraft.passes.pinned_choices`).

**Each handler is judged twice** (see :class:`HandlerSqnr`): its *step* (the graph after
it against the graph before it) must reach ``min(tolerance, SQNR of the graph before it)``
— a handler is not blamed for noise earlier handlers left, which later roundings carry
along (see :data:`EXACT_SQNR_DB`) — and *alone* (the handler applied by itself to the
original graph, against the original) it must reach its tolerance: that is the number its
``sqnr_tolerance`` declares. A handler whose ``approximates`` is False computes a different
function on purpose: it is measured and reported, and only needs finite values of the
right shapes.

**A lossy handler's tolerance is calibrated on the model at hand** when it declares an
``op_sqnr_tolerance`` (float8, int8, mx, bitnet do). A declared ``sqnr_tolerance`` is a
model-level number measured on some model; how much of the same per-op error reaches the
outputs and gradients depends on the architecture (Gemma2's post-norms rescale each
quantized branch to unit RMS before the residual add: noise of the same per-op size costs
a tiny Gemma2 4.5-6.3 dB more than a Llama of the same size). So the verify stage runs the
original graph once more with, at each place the handler rewrote alone, the exact values
plus noise of exactly its replacement's error there (forward outputs, and the gradients of
its inputs and parameters with the real cotangent; the error with a random sign per
element: :mod:`~torchgraft.passes.calibrate`). That run's worst judged SQNR is the
*calibrated* SQNR: what the handler's error would cost this model if it were noise. The
handler is then held to ``min(sqnr_tolerance, calibrated - CALIBRATION_MARGIN_DB)`` (step
and alone, as above), and **each rewritten place must reach** ``op_sqnr_tolerance`` on its
own (its replacement against the nodes it replaced, on the same inputs, each value judged
by the rule above within the place) — so a calibration can lower the bar only to what the
format's own error costs here, never for an op that is broken: a wrong scale or a dropped
term fails the per-op tolerance, and a biased error (which adds up across layers, as the
random-signed noise does not) reads below the calibrated SQNR (an offset of 10% of the
output RMS, 19 dB per op: 3.7 dB below on Llama, 4.6 dB on Gemma2). The margin, 3 dB, covers
the spread of one random draw against another: on 6 transformers architectures x 6 formats
x 3 inputs x 4 noise seeds (432 runs), the correct handlers read between 5.5 dB below and
7.2 dB above their calibrated SQNR (1% of them more than 2.6 dB below); judged as above,
none of the 432 is flagged with a 3 dB margin (one with 2 dB), where the fixed tolerances
flag 28 (all Gemma2 with mxfp8, mxfp4 or BitNet). A handler without ``op_sqnr_tolerance``,
a place that cannot be evaluated on its own, or a noisy run that diverges: held to
``sqnr_tolerance`` alone. The calibration costs one more forward and backward of the
graph, the rewritten places evaluated beside the exact ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.fx.experimental.symbolic_shapes import optimization_hint
from torch.utils._pytree import tree_leaves

from torchgraft.ir.choices import CHOICE_OPS
from torchgraft.ir.graph_copy import copy_graph_module
from torchgraft.ir.rewriter import GraphEditor, MatchRecord
from torchgraft.passes.calibrate import NoisyInterpreter, Rewritten, Values, regions, signed_like
from torchgraft.passes.pinned_choices import Chosen, RecordChoices, ReplayChoices
from torchgraft.passes.plan import Step
from torchgraft.passes.problems import Problem

EXACT_SQNR_DB = {
    torch.float64: 150.0,
    torch.float32: 80.0,
    torch.float16: 40.0,
    torch.bfloat16: 30.0,
}
"""Minimum SQNR of a handler with ``sqnr_tolerance = None`` (an exact rewrite), by the
least precise floating dtype compared: room for rounding differences only (a reordered
float32 sum measures 120-140 dB; float16 GEMMs in a float32 model 59 dB).

After lossy handlers, an exact one is held only to the noise they left (the cumulative SQNR
before it): a bit-level change upstream of a low-precision cast flips some of its
roundings, so even an exact rewrite's step SQNR falls toward that noise (measured on the
tiny Llama: 61-69 dB after float16 GEMMs at 58 dB, 140 dB without them)."""

_INDEX_USERS: dict[object, tuple[int, int]] = {
    # op: (argument holding the indices, argument holding the table)
    torch.ops.aten.embedding.default: (1, 0),
    torch.nn.functional.embedding: (0, 1),
}


def random_inputs(gm: fx.GraphModule, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """One random tensor per placeholder, shaped like its ``meta["val"]``.

    Floats are standard normal; integers are uniform in ``[0, high)`` where ``high`` is the
    smallest table the placeholder indexes (``embedding``), else 2; bools are random.
    """
    generator = torch.Generator().manual_seed(seed)
    inputs = []
    for node in gm.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise ValueError(
                f"placeholder '{node.name}' has no tensor meta['val'] to derive a random input from"
            )
        shape = [optimization_hint(d) for d in val.shape]
        if val.dtype.is_floating_point:
            tensor = torch.randn(shape, generator=generator, dtype=val.dtype)
        elif val.dtype == torch.bool:
            tensor = torch.randint(0, 2, shape, generator=generator).bool()
        else:
            tensor = torch.randint(
                0, _index_bound(node), shape, generator=generator, dtype=val.dtype
            )
        inputs.append(tensor.to(val.device))
    return tuple(inputs)


def _index_bound(node: fx.Node) -> int:
    bounds = []
    for user in node.users:
        positions = _INDEX_USERS.get(user.target)
        if positions and len(user.args) > max(positions) and user.args[positions[0]] is node:
            table = user.args[positions[1]]
            if isinstance(table, fx.Node) and isinstance(table.meta.get("val"), torch.Tensor):
                bounds.append(optimization_hint(table.meta["val"].shape[0]))
    return min(bounds, default=2)


@dataclasses.dataclass(frozen=True)
class HandlerSqnr:
    """What the verify stage measured after one handler (judged SQNRs, see the module)."""

    handler: str
    step_db: float
    """Worst SQNR against the graph before this handler; must reach
    ``min(tolerance_db, SQNR of the graph before it)``."""
    total_db: float
    """Worst SQNR against the original graph, all handlers so far applied."""
    worst: str
    """Which value had the worst step SQNR (``output 0``, ``gradient of layers.0.wq.weight``)."""
    tolerance_db: float
    """What the handler is held to (``-inf``: ``approximates = False``, no tolerance)."""
    alone_db: float | None = None
    """Worst SQNR of the handler applied alone to the original graph, against the original;
    must reach ``tolerance_db``. Equal to ``step_db`` for the first handler that changes the
    graph; None when the handler rewrites nothing on its own."""
    declared_db: float | None = None
    """The handler's own tolerance (its ``sqnr_tolerance``; the rounding room of an exact
    rewrite; ``-inf`` for ``approximates = False``). ``tolerance_db`` is lower only when
    calibration lowered it."""
    calibrated_db: float | None = None
    """Worst SQNR of the original graph with noise of the handler's per-op error's size at
    each place it rewrote (:mod:`~torchgraft.passes.calibrate`), against the original; the
    handler is held to ``min(declared_db, calibrated_db - CALIBRATION_MARGIN_DB)``. None
    when not calibrated (no ``op_sqnr_tolerance``, or nothing rewritten alone)."""
    op_db: float | None = None
    """Worst per-op SQNR of the rewritten places, each replacement against the nodes it
    replaced on the same inputs; must reach ``op_tolerance_db``. None when not calibrated."""
    op_worst: str = ""
    """Which place and value had the worst per-op SQNR (``model.layers.0.mlp.up_proj:
    gradient of model.layers.0.mlp.up_proj.weight``)."""
    op_tolerance_db: float | None = None
    """The handler's ``op_sqnr_tolerance``."""
    choices_changed: int | None = None
    """Rows (tokens) whose choice (``topk``, ``max`` along a dim, ``argmax`` ...), e.g. of
    experts, differs after this handler from the original graph's; the comparison holds
    them to the original's (:mod:`~torchgraft.passes.pinned_choices`). None when the graph
    makes no such choice."""


@dataclasses.dataclass(frozen=True)
class _Calibration:
    """The calibration fields of a :class:`HandlerSqnr`."""

    calibrated_db: float
    op_db: float
    op_worst: str
    op_tolerance_db: float


Isolate = Callable[[Step], "Rewritten | None"]
"""Builds the original graph rewritten by one handler alone, with the places it rewrote
(None: it rewrites nothing there)."""

_NOISE_SEED = 10_000
"""Offset of the calibration noise's seed from the verifier's (other random streams)."""

CALIBRATION_MARGIN_DB = 3.0
"""How far below its calibrated SQNR a handler may fall (see the module docstring)."""


class Verifier:
    """Observer of a run that measures SQNR after each handler and reports ``numerics``.

    ``isolate`` (given by the pass manager) applies one handler alone to the original
    graph, so each handler is also judged in isolation (:attr:`HandlerSqnr.alone_db`).
    """

    def __init__(
        self,
        gm: fx.GraphModule,
        inputs: Sequence[torch.Tensor] | None = None,
        seed: int = 0,
        isolate: Isolate | None = None,
    ) -> None:
        self.gm = gm
        self.seed = seed
        self.isolate = isolate
        self.params = [(n, p) for n, p in gm.named_parameters() if p.requires_grad]
        self.buffers = {n: b.detach().clone() for n, b in gm.named_buffers()}
        self.results: dict[str, HandlerSqnr] = {}
        self.problems: list[Problem] = []
        self.reference: Values | None = None
        self.floors: dict[str, float] = {}
        self.choices: list[Chosen] = []
        """The original graph's discrete choices (``topk``, ``max`` along a dim, ``argmax``
        ...) on the inputs, which runs compared with it take
        (:mod:`~torchgraft.passes.pinned_choices`)."""
        self.held: ReplayChoices | None = None
        """The last run's held choices (None: nothing held)."""
        try:
            self.inputs = tuple(inputs) if inputs is not None else random_inputs(gm, seed)
            recorder = RecordChoices()
            has_choices = any(
                graph.find_nodes(op="call_function", target=op)
                for graph in _graphs(gm)
                for op in CHOICE_OPS
            )
            self.reference = self._run(gm, recorder if has_choices else contextlib.nullcontext())
            self.choices = recorder.choices
            self.floors = scale_floors(self.reference)
        except Exception as exc:  # any failure of the user's model on these inputs
            self.problems.append(
                Problem(
                    "numerics",
                    (),
                    None,
                    None,
                    None,
                    f"the graph could not run before rewriting, so nothing was verified: "
                    f"{type(exc).__name__}: {exc}. Give example inputs (PassManager(..., "
                    "inputs=...) or model.inputs in the config)",
                )
            )
        self.original = copy_graph_module(gm)
        """The graph before the plan (its own graph, sharing ``gm``'s parameters)."""
        self.previous = self.reference
        self.total_db = math.inf
        self.changed = False
        """Whether a handler before the current one rewrote anything."""

    def after_handler(self, step: Step, records: list[MatchRecord], editor: GraphEditor) -> None:
        if self.reference is None:
            return
        declared = _tolerance(step, self.reference)
        if not records:  # nothing changed
            self.results[step.name] = HandlerSqnr(
                step.name, math.inf, self.total_db, "", declared, declared_db=declared
            )
            return
        before_db = self.total_db
        after = copy_graph_module(self.gm, editor.is_live)
        try:
            current = self._measure(after, pin=True)
            held = self.held
        except Exception as exc:
            self.problems.append(
                Problem(
                    "numerics",
                    (step.name,),
                    None,
                    None,
                    None,
                    f"the graph no longer runs after '{step.name}': {type(exc).__name__}: {exc}",
                )
            )
            self.reference = None  # later handlers cannot be measured either
            return
        if self.changed:
            isolated = self.isolate(step) if self.isolate is not None else None
            alone = self._alone(isolated)
        else:
            isolated = Rewritten(self.original, after, regions(records, editor))
            alone = current
        self.changed = True
        step_db, worst = _worst(current, self.previous, self.floors)
        self.total_db, _ = _worst(current, self.reference, self.floors)
        alone_db, alone_worst = (
            _worst(alone, self.reference, self.floors) if alone is not None else (None, "")
        )
        calibration = self._calibrate(step, isolated if alone is not None else None)
        tolerance = declared
        if calibration is not None:
            tolerance = min(declared, calibration.calibrated_db - CALIBRATION_MARGIN_DB)
        self.results[step.name] = HandlerSqnr(
            step.name,
            step_db,
            self.total_db,
            worst,
            tolerance,
            alone_db,
            declared,
            **(dataclasses.asdict(calibration) if calibration is not None else {}),
            choices_changed=held.changed if held is not None else None,
        )
        self.previous = current
        kind = _held_to(step, tolerance < declared)
        if not step_db >= min(tolerance, before_db):
            self._problem(
                step,
                f"after '{step.name}' the {worst} has SQNR {step_db:.1f} dB against the graph "
                f"before it (cumulative {self.total_db:.1f} dB), below "
                f"{min(tolerance, before_db):.1f} dB required of {kind}",
            )
        elif alone_db is not None and not alone_db >= tolerance:
            self._problem(
                step,
                f"'{step.name}' applied alone to the original graph gives the {alone_worst} "
                f"SQNR {alone_db:.1f} dB, below {tolerance:.1f} dB required of {kind}",
            )
        if held is not None and held.unexplained:
            self._problem(
                step,
                f"after '{step.name}' {held.unexplained} of the rows a choice op (topk, max, "
                "argmax ...) chooses from (e.g. tokens choosing experts) choose otherwise than the original graph, though "
                "their scores moved too little to explain it: the choice itself changed",
            )
        if calibration is not None and not calibration.op_db >= calibration.op_tolerance_db:
            self._problem(
                step,
                f"'{step.name}' at {calibration.op_worst}: per-op SQNR {calibration.op_db:.1f} dB "
                "(its replacement against the nodes it replaced, on the same inputs), below its "
                f"op_sqnr_tolerance {calibration.op_tolerance_db:.1f} dB",
            )

    def _alone(self, isolated: Rewritten | None) -> Values | None:
        """The values of the original graph rewritten by one handler alone; None if that
        cannot be built or run (the handler may need the ones before it)."""
        if isolated is None:
            return None
        try:
            return self._measure(isolated.after, pin=True)
        except Exception:  # judged on its step only, like a handler that needs others
            return None

    def _calibrate(self, step: Step, isolated: Rewritten | None) -> _Calibration | None:
        """The original graph run with noise of the handler's per-op error at each place it
        rewrote alone, and that per-op error; None for a handler without an
        ``op_sqnr_tolerance``, or when the places cannot be evaluated on their own or the
        noisy run is not finite (the handler is then held to its declared tolerance)."""
        op_tolerance = getattr(step.handler, "op_sqnr_tolerance", None)
        if op_tolerance is None or step.handler.sqnr_tolerance is None or isolated is None:
            return None
        noise = signed_like(torch.Generator().manual_seed(_NOISE_SEED + self.seed))
        try:
            interpreter = NoisyInterpreter(isolated, noise)
            noisy = self._measure(interpreter.run, pin=True)
        except Exception:  # CalibrationUnsupported, or a region that fails on its own
            return None
        calibrated_db, _ = _worst(noisy, self.reference, self.floors)
        if calibrated_db == -math.inf or not interpreter.sites:  # the noise made it diverge
            return None
        op_db, op_worst = math.inf, ""
        for site in interpreter.sites:
            db, what = _worst(site.approximations, site.references, scale_floors(site.references))
            if db < op_db or not op_worst:
                op_db, op_worst = db, f"{site.region.where}: {what}"
        return _Calibration(calibrated_db, op_db, op_worst, float(op_tolerance))

    def _problem(self, step: Step, message: str) -> None:
        self.problems.append(Problem("numerics", (step.name,), None, None, None, message))

    def judge(self, module: nn.Module) -> tuple[float, str]:
        """The worst judged SQNR of ``module``'s outputs and gradients against the reference
        (the graph this verifier was made with) on the same inputs, and what it was
        measured on (``"output 0"``, ``"gradient of ..."``)."""
        return _worst(self._measure(module), self.reference, self.floors)

    def _measure(self, module: Callable[..., Any], pin: bool = False) -> Values:
        """Outputs and gradients of ``module`` on the inputs; with ``pin``, taking the
        original graph's choices where it calls choice ops as the original does."""
        self.held = None
        if not (pin and self.choices):
            return self._run(module, contextlib.nullcontext())
        replay = ReplayChoices(self.choices)
        values = self._run(module, replay)
        if not replay.aligned:  # other choices than the original's: compared as they are
            return self._run(module, contextlib.nullcontext())
        self.held = replay
        return values

    def _run(self, module: Callable[..., Any], mode: contextlib.AbstractContextManager) -> Values:
        try:
            with torch.random.fork_rng(devices=[]), mode:
                torch.manual_seed(self.seed)  # same dropout masks in every run
                return self._values(module(*self.inputs))
        finally:
            with torch.no_grad():
                for name, buffer in self.gm.named_buffers():
                    buffer.copy_(self.buffers[name])

    def _values(self, out: Any) -> Values:
        """The outputs ``out`` and the parameters' gradients of ``sum_i <out_i, r_i>``."""
        leaves = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        values = {f"output {i}": t.detach() for i, t in enumerate(leaves)}
        terms = [(t * self._direction(i, t)).sum() for i, t in enumerate(leaves) if t.requires_grad]
        if terms and self.params:
            grads = torch.autograd.grad(sum(terms), [p for _, p in self.params], allow_unused=True)
            for (name, p), g in zip(self.params, grads):
                values[f"gradient of {name}"] = torch.zeros_like(p) if g is None else g
        return values

    def _direction(self, index: int, t: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + 1 + index)
        return torch.randn(t.shape, generator=generator).to(t.device)


def _tolerance(step: Step, reference: Values) -> float:
    if not step.handler.approximates:
        return -math.inf
    if step.handler.sqnr_tolerance is None:
        return exact_tolerance(reference)
    return float(step.handler.sqnr_tolerance)


def _graphs(gm: fx.GraphModule) -> list[fx.Graph]:
    """``gm``'s graph and those of its graph submodules (the bodies of higher-order ops such
    as a ``torch.no_grad()`` region, which a run executes too)."""
    return [m.graph for m in gm.modules() if isinstance(m, fx.GraphModule)]


def _held_to(step: Step, calibrated: bool) -> str:
    if step.handler.sqnr_tolerance is None:
        return "an exact rewrite (sqnr_tolerance = None)"
    if calibrated:
        return (
            f"its calibrated tolerance (SQNR with noise of its per-op error, less "
            f"{CALIBRATION_MARGIN_DB:g} dB; sqnr_tolerance {step.handler.sqnr_tolerance:g} dB)"
        )
    return "its sqnr_tolerance"


def scale_floors(reference: Values) -> dict[str, float]:
    """Value name → ``ν·r·√n``, the least scale it is judged against (see the module)."""
    groups: dict[str, list[str]] = {}
    for name, ref in reference.items():
        if ref.is_floating_point():
            groups.setdefault(name.split(" ", 1)[0], []).append(name)
    floors = {}
    for names in groups.values():
        rms = statistics.median(
            float(torch.linalg.vector_norm(reference[n].double()))
            / math.sqrt(max(reference[n].numel(), 1))
            for n in names
        )
        for n in names:
            room = 10.0 ** (-EXACT_SQNR_DB.get(reference[n].dtype, 80.0) / 20.0)
            floors[n] = room * rms * math.sqrt(reference[n].numel())
    return floors


def judged_sqnr(x: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    """``20·log10(max(‖ref‖, floor) / ‖x − ref‖)`` in float64: :func:`sqnr` with a least
    scale; ``inf`` when equal, ``-inf`` for a shape mismatch or a non-finite ``x``."""
    if x.shape != ref.shape:
        return -math.inf
    ref64 = ref.detach().to(torch.float64)
    noise = float(torch.linalg.vector_norm(x.detach().to(ref64.device, torch.float64) - ref64))
    if noise == 0.0:
        return math.inf
    signal = max(float(torch.linalg.vector_norm(ref64)), floor)
    if not math.isfinite(noise) or signal == 0.0:
        return -math.inf
    return 20.0 * math.log10(signal / noise)


def _worst(current: Values, reference: Values, floors: dict[str, float]) -> tuple[float, str]:
    worst, what = math.inf, ""
    for name, ref in reference.items():
        x = current.get(name)
        value = -math.inf if x is None else judged_sqnr(x, ref, floors.get(name, 0.0))
        if math.isnan(value):
            value = -math.inf
        if value < worst or not what:
            worst, what = value, name
    return worst, what


def exact_tolerance(reference: Values) -> float:
    dtypes = [t.dtype for t in reference.values() if t.is_floating_point()]
    return min((EXACT_SQNR_DB.get(d, 80.0) for d in dtypes), default=80.0)


def verify_stage(
    gm: fx.GraphModule,
    module: nn.Module,
    steps: Sequence[Step],
    what: str,
    inputs: Sequence[torch.Tensor] | None = None,
) -> list[Problem]:
    """``numerics``: ``module`` (``gm``'s step rewritten by a later stage's handlers
    ``steps``: the joint step, the compiled step) against ``gm``'s eager step on the same
    inputs (default: random ones), outputs and parameter gradients, held to the handlers'
    tightest ``sqnr_tolerance`` (exact-rewrite rounding room when none declares one).
    ``what`` names the step in the message (``"joint step"``)."""
    verifier = Verifier(gm, inputs)
    if verifier.reference is None:
        return verifier.problems
    db, worst = verifier.judge(module)
    declared = [s.handler.sqnr_tolerance for s in steps]
    declared = [t for t in declared if t is not None]
    tolerance = min(declared) if declared else exact_tolerance(verifier.reference)
    if db >= tolerance:
        return []
    names = tuple(s.name for s in steps)
    return [
        Problem(
            "numerics",
            names,
            None,
            None,
            None,
            f"the {what} rewritten by {', '.join(repr(n) for n in names)} gives the {worst} "
            f"an SQNR of {db:.1f} dB against the captured graph's eager step, below the "
            f"{tolerance:.1f} dB required",
        )
    ]
