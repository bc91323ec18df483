"""Apply matches to a graph as one transaction.

Edits go through a :class:`GraphEditor` that journals them: new nodes are inserted, the
uses of each replaced output are moved to its replacement, and replaced nodes are only
*retired* (skipped by later matching) until :meth:`GraphEditor.commit` erases them. If
anything raises before that, :meth:`GraphEditor.rollback` moves the uses back and erases
the new nodes, leaving the graph exactly as it was; no copy of the graph is ever made.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from torch import fx
from torch.fx.node import map_arg

from torchgraft.ir.errors import RewriteError, RuleDefinitionError, TorchgraftError
from torchgraft.ir.matcher import find_matches, is_assertion
from torchgraft.ir.node_edit import Inserter, erase_nodes
from torchgraft.ir.provenance import META_KEY, describe, module_fqn, user_source
from torchgraft.ir.replacement import (
    Template,
    describe_value,
    output_mismatch,
    signature,
    trace_replacement,
)
from torchgraft.ir.rule import Match, Rule
from torchgraft.ir.state import NEW_ATTRIBUTE, AttributeJournal, NewAttribute

_COPIED_META = ("nn_module_stack", "stack_trace", "source_fn_stack")
_NO_VAL = object()


class GraphEditor:
    """Journaled, reversible edits of one graph."""

    def __init__(self, graph: fx.Graph) -> None:
        self.graph = graph
        self._retired: set[fx.Node] = set()
        self._inserted: list[fx.Node] = []
        self._rewired: list[tuple[fx.Node, fx.Node, list[fx.Node]]] = []
        self._forward: dict[fx.Node, fx.Node] = {}
        self._name_counts: dict[str, int] | None = None
        self._inserter: Inserter | None = None
        self._attributes = AttributeJournal()

    def is_live(self, node: fx.Node) -> bool:
        """False for nodes replaced earlier in this transaction."""
        return node not in self._retired

    def resolve(self, value: Any) -> Any:
        """The current stand-in for ``value`` (a replaced output maps to its replacement)."""
        while isinstance(value, fx.Node) and value in self._forward:
            value = self._forward[value]
        return value

    def insert_copy(
        self,
        node: fx.Node,
        env: dict[fx.Node, Any],
        meta: dict[str, Any],
        before: fx.Node,
        target: Any = None,
    ) -> fx.Node:
        """Insert a copy of template ``node`` right before ``before``, with inputs mapped by
        ``env``, the given meta plus the node's ``meta["val"]`` (a leaf call without a fake
        function has none), and ``target`` instead of the node's, when given."""
        if self._name_counts is None:
            self._journal_names()
        val = node.meta.get("val", _NO_VAL)
        if self._inserter is None:
            self._inserter = Inserter(self.graph)
        new = self._inserter.insert(
            before,
            node.op,
            node.target if target is None else target,
            map_arg(node.args, env.__getitem__),
            map_arg(node.kwargs, env.__getitem__),
            node.name,
            meta if val is _NO_VAL else {**meta, "val": val},
        )
        self._inserted.append(new)
        return new

    def _journal_names(self) -> None:
        """Remember the graph namespace's counters before the first insertion, so that a
        rollback frees the names it allocated (a later run then names nodes like a fresh one)."""
        self._name_counts = dict(self.graph._graph_namespace._base_count)

    def _free_names(self) -> None:
        namespace = self.graph._graph_namespace
        for node in self._inserted:
            namespace._used_names.discard(node.name)
            namespace._obj_to_name.pop(node, None)
        if self._name_counts is not None:
            namespace._base_count.clear()
            namespace._base_count.update(self._name_counts)

    def add_attribute(self, module_fqn: str, attribute: NewAttribute) -> str:
        """Register new state on the graph's module under ``module_fqn``; returns its FQN."""
        root = self.graph.owning_module
        if root is None:
            raise RuleDefinitionError(
                f"the replacement creates {attribute.kind} {attribute.name!r}, but the graph "
                "belongs to no module that could hold it"
            )
        return self._attributes.register(root, module_fqn, attribute)

    def replace_uses(self, old: fx.Node, new: fx.Node) -> None:
        users = old.replace_all_uses_with(new)
        self._rewired.append((old, new, users))
        self._forward[old] = new

    def retire(self, nodes: Iterable[fx.Node]) -> None:
        """Mark replaced ``nodes`` (and the metadata assertions on them) as gone."""
        retired = self._retired
        for node in nodes:
            retired.add(node)
            for user in node.users:
                if is_assertion(user):
                    retired.add(user)

    def check(self) -> None:
        """``graph.lint()`` for what this transaction changed (nothing else was touched):
        every inserted node, and every node whose inputs were moved, is live and uses only
        live nodes defined before it (fx keeps a sort key per node: ``a < b`` is O(1))."""
        edited = dict.fromkeys(self._inserted)
        edited.update((u, None) for _, _, users in self._rewired for u in users)
        for node in edited:
            if node in self._retired:
                continue
            for arg in node._input_nodes:  # all_input_nodes without its list copy
                if arg in self._retired or arg.graph is not self.graph or not arg < node:
                    state = "replaced" if arg in self._retired else "defined after it"
                    raise TorchgraftError(
                        f"internal error: after rewriting, '{node.format_node()}' uses "
                        f"'{arg.name}', which is {state}"
                    )

    def commit(self) -> None:
        """Check the edits, then erase the retired nodes (which nothing live uses, so the
        erasure cannot break what the check accepted; a failed check can still roll back),
        and the pure ops that only they used (e.g. an attention mask the replacement reads
        off the graph instead of computing: left in place, eager mode would compute it)."""
        self.check()
        retired = self._retired
        orphans = {n: None for r in retired for n in r._input_nodes if n not in retired}
        erase_nodes(self.graph, [n for n in reversed(self.graph.nodes) if n in retired])
        self._erase_orphans(list(orphans))
        self._attributes.commit()
        self._reset()

    def _erase_orphans(self, work: list[fx.Node]) -> None:
        erased: set[fx.Node] = set()
        while work:
            node = work.pop()
            if node in erased or node.op != "call_function":
                continue
            if not all(is_assertion(u) for u in node.users) or node.is_impure():
                continue
            inputs = node.all_input_nodes
            erase_nodes(self.graph, [*node.users, node])
            erased.add(node)
            work.extend(inputs)

    def rollback(self) -> None:
        """Undo every edit since the last commit."""
        for old, new, users in reversed(self._rewired):
            for user in users:
                user.replace_input_with(new, old)
        erase_nodes(self.graph, reversed(self._inserted))
        self._free_names()
        self._attributes.rollback()
        self._reset()

    def _reset(self) -> None:
        self._retired.clear()
        self._inserted.clear()
        self._rewired.clear()
        self._forward.clear()
        self._name_counts = None
        self._inserter = None


