"""Which GEMM kernel a low-precision op runs: the native low-precision one, or exact emulation.

The float8 and int8 GEMMs have two implementations with the same numerics:

* **native**: ``torch._scaled_mm`` (float8) / ``torch._int_mm`` (int8) on the quantized
  operands. On a GPU with float8 tensor cores (or a CPU whose oneDNN build has the kernel)
  this is the fast path. On CPUs without such a kernel it is the reference loop: measured on
  an Intel Xeon (AVX-512, AMX, no float8 instructions), a 512x256x256 e4m3 ``_scaled_mm``
  took 0.98 s against 1.3 ms for the fp32 GEMM (~750x).
* **emulated**: the quantized values in float32 (float8: made so directly, see
  :func:`~torchgraft.ops.quant.float8_values_`; bfloat16 on an accelerator when the inputs
  are bfloat16), multiplied by the ordinary GEMM, and the product rescaled. The
  quantization is unchanged, so the products are the same float8 / int8 values multiplied
  in higher precision; only the summation order differs (float32 rounding, > 100 dB
  agreement, tested per op).

:func:`int8_matmul` runs the GEMM on the path that :func:`resolve` picks per
``(kind, device, operand dtypes)``, :func:`float8_matmul` on the path its caller resolved
(the float8 operands are quantized for it): ``"native"`` or ``"emulated"`` when forced,
otherwise (``"auto"``) a one-time probe times both on a small GEMM on that device and keeps
native only when it is at least about as fast (:data:`NATIVE_SLOWDOWN_ALLOWED`); a native
kernel that raises is never chosen. The choice is cached for the process and logged once at
INFO on the ``torchgraft`` logger.

The ``TORCHGRAFT_KERNEL`` environment variable (``auto`` | ``native`` | ``emulated``)
overrides ``"auto"`` everywhere, e.g. to pin CI to one path. :func:`use_probe` replaces the
probe (tests exercise the auto choice with a fake result, independent of the machine).

MX GEMMs are always emulated (a native MX GEMM needs block-scaled ``_scaled_mm`` on
hardware this build does not target); BitNet's forward is an int8 GEMM and follows the
int8 choice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Literal

import torch
import torch.nn.functional as F

from .quant import float8_to_float32

__all__ = [
    "KERNELS",
    "NATIVE_SLOWDOWN_ALLOWED",
    "ProbeResult",
    "check_kernel",
    "clear_cache",
    "environment_kernel",
    "float8_matmul",
    "int8_matmul",
    "resolve",
    "use_probe",
]

KERNELS = ("auto", "native", "emulated")
"""Values of the low-precision ops' ``gemm`` argument (the handlers' ``kernel`` option)."""

Kind = Literal["float8", "int8"]
Choice = Literal["native", "emulated"]

NATIVE_SLOWDOWN_ALLOWED = 1.25
"""``auto`` keeps the native kernel while it takes at most this many times the emulation's
time on the probe GEMM (the native path also saves the higher-precision operand copies)."""

# ``torch._int_mm`` constraints of the CUDA kernel (aten/src/ATen/native/cuda/Blas.cpp):
# rows of the first operand > 16, contraction and output columns multiples of 8.
# The CPU kernel accepts any shape (checked with torch 2.13 down to 1x1x1).
_INT_MM_MIN_ROWS = 17
_INT_MM_MULTIPLE = 8
_ENV_VAR = "TORCHGRAFT_KERNEL"
_PROBE_SHAPE = (128, 256, 256)  # M, K, N: a CPU's float8 reference kernel takes ~0.25 s
_PROBE_REPEATS = 5
_PROBE_BUDGET_S = 0.5
_log = logging.getLogger("torchgraft")


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """Seconds per probe GEMM of each path; ``native_s`` is None if the native kernel raised."""

    native_s: float | None
    emulated_s: float
    error: str | None = None
    """Why the native kernel is unavailable (its exception), when it raised."""


Probe = Callable[[Kind, torch.device, tuple[torch.dtype, torch.dtype]], ProbeResult]
_cache: dict[tuple[Kind, torch.device, tuple[torch.dtype, torch.dtype]], Choice] = {}


def check_kernel(kernel: str) -> None:
    """Raise ``ValueError`` unless ``kernel`` is one of :data:`KERNELS`."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def resolve(
    kernel: str, kind: Kind, device: torch.device, dtypes: tuple[torch.dtype, torch.dtype]
) -> Choice:
    """The path to run: ``kernel`` itself when forced, else the cached probe's choice for
    ``(kind, device, dtypes)`` (``TORCHGRAFT_KERNEL`` replaces ``"auto"`` when set)."""
    check_kernel(kernel)
    if kernel == "auto":
        kernel = environment_kernel()
    if kernel != "auto":
        return kernel  # type: ignore[return-value]
    key = (kind, torch.device(device), dtypes)
    choice = _cache.get(key)
    if choice is None:
        choice = _cache[key] = _choose(key)
    return choice


