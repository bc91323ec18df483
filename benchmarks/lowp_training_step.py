"""Training-step time of the low-precision conversions vs the unconverted model.

The Llama model (with its loss) is captured with ``tg.capture``, converted by one handler
(float8, int8, MX, BitNet, with some of their options) and trained with AdamW; a step is
forward + backward + ``optimizer.step()`` (+ the handler's optimizer hooks, e.g. float8's
weight-scale precompute) + ``zero_grad``. Each configuration runs eager and under
``torch.compile`` (the "compile s" column is the first step minus a median step:
compilation, shortened when inductor's on-disk cache already holds the kernels); ratios are against the unconverted
model in the same mode. All models are built first, then stepped round-robin (one step of
each per round) so that load changes on a shared machine hit every configuration alike;
reported is the median of ``--steps`` rounds after ``--warmup`` rounds.

The alternative a user would pick instead, torchao's module-swap float8 training
(``torchao.float8.convert_to_float8_training``, tensorwise recipe, the same model, shapes
and skipped output projection), runs in the same rounds, eager, twice: with
``Float8LinearConfig(emulate=True)`` and with its default (``torch._scaled_mm``). The
"kernel" column says which GEMM each configuration ran: for torchgraft the choice of
:mod:`torchgraft.ops.kernels` on this machine (``--kernel`` forces one), for torchao its
``emulate`` flag. On a CPU whose oneDNN has no float8 matmul, ``_scaled_mm`` is a reference
loop (~750x slower than fp32): use ``--preset tiny`` there to see that ratio in minutes.

On CPU the float8 / MX formats are emulated, so these ratios measure the cost of the
emulation on this machine, not the speed-up the formats give on hardware with native
low-precision GEMMs.

``OMP_WAIT_POLICY`` defaults to ``PASSIVE`` here (set it to override): on a shared 2-core
machine, OpenMP threads spin-waiting between parallel regions made single steps vary by
10x (e.g. 0.75-8 s for the same float8 step), which no number of repetitions averages out.

    python benchmarks/lowp_training_step.py [--preset debug] [--batch-size 4] [--seq-len 128]
        [--steps 10] [--warmup 3] [--threads N] [--no-compile] [--only float8 int8]
        [--kernel auto|native|emulated] [--no-torchao]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import statistics
import sys
import time

import torch

import torchgraft as tg
from torchgraft.models import build_llama
from torchgraft.ops import kernels
from torchgraft.train.optim import register_handler_hooks

BASELINE = "fp32 (unconverted)"
TORCHAO = {"torchao float8 emulate=True": True, "torchao float8 _scaled_mm": False}
CONFIGS: dict[str, list] = {
    "fp32 (unconverted)": [],
    "float8 tensorwise": ["float8"],
    "float8 rowwise": [{"float8": {"recipe": "rowwise"}}],
    "int8 training": ["int8"],
    "int8 dynamic": [{"int8": {"mode": "dynamic"}}],
    "int8 weight_only": [{"int8": {"mode": "weight_only"}}],
    "mx mxfp8": ["mx"],
    "mx mxfp4": [{"mx": {"format": "mxfp4"}}],
    "bitnet": ["bitnet"],
}


class Run:
    """One configuration in one mode: a converted model, its optimizer and its step."""

    def __init__(self, name: str, args: argparse.Namespace, compiled: bool) -> None:
        model = build_llama(args.preset, with_loss=True, seed=0)
        gen = torch.Generator().manual_seed(0)
        shape = (args.batch_size, args.seq_len)
        vocab = model.model.config.vocab_size
        self.batch = tuple(torch.randint(0, vocab, shape, generator=gen) for _ in range(2))
        handlers: list[tg.Handler] = []
        if name in TORCHAO:
            module, self.matches = _torchao_float8(model, emulate=TORCHAO[name])
            self.kernel = "emulated" if TORCHAO[name] else "_scaled_mm"
        else:
            module = tg.capture(model, self.batch)
            plan = [_with_kernel(entry, args.kernel) for entry in CONFIGS[name]]
            pm = tg.PassManager(plan)
            self.matches = sum(pm.run(module).matches.values()) if plan else 0
            handlers = pm.handlers
            self.kernel = _kernel_ran(handlers, args.kernel)
        self.module = torch.compile(module) if compiled else module
        self.optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
        register_handler_hooks(self.optimizer, handlers, [module])
        self.first_s = self.step()  # includes compilation
        self.times: list[float] = []

    def step(self) -> float:
        """Seconds of one training step."""
        start = time.perf_counter()
        loss = self.module(*self.batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss.item()
        return time.perf_counter() - start

    @property
    def step_s(self) -> float:
        return statistics.median(self.times)


def _with_kernel(entry: str | dict, kernel: str) -> str | dict:
    """A plan entry with ``kernel`` set, for the handlers that have the option."""
    name, options = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
    if "kernel" not in {f.name for f in dataclasses.fields(tg.get_handler(name).Options)}:
        return entry
    return {name: {**options, "kernel": kernel}}


def _kernel_ran(handlers: list[tg.Handler], kernel: str) -> str:
    """The GEMM path the plan's low-precision ops take on this machine's CPU."""
    kinds = {"float8": ("float8", (torch.float8_e4m3fn,) * 2), "int8": ("int8", (torch.int8,) * 2)}
    kinds["bitnet"] = kinds["int8"]
    for handler in handlers:
        if handler.name == "int8" and handler.options.mode == "weight_only":
            return "fp32 GEMM"
        if handler.name in kinds:
            kind, dtypes = kinds[handler.name]
            return kernels.resolve(kernel, kind, torch.device("cpu"), dtypes)
        if handler.name == "mx":
            return "emulated"
    return "fp32 GEMM"


def _torchao_float8(model: torch.nn.Module, emulate: bool) -> tuple[torch.nn.Module, int]:
    """torchao's tensorwise float8 training on ``model``'s linears but the output head."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig(emulate=emulate)
    convert_to_float8_training(
        model, config=config, module_filter_fn=lambda _m, fqn: not fqn.endswith("output")
    )
    converted = sum(type(m).__name__ == "Float8Linear" for m in model.modules())
    return model, converted


