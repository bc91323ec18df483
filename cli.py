"""The ``torchgraft`` command line (also ``python -m torchgraft``).

::

    torchgraft check CONFIG [--json] [--expect FILE | --write-expect FILE]
    torchgraft list [--import MODULE ...]

Exit codes: 0 no problems, 1 problems found, 2 unusable input (a config that cannot be
read or validated, a missing file, an import or model factory that fails). Bad input
gives a one-line message on stderr, never a traceback.

Each subcommand is a function registered in :data:`COMMANDS` with :func:`command`; a new
one needs no change elsewhere::

    def _viz_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("config")

    @command("viz", "render the graph before and after the plan", _viz_arguments)
    def viz(args: argparse.Namespace) -> int:
        ...
        return EXIT_OK
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from collections.abc import Callable, Sequence

from torchgraft.handlers.base import Handler
from torchgraft.handlers.options import option_docs
from torchgraft.handlers.registry import entry_point_errors, registered
from torchgraft.ir.errors import TorchgraftError
from torchgraft.ir.pattern import target_name

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_BAD_INPUT = 2


@dataclasses.dataclass(frozen=True)
class Command:
    """A subcommand: its arguments and the function that runs it (returns the exit code)."""

    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def command(
    name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None]
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Decorator: register ``run`` as subcommand ``name``."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = Command(name, help, arguments, run)
        return run

    return register


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchgraft", description="Model conversions as checked graph rewrites."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in COMMANDS.values():
        sub = subparsers.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.arguments(sub)
        sub.set_defaults(run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except TorchgraftError as exc:  # config, import, capture ... errors: the input is unusable
        print(f"torchgraft {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


# ---------------------------------------------------------------------------- check


def _check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML run config")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    expect = parser.add_mutually_exclusive_group()
    expect.add_argument(
        "--expect", metavar="FILE", help="compare order, match counts and ops with FILE"
    )
    expect.add_argument(
        "--write-expect", metavar="FILE", help="write order, match counts and ops to FILE"
    )


@command("check", "check a config's plan: order, conflicts, matches, numerics", _check_arguments)
def check(args: argparse.Namespace) -> int:
    from torchgraft.config import load_config
    from torchgraft.passes.expect import compare_expectation, load_expectation, write_expectation

    config = load_config(args.config)
    expected = load_expectation(args.expect) if args.expect else None
    result = config.check()
    if expected is not None:
        result.problems += compare_expectation(expected, result, args.expect)
    if args.write_expect:
        write_expectation(result, args.write_expect)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(f"torchgraft check {args.config}\n{result}")
        print("OK" if result.ok else "FAILED")
    return EXIT_OK if result.ok else EXIT_PROBLEMS


# ----------------------------------------------------------------------------- list


def _list_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first so the handlers it defines are listed (repeatable)",
    )


@command("list", "list the registered handlers: rules, options, order constraints", _list_arguments)
def list_handlers(args: argparse.Namespace) -> int:
    for module in args.imports:
        try:
            importlib.import_module(module)
        except Exception as exc:  # anything the module raises on import
            raise TorchgraftError(f"cannot import {module!r}: {type(exc).__name__}: {exc}") from exc
    handlers = registered()
    if not handlers:
        print("no handlers registered")
    for name, cls in sorted(handlers.items()):
        print(describe_handler(name, cls) + "\n")
    for name, error in sorted(entry_point_errors().items()):
        print(f"{name}  (not loaded: {error})")
    return EXIT_OK


def describe_handler(name: str, cls: type[Handler]) -> str:
    """The ``torchgraft list`` entry of one handler."""
    doc = (cls.__doc__ or "").strip().splitlines()
    lines = [f"{name}  ({cls.__module__}.{cls.__qualname__})"]
    if doc:
        lines.append(f"  {doc[0]}")
    order = [
        f"{attribute} {', '.join(getattr(cls, attribute))}"
        for attribute in ("requires", "after", "before")
        if getattr(cls, attribute)
    ]
    lines.append(f"  order: {'; '.join(order) or 'no constraints'}")
    tolerance = cls.sqnr_tolerance
    lines.append(f"  sqnr tolerance: {'exact' if tolerance is None else f'{tolerance} dB'}")
    lines.append("  rules:")
    lines.extend(
        f"    {r.name}  {target_name(r.pattern.anchor)}  ({r.location})" for r in cls.rules()
    )
    options = option_docs(cls.Options)
    lines.append("  options:" if options else "  options: none")
    for option in options:
        lines.append(f"    {option.name}: {option.type} = {option.default}")
        lines.extend(f"        {line}" for line in option.doc.splitlines())
    return "\n".join(lines)