def float8_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    a_inverse: torch.Tensor,
    b_inverse: torch.Tensor,
    path: Choice,
    input_dtype: torch.dtype,
) -> torch.Tensor:
    """float32 ``(a @ b) * a_inverse * b_inverse`` for float8 operands ``a [M, K]``,
    ``b [K, N]`` and their inverse scales (0-dim, or ``[M, 1]`` / ``[1, N]``), on ``path``
    (a :func:`resolve` choice for the operands' float8 dtypes).

    Native: ``torch._scaled_mm`` on float8 ``a`` and ``b`` (``b`` column-major). Emulated:
    ``a`` and ``b`` are float8 or already their float32 values
    (:func:`~torchgraft.ops.quant.float8_values`), multiplied by the ordinary GEMM (in
    bfloat16 on an accelerator when the op's input ``input_dtype`` is bfloat16: every float8
    value is exact there and the GEMM accumulates in float32), then rescaled: by the GEMM
    itself (``addmm``'s alpha) for tensorwise scales on CPU, else in place.
    """
    if path == "native":
        return torch._scaled_mm(a, b, scale_a=a_inverse, scale_b=b_inverse, out_dtype=torch.float32)
    tensorwise = a_inverse.numel() == 1 and b_inverse.numel() == 1
    if input_dtype == torch.bfloat16 and a.device.type != "cpu":
        product = (a.to(torch.bfloat16) @ b.to(torch.bfloat16)).float()
    elif tensorwise and a.device.type == "cpu" and type(a) is type(b) is torch.Tensor:
        # the scale inside the GEMM (its alpha): no pass over the product afterwards
        alpha = (a_inverse * b_inverse).item()
        return torch.addmm(_ZERO, _as_float32(a), _as_float32(b), beta=0, alpha=alpha)
    else:
        product = _as_float32(a) @ _as_float32(b)
    if tensorwise:
        return product.mul_(a_inverse * b_inverse)
    return product.mul_(a_inverse).mul_(b_inverse)


_ZERO = torch.zeros(())
"""``addmm``'s ignored input (``beta=0``) for the emulated CPU GEMM with the scale as alpha."""


def _as_float32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else float8_to_float32(t)


def int8_matmul(a: torch.Tensor, b: torch.Tensor, kernel: str = "auto") -> torch.Tensor:
    """int8 x int8 matrix product ``a @ b`` as float32, for ``a [M, K]``, ``b [K, N]``.

    Native: ``torch._int_mm`` with exact int32 accumulation; the operands are zero-padded
    to the CUDA kernel's constraints (``M > 16``, ``K`` and ``N`` multiples of 8) and the
    result sliced back (zero rows/columns add nothing to the integer dot products, so this
    is exact; the CPU kernel needs no padding, but one code path serves every device).
    Emulated: the same integers multiplied by the float32 GEMM, exact while partial sums
    stay below ``2**24`` (``K <= 1040`` for any int8 values), float32 rounding beyond.
    """
    if resolve(kernel, "int8", a.device, (torch.int8, torch.int8)) == "emulated":
        return a.float() @ b.float()
    m, k = a.shape
    n = b.shape[1]
    pad_m = max(_INT_MM_MIN_ROWS - m, 0)
    pad_k = -k % _INT_MM_MULTIPLE
    pad_n = -n % _INT_MM_MULTIPLE
    if pad_m or pad_k or pad_n:
        a = F.pad(a, (0, pad_k, 0, pad_m))
        b = F.pad(b, (0, pad_n, 0, pad_k))
    return torch._int_mm(a, b)[:m, :n].float()