def main() -> None:
    if "OMP_WAIT_POLICY" not in os.environ:  # read once, when OpenMP starts: re-run with it
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="debug", choices=["tiny", "debug"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (>= 1)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--only", nargs="*", help="substrings of the configurations to run")
    parser.add_argument(
        "--kernel", default="auto", choices=kernels.KERNELS, help="torchgraft's GEMM path"
    )
    parser.add_argument("--no-torchao", action="store_true", help="leave out torchao's float8")
    args = parser.parse_args()
    args.warmup = max(args.warmup, 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.no_torchao and importlib.util.find_spec("torchao") is None:
        parser.error("torchao is not installed: pip install -e '.[bench]', or pass --no-torchao")
    candidates = [*CONFIGS, *([] if args.no_torchao else TORCHAO)]
    names = [
        n for n in candidates if not args.only or n == BASELINE or any(o in n for o in args.only)
    ]
    modes = ["eager"] if args.no_compile else ["eager", "compiled"]

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY="
        f"{os.environ['OMP_WAIT_POLICY']}; Llama '{args.preset}', "
        f"batch {args.batch_size} x {args.seq_len} tokens; median of {args.steps} steps "
        f"after {args.warmup} warmup"
    )
    runs: dict[tuple[str, str], Run] = {}
    for mode in modes:
        for name in names:
            if name in TORCHAO and mode == "compiled":
                continue
            runs[name, mode] = Run(name, args, mode == "compiled")
            print(f"  built {mode:8s} {name:20s} first step {runs[name, mode].first_s:6.1f} s")
    for _ in range(args.warmup - 1):
        for run in runs.values():
            run.step()
    # Round-robin: a change of machine load during the run hits every configuration alike.
    for _ in range(args.steps):
        for run in runs.values():
            run.times.append(run.step())

    header = ["conversion", "linears", "kernel"]
    for mode in modes:
        header += [f"{mode} ms", f"{mode} x"]
    if "compiled" in modes:
        header.append("compile s")
    rows = [header]
    for name in names:
        row = [name, str(runs[name, modes[0]].matches), runs[name, modes[0]].kernel]
        for mode in modes:
            if (name, mode) not in runs:
                row += ["-", "-"]
                continue
            base = runs[BASELINE, mode].step_s
            step = runs[name, mode].step_s
            row += [f"{1e3 * step:.1f}", f"{step / base:.2f}"]
        if "compiled" in modes:
            run = runs.get((name, "compiled"))
            row.append("-" if run is None else f"{run.first_s - run.step_s:.1f}")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    print()
    for i, row in enumerate(rows):
        print(
            " | ".join(
                c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))
            )
        )
        if i == 0:
            print("-+-".join("-" * w for w in widths))
    print()
    for alternative in (n for n in TORCHAO if n in names):
        for name in (n for n in names if n.startswith("float8 tensorwise")):
            ratio = runs[name, "eager"].step_s / runs[alternative, "eager"].step_s
            print(f"eager step, torchgraft {name} / {alternative}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
