"""The ``torchgraft`` command line (also ``python -m torchgraft``).

::

    torchgraft run [CONFIG] [--steps N] [--out DIR] [--dump-ir DIR]
    torchgraft check CONFIG [--json] [--expect FILE | --write-expect FILE] [--dump-ir DIR]
    torchgraft viz CONFIG --out DIR [--fold-depth N] [--expand GLOB] [--stage S] [--dump-ir DIR]
    torchgraft explain CONFIG --handler NAME [--rule R] [--module GLOB | --node NAME] [--stage S]
    torchgraft list [--import MODULE ...]

Exit codes: 0 no problems, 1 problems found, 2 unusable input (a config that cannot be
read or validated, a missing file, an unwritable output path, an import or model factory
that fails, a model ``run`` cannot train, a bad checkpoint), 3 training stopped (the
non-finite limit, or a collective timeout under ``torchrun``). Bad input gives a one-line
message on stderr, never a traceback, and is checked before any work
(:mod:`torchgraft.preflight`).

``check`` and ``run`` are one judge: ``run`` refuses (exit 1, nothing trained) a plan with
any problem ``check`` reports, unless the config accepts it — ``optional: true`` on a
handler that may match nothing, or ``allow: [kinds]`` (``overlap``, ``order``,
``no_match``, ``clobber``, ``numerics`` ...).

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
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from torchgraft.handlers.base import Handler
from torchgraft.handlers.options import option_docs
from torchgraft.handlers.registry import entry_point_errors, registered
from torchgraft.ir.errors import TorchgraftError
from torchgraft.ir.pattern import target_name
from torchgraft.tools.plain_text import plain_text
from torchgraft.train.strict_json import dumps_strict

if TYPE_CHECKING:
    import torch
    from torch import fx

    from torchgraft.config import Config

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_BAD_INPUT = 2
EXIT_TRAINING_STOPPED = 3
"""``torchgraft run`` stopped training: the non-finite limit was hit (``metrics.json`` has
``status: nonfinite`` and the steps done), or a collective timed out under ``torchrun``."""


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
        prog="torchgraft",
        description="Model conversions as checked graph rewrites.",
        epilog="exit codes: 0 ok, 1 problems found, 2 unusable input (one line, before any "
        "work), 3 training stopped (non-finite limit; collective timeout under torchrun)",
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
        _check_environment()
        return args.run(args)
    except TorchgraftError as exc:  # config, import, capture ... errors: the input is unusable
        print(f"torchgraft {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        _leave_distributed()


def _leave_distributed() -> None:
    """Leave the process group ``run`` joined under ``torchrun`` (if it did)."""
    if "torch.distributed" in sys.modules:  # never import torch for ``--help`` or ``list``
        from torchgraft.passes.parallelize import leave_distributed

        leave_distributed()


def _check_environment() -> None:
    """Refuse a bad ``TORCHGRAFT_KERNEL`` before any work, as bad input."""
    from torchgraft.ops.kernels import environment_kernel

    try:
        environment_kernel()
    except ValueError as exc:
        raise TorchgraftError(str(exc)) from None


# ------------------------------------------------------------------------------ run

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"
"""The config ``torchgraft run`` uses without an argument."""


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config",
        nargs="?",
        default=str(DEFAULT_CONFIG),
        help="YAML run config (default: the built-in debug Llama with float8 + flex_attention)",
    )
    parser.add_argument("--steps", type=_positive_int, help="override train.steps")
    parser.add_argument("--out", metavar="DIR", help="override output.dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    _dump_ir_argument(
        parser,
        "with joint-stage handlers also joint.py, joint_forward.py and joint_backward.py once "
        "the first step traced them; with compile-stage handlers each post-grad graph "
        "Inductor compiles, over those handlers, in compile_forward/ and compile_backward/ "
        "(none on an FX graph cache hit)",
    )


RUN_HELP = (
    "capture, convert, verify and train a model; write metrics.json. Trains forward(tokens) "
    "returning logits (a tensor, or an object or dict with 'logits': the next-token loss is "
    "added in the graph) or forward(tokens, labels) returning a scalar loss. Refuses (exit 1, "
    "nothing trained) a plan with any problem 'torchgraft check' reports unless the config "
    "accepts it: 'optional: true' on a handler, or 'allow: [kinds]'"
)


@command("run", RUN_HELP, _run_arguments)
def run(args: argparse.Namespace) -> int:
    from torchgraft import preflight
    from torchgraft.config import load_config
    from torchgraft.passes.problems import CheckError
    from torchgraft.train.job import (
        METRICS_FILE,
        STATUS_ALREADY_FINISHED,
        is_main_process,
        run_job,
    )
    from torchgraft.train.loop import NonFiniteError

    config = load_config(args.config)
    preflight.check_run(config, steps=args.steps, out=args.out, dump_ir=args.dump_ir)
    try:
        result = run_job(
            config,
            steps=args.steps,
            out_dir=args.out,
            dump_ir=args.dump_ir,
            progress=False if args.no_progress else None,
        )
    except CheckError as exc:
        print(f"torchgraft run: the plan has problems; nothing was trained\n{exc}", file=sys.stderr)
        return EXIT_PROBLEMS
    except NonFiniteError as exc:
        print(f"torchgraft run: training stopped: {exc} (wrote {METRICS_FILE})", file=sys.stderr)
        return EXIT_TRAINING_STOPPED
    except RuntimeError as exc:
        _exit_on_collective_failure(exc)
        raise
    if not is_main_process():
        return EXIT_OK
    print(result.report)
    if result.status == STATUS_ALREADY_FINISHED:
        print(f"the run already finished (step {result.train.start_step}); kept {METRICS_FILE}")
        return EXIT_OK
    losses = result.train.history
    print(
        f"trained {result.train.steps} steps: loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
        f"{result.train.tokens_per_s:,.0f} tokens/s"
    )
    if result.baseline is not None:
        print(f"baseline (unconverted): loss -> {result.baseline.history[-1]:.3f}")
    print(f"wrote {result.out_dir / METRICS_FILE}")
    return EXIT_OK


def _exit_on_collective_failure(exc: RuntimeError) -> None:
    """A collective that timed out under ``torchrun``: say which rank saw it, in one line,
    and leave at once (tearing the process group down would wait on the hung rank)."""
    from torchgraft.passes.parallelize import collective_failure

    message = collective_failure(exc)
    if message is not None:
        print(f"torchgraft run: error: {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_TRAINING_STOPPED)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _dump_ir_argument(parser: argparse.ArgumentParser, later_stages: str) -> None:
    parser.add_argument(
        "--dump-ir",
        metavar="DIR",
        help="write the graph's code after each handler (numbered) and a diff per step to DIR; "
        + later_stages,
    )


# ---------------------------------------------------------------------------- check


def _check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Stages: module-stage handlers run on a freshly built model, graph-stage ones on a "
        "copy of its captured graph; a plan with joint-stage handlers also captures again "
        "and traces one joint forward+backward step (an AOTAutograd trace: seconds); one with "
        "compile-stage handlers (and none at the joint stage) compiles one forward+backward "
        "step of the converted graph with torch.compile, FX graph cache bypassed (an Inductor "
        "compile: seconds to a minute on CPU), judges the handlers on each post-grad graph "
        "(overlap, order, clobber; no_match over forward and backward together) and verifies "
        "the compiled step against the eager one."
    )
    parser.add_argument("config", help="YAML run config")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    expect = parser.add_mutually_exclusive_group()
    expect.add_argument(
        "--expect", metavar="FILE", help="compare order, match counts and ops with FILE"
    )
    expect.add_argument(
        "--write-expect", metavar="FILE", help="write order, match counts and ops to FILE"
    )
    _dump_ir_argument(
        parser,
        "a plan with joint or compile-stage handlers also gets each graph of those stages in "
        "a subdirectory (joint/, compile_forward/, compile_backward/), from one more traced or "
        "compiled step",
    )


@command(
    "check",
    "check a config's plan: order, conflicts, matches, numerics (exit 1 on any problem whose "
    "kind the config's 'allow' list does not accept; 'run' refuses the same)",
    _check_arguments,
)
def check(args: argparse.Namespace) -> int:
    from torchgraft import preflight
    from torchgraft.config import load_config
    from torchgraft.passes.expect import compare_expectation, load_expectation, write_expectation

    config = load_config(args.config)
    expected = load_expectation(args.expect) if args.expect else None
    if args.write_expect:
        preflight.check_output_file(args.write_expect, "--write-expect")
    if args.dump_ir:
        preflight.check_output_dir(args.dump_ir, "--dump-ir")
    result = config.check()
    if args.dump_ir:
        _dump_ir(config, args.dump_ir)
    if expected is not None:
        result.problems += compare_expectation(expected, result, args.expect)
    if args.write_expect:
        write_expectation(result, args.write_expect)
    if args.json:
        print(dumps_strict(result.to_json()))
    else:
        print(f"torchgraft check {args.config}\n{result}")
        print("OK" if result.ok else "FAILED")
    return EXIT_OK if result.ok else EXIT_PROBLEMS


def _captured(config: Config) -> tuple[fx.GraphModule, tuple[torch.Tensor, ...]]:
    """Import and build the config's model, run the plan's module stage on it and capture it
    as ``check`` judges it (its batch dimension static, which reads more plainly in ``viz``
    and ``explain``); returns the graph module and its example inputs."""
    from torchgraft.passes.manager import PassManager
    from torchgraft.passes.problems import acceptable_kinds

    config.import_modules()
    model = config.build_model()
    pm = PassManager(list(config.handlers), allow=acceptable_kinds())
    if not pm.problems:
        pm.convert_module(model)
    return config.judged_graph(model)


def _dump_ir(config: Config, out_dir: str) -> None:
    from torchgraft.tools.ir_dump import dump_stages

    paths = dump_stages(*_captured(config), list(config.handlers), out_dir)
    print(f"wrote {len(paths)} IR dump files to {out_dir}")


# ------------------------------------------------------------------------ viz / explain


def _viz_arguments(parser: argparse.ArgumentParser) -> None:
    from torchgraft.tools import visualize

    parser.add_argument("config", help="YAML run config")
    visualize.add_arguments(parser)


@command("viz", "render the graph before and after the plan (SVG + one HTML page)", _viz_arguments)
def viz(args: argparse.Namespace) -> int:
    from torchgraft import preflight
    from torchgraft.config import load_config
    from torchgraft.tools import visualize

    config = load_config(args.config)
    preflight.check_graphviz()
    preflight.check_output_dir(args.out, "--out")
    if args.dump_ir:
        preflight.check_output_dir(args.dump_ir, "--dump-ir")
    gm, inputs = _captured(config)
    return visualize.main(args, gm, list(config.handlers), inputs)


def _explain_arguments(parser: argparse.ArgumentParser) -> None:
    from torchgraft.tools import explain

    parser.add_argument("config", help="YAML run config")
    explain.add_arguments(parser)


@command(
    "explain", "say why a handler's rules do or do not match, node by node", _explain_arguments
)
def explain(args: argparse.Namespace) -> int:
    from torchgraft.config import load_config
    from torchgraft.tools import explain as explain_tool

    config = load_config(args.config)
    gm, inputs = _captured(config)
    return explain_tool.main(args, gm, list(config.handlers), inputs)


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
    summary = plain_text(cls.__doc__ or "", width=86).split("\n\n")[0]
    lines = [f"{name}  ({cls.__module__}.{cls.__qualname__})"]
    lines.extend(f"  {line}" for line in summary.splitlines())
    order = [
        f"{attribute} {', '.join(getattr(cls, attribute))}"
        for attribute in ("requires", "after", "before")
        if getattr(cls, attribute)
    ]
    lines.append(f"  stage: {cls.stage}")
    lines.append(f"  order: {'; '.join(order) or 'no constraints'}")
    tolerance = cls.sqnr_tolerance
    shown = "exact" if tolerance is None else f"{tolerance} dB"
    if not cls.approximates:
        shown = "none (a different function, not an approximation)"
    if cls.op_sqnr_tolerance is not None:
        shown += f", calibrated on the model (per-op tolerance {cls.op_sqnr_tolerance} dB)"
    lines.append(f"  sqnr tolerance: {shown}")
    lines.append("  rules:")
    lines.extend(
        f"    {r.name}  {target_name(r.pattern.anchor)}  ({r.location})" for r in cls.rules()
    )
    options = option_docs(cls.Options)
    lines.append("  options:" if options else "  options: none")
    for option in options:
        declaration = f"{option.name}: {option.type} = {option.default}"
        lines.extend(
            textwrap.wrap(declaration, 86, initial_indent="    ", subsequent_indent=" " * 8)
        )
        lines.extend(f"        {line}" for line in plain_text(option.doc, width=80).splitlines())
    return "\n".join(lines)