@dataclasses.dataclass
class MatchRecord:
    """What one applied match did; kept in the run report."""

    handler: str
    rule: str
    anchor: str
    module_fqn: str
    replaced: list[str]
    """Names of the graph nodes the match replaced (they no longer exist after the run)."""
    created: list[str]
    overwrote: dict[str, dict]
    """Replaced nodes that an earlier rule created: name → their provenance."""
    attributes: list[str] = dataclasses.field(default_factory=list)
    """FQNs of the parameters, buffers and constants the replacement registered."""


def _check_outputs(match: Match, template: Template, handler_name: str) -> None:
    """Refuse a replacement whose outputs' shapes or dtypes differ from the matched ones:
    the graph's users of those values would break only when the model runs. Run when a
    template is traced; a cached one was checked against the outputs its key names."""
    rule = match.rule
    for i, (old, out) in enumerate(zip(match.outputs, template.outputs)):
        old_val, new_val = old.meta.get("val"), out.meta.get("val")
        if output_mismatch(new_val, old_val):
            raise RewriteError(
                f"handler '{handler_name}' rule '{rule.name}' ({rule.location}): replacement "
                f"output {i} is {describe_value(new_val)} but it replaces {describe(old)}, "
                f"which is {describe_value(old_val)}",
                handler=handler_name,
                rule=rule.name,
                node=old.name,
                source=user_source(old),
            )


