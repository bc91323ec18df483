"""The pass manager: orders a plan of handlers, checks it, and applies it as one transaction."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn

from torchgraft.handlers.base import Handler
from torchgraft.handlers.options import OptionError
from torchgraft.ir.errors import RewriteError
from torchgraft.ir.graph_copy import copy_graph_module
from torchgraft.ir.pattern import target_name
from torchgraft.ir.rewriter import GraphEditor, RuleApplier
from torchgraft.passes.calibrate import Rewritten, regions
from torchgraft.passes.checks import (
    ClobberCheck,
    NoMatchCheck,
    Observer,
    OrderCheck,
    find_overlaps,
    find_unmatched_filters,
)
from torchgraft.passes.module_stage import convert_module
from torchgraft.passes.ordering import order_plan
from torchgraft.passes.plan import HandlerEntry, HandlerSpec, Step, build_plan, instantiate
from torchgraft.passes.problems import CheckError, Problem, allowed_kinds, error_problem
from torchgraft.passes.report import CheckResult, Report
from torchgraft.passes.stages import claim_problems, schedule_problems, split_stages, stage_names
from torchgraft.passes.verify import Verifier

__all__ = ["HandlerSpec", "PassManager", "instantiate", "op_histogram"]


class PassManager:
    """Orders a plan of handlers, checks it, and applies it to a captured graph.

    The plan is a list of handler names, ``{name: {option: value}}`` (the reserved key
    ``optional: true`` allows the handler to match nothing), handler instances or classes.
    The run order follows the handlers' ``requires`` / ``after`` / ``before``
    declarations, ties kept in the plan's order. Example::

        gm = tg.capture(model, (tokens,))
        pm = tg.PassManager(["flex_attention", {"float8": {"skip_fqns": ["output"]}}])
        problems = pm.check(gm)       # every check, on a copy: gm is not changed
        report = pm.run(gm)           # rewrites gm in place, all or nothing
        report.matches                # {"flex_attention": 2, "float8": 14}

    :meth:`check` and :meth:`run` are one judge: :meth:`run` refuses (:class:`CheckError`,
    ``gm`` unchanged) exactly the problems :meth:`check` reports, except the kinds listed
    in ``allow`` (e.g. ``allow=["overlap"]``; see
    :func:`~torchgraft.passes.problems.acceptable_kinds`), which stay in the report.
    ``verify=True`` makes :meth:`run` measure outputs and gradients after each handler on
    ``inputs`` (default: random inputs shaped like the graph's placeholders), so that
    ``numerics`` problems are found by it too; :meth:`check` always verifies.
    """

    def __init__(
        self,
        handlers: Sequence[HandlerSpec] | HandlerSpec,
        *,
        verify: bool = False,
        inputs: Sequence[torch.Tensor] | None = None,
        allow: Sequence[str] = (),
    ) -> None:
        if isinstance(handlers, (str, Mapping, Handler, HandlerEntry, type)):
            handlers = [handlers]
        steps, problems = build_plan(handlers)
        self.ordering = order_plan(steps)
        self.steps = self.ordering.steps
        self.problems: list[Problem] = (
            problems + self.ordering.problems + schedule_problems(self.steps)
        )
        """What is wrong with the plan itself: :meth:`run` refuses to run while non-empty."""
        self.stages = split_stages(self.ordering)
        """Stage → the ordering of that stage's handlers (stages the plan uses, flow order)."""
        self.verify = verify
        self.inputs = inputs
        self.allow = allowed_kinds(allow)
        """Problem kinds this plan accepts: reported, but they neither fail :meth:`check`
        nor stop :meth:`run`."""

    @property
    def handlers(self) -> list[Handler]:
        """The built handlers, in run order."""
        return [step.handler for step in self.steps]

    @property
    def order(self) -> list[str]:
        """Handler names in run order."""
        return self.ordering.names

    def stage_steps(self, stage: str) -> list[Step]:
        """The plan's steps that run at ``stage``, in run order."""
        return self.stages[stage].steps if stage in self.stages else []

    def run(self, gm: fx.GraphModule) -> Report:
        """Rewrite ``gm`` in place; if anything raises, ``gm`` is left exactly as it was.

        Raises :class:`CheckError` before touching ``gm`` if the plan itself has problems
        (``pm.problems``), and, with ``gm`` rolled back, if the run finds a problem
        :meth:`check` would report (``overlap``, ``order``, ``no_match``, ``clobber``,
        ``numerics`` when ``verify=True`` ...) whose kind is not in ``allow``. Allowed
        problems are in ``report.problems``.
        """
        if self.problems:
            raise CheckError(self.problems)
        verifier = None
        if self.verify:
            original = copy_graph_module(gm) if len(self.steps) > 1 else gm
            verifier = Verifier(gm, self.inputs, isolate=self._isolator(original))
        unverifiable = self._refused(verifier.problems) if verifier is not None else []
        if unverifiable:  # the graph does not run on the inputs: nothing to rewrite
            raise CheckError(unverifiable)
        report = self._judged(gm, verifier, gate=True)
        report.skipped = {step.name: step.handler.skipped(gm) for step in self.stage_steps("graph")}
        report.seconds["recompile"] = _timed(gm.recompile)
        return report

    def convert_module(self, model: nn.Module) -> Report:
        """Run the plan's ``module``-stage handlers on the eager ``model``, in place, before
        capture; if one raises, ``model``'s submodules and parameters are put back. The
        report counts the submodules each replaced or added (:mod:`~torchgraft.passes.module_stage`);
        merge it into the graph run's with :meth:`Report.merge`. Example::

            pm = tg.PassManager([{"lora": {"targets": ["layers.*.attention.w*"]}}, "float8"])
            module_report = pm.convert_module(model)   # LoRA adapters, eager
            gm = tg.capture(model, (tokens,))
            report = pm.run(gm).merge(module_report)   # float8 on the captured graph
        """
        if self.problems:
            raise CheckError(self.problems)
        report = Report(order=self.order, stages=stage_names(self.steps))
        convert_module(model, self.stage_steps("module"), report)
        return report

    def joint_module(self, gm: fx.GraphModule, report: Report | None = None) -> nn.Module:
        """``gm``'s training step run through its joint forward + backward graph, which the
        plan's ``joint``-stage handlers rewrite when it is traced, on the first call
        (:class:`~torchgraft.passes.joint.JointModule`); their matches are merged into
        ``report`` then. Same parameters (objects and FQNs) as ``gm``; ``gm`` is not
        changed. With ``verify=True`` the step is traced at once and its outputs and
        gradients compared with ``gm``'s (:func:`~torchgraft.passes.joint.verify_joint`;
        :class:`CheckError` below tolerance). Without joint-stage handlers: ``gm`` itself.
        Example::

            report = pm.run(gm)
            step = pm.joint_module(gm, report)
            step(tokens, labels).backward()      # report.matches now has the joint handlers
        """
        from torchgraft.passes.joint import joint_step

        return joint_step(self, gm, report)

    def compile_module(
        self,
        module: nn.Module,
        report: Report | None = None,
        *,
        rewrite: Callable[[fx.GraphModule], Report] | None = None,
        **compile_kwargs: Any,
    ) -> nn.Module:
        """``torch.compile(module)`` with the plan's ``compile``-stage handlers installed as
        Inductor's post-grad custom pass for this compile, composed with a pass the user
        already installed (:mod:`~torchgraft.passes.compile_stage`); their matches are
        merged into ``report`` whenever Inductor compiles a graph (not on an FX graph
        cache hit). Without compile-stage handlers it is a plain ``torch.compile``.
        ``rewrite(graph_module)`` replaces how each post-grad graph is rewritten (default:
        :meth:`rewrite_stage`); ``--dump-ir`` passes one that also writes the graphs."""
        from torchgraft.passes.compile_stage import compile_with_stage

        return compile_with_stage(self, module, report, rewrite=rewrite, **compile_kwargs)

    def rewrite_stage(
        self, gm: fx.GraphModule, stage: str, *, no_match: bool = True, judged: bool = False
    ) -> Report:
        """Apply one stage's handlers to ``gm`` in place as one transaction (no verify),
        with the clobber and (``no_match``) no-match checks; the caller recompiles. Used by
        the joint and compile stages on the graphs they are handed. ``judged`` adds the
        checks that compare the stage's handlers, as ``check`` runs them on the graph stage:
        ``overlap`` (on ``gm`` before the rewrite) and ``order``. The compile stage is handed
        several graphs (forward, backward) and passes ``no_match=False``: a handler may
        match in only one of them (:mod:`~torchgraft.passes.compile_capture` counts them)."""
        checks: list[Observer] = [ClobberCheck(self.ordering)]
        checks += [NoMatchCheck()] if no_match else []
        static = []
        if judged and stage in self.stages:
            static = find_overlaps(gm.graph, self.stages[stage])
            checks.insert(0, OrderCheck(self.ordering))
        report = self._apply(gm, checks, stage=stage)
        report.problems = static + [p for check in checks for p in check.problems]
        return report

    def check(
        self, gm: fx.GraphModule, inputs: Sequence[torch.Tensor] | None = None
    ) -> list[Problem]:
        """Every problem of this plan on ``gm`` that ``allow`` does not accept; ``gm`` is not
        changed. See :meth:`dry_run`."""
        return self.dry_run(gm, inputs).problems

    def dry_run(
        self, gm: fx.GraphModule, inputs: Sequence[torch.Tensor] | None = None
    ) -> CheckResult:
        """Run every check on a copy of ``gm`` (sharing its parameters) and say what the plan
        would do: order, matches per handler and rule, the op histogram after the run, and
        the problems (see :data:`~torchgraft.passes.problems.ProblemKind`), numerics
        verified on ``inputs`` (default: the manager's, else random ones). Problems of a
        kind in ``allow`` are in ``result.allowed``, not ``result.problems``.

        Plan problems (unknown handler, bad option, duplicate, missing requirement, cycle)
        are returned alone: such a plan cannot run.
        """
        if self.problems:
            return CheckResult(self.order, list(self.problems))
        work = copy_graph_module(gm)
        verifier = Verifier(
            work, inputs if inputs is not None else self.inputs, isolate=self._isolator(gm)
        )
        try:
            report = self._judged(work, verifier, gate=False)
        except (RewriteError, OptionError) as exc:  # the plan fails on this graph
            return CheckResult(self.order, [error_problem(exc)])
        problems = self._refused(report.problems)
        allowed = [p for p in report.problems if p.kind in self.allow]
        report.problems = []
        return CheckResult(self.order, problems, report, op_histogram(work.graph), allowed)

    def _isolator(self, original: fx.GraphModule) -> Callable[[Step], Rewritten | None]:
        """For the verifier: ``original`` (the graph before the plan, not changed) rewritten
        by one handler alone, as a copy, with the places it rewrote (for the calibration);
        None if the handler rewrites nothing there alone (or fails there: it may need the
        handlers before it)."""

        def alone(step: Step) -> fx.GraphModule | None:
            work = copy_graph_module(original)
            editor = GraphEditor(work.graph)
            applier = RuleApplier(editor)
            try:
                records = [
                    record
                    for rule in step.handler.rules()
                    for record in applier.apply(rule, step.handler, step.name)
                ]
            except (RewriteError, OptionError):
                return None
            if not records:
                return None
            return Rewritten(
                original, copy_graph_module(work, editor.is_live), regions(records, editor)
            )

        return alone

    def _refused(self, problems: list[Problem]) -> list[Problem]:
        return [p for p in problems if p.kind not in self.allow]

    def _judged(self, gm: fx.GraphModule, verifier: Verifier | None, *, gate: bool) -> Report:
        """Apply the plan with every check watching; ``report.problems`` holds all they found
        (``overlap`` first, found on the graph before the run). With ``gate``, refuse the
        problems ``allow`` does not accept: roll back and raise :class:`CheckError`."""
        static = find_overlaps(gm.graph, self.stages["graph"]) if "graph" in self.stages else []
        static += find_unmatched_filters(gm.graph, self.steps)
        static += claim_problems(self.steps, gm)
        checks: list[Observer] = [
            OrderCheck(self.ordering),
            ClobberCheck(self.ordering),
            NoMatchCheck(),
        ]
        observers = [*checks, verifier] if verifier is not None else checks

        def found() -> list[Problem]:
            return static + [p for observer in observers for p in observer.problems]

        refuse = (lambda: self._refused(found())) if gate else None
        report = self._apply(gm, observers, refuse)
        report.problems = found()
        if verifier is not None:
            report.sqnr = verifier.results
        return report

    def _apply(
        self,
        gm: fx.GraphModule,
        observers: list[Observer],
        refuse: Callable[[], list[Problem]] | None = None,
        *,
        stage: str = "graph",
    ) -> Report:
        """Apply the plan's ``stage`` handlers in one transaction, calling the observers
        after each handler. Roll back if anything raises, or if ``refuse`` returns problems
        before the commit."""
        editor = GraphEditor(gm.graph)
        applier = RuleApplier(editor)
        report = Report(order=self.order, stages=stage_names(self.steps))
        try:
            for step in self.stage_steps(stage):
                start = time.perf_counter()
                counts = report.rule_matches.setdefault(step.name, {})
                records = []
                for rule in step.handler.rules():
                    applied = applier.apply(rule, step.handler, step.name)
                    counts[rule.name] = counts.get(rule.name, 0) + len(applied)
                    records.extend(applied)
                report.seconds[step.name] = time.perf_counter() - start
                report.records.extend(records)
                for observer in observers:
                    observer.after_handler(step, records, editor)
            refused = refuse() if refuse is not None else []
            if refused:
                raise CheckError(refused)
            editor.commit()
        except BaseException:
            editor.rollback()
            raise
        return report


def op_histogram(graph: fx.Graph) -> dict[str, int]:
    """Op name → number of nodes calling it, sorted by name."""
    counts = Counter(
        target_name(n) for n in graph.nodes if n.op in ("call_function", "call_method")
    )
    return dict(sorted(counts.items()))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