def environment_kernel() -> str:
    """``TORCHGRAFT_KERNEL`` (default ``"auto"``); ``ValueError`` if it is not one of
    :data:`KERNELS`."""
    kernel = os.environ.get(_ENV_VAR, "auto")
    if kernel not in KERNELS:
        raise ValueError(f"{_ENV_VAR} must be one of {KERNELS}, got {kernel!r}")
    return kernel


def clear_cache() -> None:
    """Forget every probed choice (the next ``"auto"`` call probes again)."""
    _cache.clear()


@contextlib.contextmanager
def use_probe(probe: Probe) -> Iterator[None]:
    """Within the block, ``"auto"`` choices come from ``probe`` (and are cached afresh)."""
    global _probe
    previous, _probe = _probe, probe
    clear_cache()
    try:
        yield
    finally:
        _probe = previous
        clear_cache()


def _choose(key: tuple[Kind, torch.device, tuple[torch.dtype, torch.dtype]]) -> Choice:
    kind, device, dtypes = key
    result = _probe(kind, device, dtypes)
    fast_enough = (
        result.native_s is not None
        and result.native_s <= NATIVE_SLOWDOWN_ALLOWED * result.emulated_s
    )
    choice: Choice = "native" if fast_enough else "emulated"
    names = " x ".join(str(d).removeprefix("torch.") for d in dtypes)
    native = (
        f"unavailable ({result.error})"
        if result.native_s is None
        else f"{1e3 * result.native_s:.2f} ms"
    )
    _log.info(
        "torchgraft: %s GEMM (%s) on %s runs %s: native %s, emulated %.2f ms per %dx%dx%d probe",
        kind,
        names,
        device,
        choice,
        native,
        1e3 * result.emulated_s,
        *_PROBE_SHAPE,
    )
    return choice


def _timed(fn: Callable[[], torch.Tensor], device: torch.device) -> float:
    """Fastest of up to ``_PROBE_REPEATS`` calls of ``fn`` after one warm-up call, in seconds.

    The minimum, not the median, so that load from other processes does not decide. Calls
    stop once
    ``_PROBE_BUDGET_S`` is spent, so a reference kernel costs the probe well under a second.
    """

    def call() -> float:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    spent = call()
    best = math.inf
    for _ in range(_PROBE_REPEATS):
        best = min(best, call())
        spent += best
        if spent > _PROBE_BUDGET_S:
            break
    return best


def _measure(
    kind: Kind, device: torch.device, dtypes: tuple[torch.dtype, torch.dtype]
) -> ProbeResult:
    """Time the native kernel and the emulation on a ``_PROBE_SHAPE`` GEMM."""
    m, k, n = _PROBE_SHAPE
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device)
    b = torch.randn(n, k, generator=gen).to(device).t()  # column-major, as _scaled_mm wants
    if kind == "float8":
        a_q, b_q = a.to(dtypes[0]), b.to(dtypes[1])
        one = torch.ones((), device=device)

        def native() -> torch.Tensor:
            return torch._scaled_mm(a_q, b_q, scale_a=one, scale_b=one, out_dtype=torch.float32)

    else:
        a_q = a.mul(30).round().clamp(-128, 127).to(torch.int8)
        b_q = b.mul(30).round().clamp(-128, 127).to(torch.int8)

        def native() -> torch.Tensor:
            return torch._int_mm(a_q, b_q)

    def emulated() -> torch.Tensor:
        if kind == "float8":
            return float8_to_float32(a_q) @ float8_to_float32(b_q)
        return a_q.float() @ b_q.float()

    with _one_cpu_thread(device):
        emulated_s = _timed(emulated, device)
        try:
            native_s = _timed(native, device)
        except (RuntimeError, NotImplementedError) as error:  # no such kernel on this device
            return ProbeResult(None, emulated_s, f"{type(error).__name__}: {str(error)[:200]}")
    return ProbeResult(native_s, emulated_s)


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Probe CPU kernels on one thread: the ratio is what matters, and a multi-threaded
    region on a loaded machine waits for its descheduled threads (measured: 24 ms instead of
    0.4 ms, whichever kernel ran)."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


_probe: Probe = _measure