class RuleApplier:
    """Applies rules through one :class:`GraphEditor`, caching templates per signature."""

    def __init__(self, editor: GraphEditor) -> None:
        self.editor = editor
        self._templates: dict[tuple, dict[tuple, Template]] = {}

    def apply(self, rule: Rule, handler: Any = None, handler_name: str = "") -> list[MatchRecord]:
        """Find all matches of ``rule`` on the live graph and replace them."""
        if rule.replace_fn is None:
            raise RewriteError(
                f"rule '{rule.name}' ({rule.location}) has no replacement; attach one with "
                f"@{rule.name}.replacement",
                handler=handler_name,
                rule=rule.name,
                node=None,
                source=None,
            )
        try:
            matches = find_matches(self.editor.graph, rule, handler, self.editor.is_live)
        except TorchgraftError:
            raise
        except Exception as exc:
            raise RewriteError(
                f"handler '{handler_name}' rule '{rule.name}' ({rule.location}): a filter raised "
                f"{type(exc).__name__}: {exc}",
                handler=handler_name,
                rule=rule.name,
                node=None,
                source=None,
            ) from exc
        cache = self._templates.setdefault((id(handler), rule), {})
        return [self._apply_one(match, cache, handler_name) for match in matches]

    def _apply_one(self, match: Match, cache: dict, handler_name: str) -> MatchRecord:
        rule = match.rule
        try:
            self._bind_extra_inputs(match)
            key = signature(match)
            try:
                template = cache.get(key)
            except TypeError:  # symbolic sizes: not cached
                key = template = None
            if template is None:
                template = trace_replacement(rule, match)
                if rule.check_outputs:
                    _check_outputs(match, template, handler_name)
                if key is not None and not template.per_match:
                    cache[key] = template
            replaced = list(match.nodes.values())
            provenance = {
                "handler": handler_name,
                "rule": rule.name,
                "replaced": [n.name for n in replaced],
            }
            created, attributes = self._splice(match, template, provenance, replaced)
        except RewriteError:
            raise
        except Exception as exc:
            source = user_source(match.anchor)
            raise RewriteError(
                f"handler '{handler_name}' rule '{rule.name}' ({rule.location}) failed at "
                f"{describe(match.anchor)}: {type(exc).__name__}: {exc}",
                handler=handler_name,
                rule=rule.name,
                node=match.anchor.name,
                source=source,
            ) from exc
        return MatchRecord(
            handler=handler_name,
            rule=rule.name,
            anchor=match.anchor.name,
            module_fqn=module_fqn(match.anchor),
            replaced=provenance["replaced"],
            created=[n.name for n in created],
            overwrote={n.name: n.meta[META_KEY] for n in replaced if META_KEY in n.meta},
            attributes=attributes,
        )

    @staticmethod
    def _bind_extra_inputs(match: Match) -> None:
        """Add the handler's :meth:`~torchgraft.Handler.extra_inputs` to the bindings."""
        if match.handler is None:
            return
        extra = match.handler.extra_inputs(match)
        if not extra:
            return
        clash = sorted(set(extra) & set(match.bindings))
        if clash:
            raise RuleDefinitionError(
                f"extra_inputs of handler '{match.handler.display_name}' reuse the pattern's "
                f"parameter names {clash}"
            )
        match.bindings.update(extra)

    def _splice(
        self, match: Match, template: Template, provenance: dict, replaced: list[fx.Node]
    ) -> tuple[list[fx.Node], list[str]]:
        editor, anchor, bindings = self.editor, match.anchor, match.bindings
        forward = editor._forward
        env: dict[fx.Node, Any] = {}
        for name, node in template.placeholders.items():
            value = bindings[name]  # a node: only those become placeholders
            env[node] = editor.resolve(value) if value in forward else value
        meta = anchor.meta
        inherited = {key: meta[key] for key in _COPIED_META if key in meta}
        inherited[META_KEY] = provenance
        point = self._insertion_point(match, env)
        created, attributes = [], []
        for node in template.ops:
            target = None
            attribute = node.meta.get(NEW_ATTRIBUTE)
            if attribute is not None:
                module = match.module_fqn if attribute.module is None else attribute.module
                target = editor.add_attribute(module, attribute)
                attributes.append(target)
            new = editor.insert_copy(node, env, inherited, point, target)
            env[node] = new
            created.append(new)
        for old, out in zip(match.outputs, template.outputs):
            editor.replace_uses(old, env[out])
        editor.retire(replaced)
        return created, attributes

    def _insertion_point(self, match: Match, env: dict[fx.Node, Any]) -> fx.Node:
        """Before the anchor for one output; for several, right after the last input.
        (Nodes compare by graph position: ``a < b`` when ``a`` comes first.)"""
        if len(match.outputs) == 1:
            return match.anchor
        replaced = set(match.nodes.values())
        inputs = [v for v in env.values() if isinstance(v, fx.Node)]
        point = max(inputs).next if inputs else min(replaced)
        users = [
            u
            for out in match.outputs
            for u in out.users
            if u not in replaced and self.editor.is_live(u)
        ]
        if any(u < point for u in users):
            raise RewriteError(
                f"rule '{match.rule.name}': outputs of the match at '{match.anchor.name}' are used "
                "before all of its inputs exist; the replacement cannot be placed without reordering",
                handler=None,
                rule=match.rule.name,
                node=match.anchor.name,
                source=user_source(match.anchor),
            )
        return point
