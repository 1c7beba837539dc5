"""Compiled CPU kernels for the gates' training-time masks.

A BB or DBB gate in training multiplies every (example, unit) of its layer by a
freshly drawn relaxed-Bernoulli mask. In eager PyTorch on the CPU that costs a
serial ``torch.rand`` call (about 3 ns a number, more than the layer's matmul
on two cores for the input gate of an MLP) and several passes over the
activations, forward and backward. ``masks.cpp`` draws the noise from a
counter-based generator (SplitMix64 at counter ``n K + k``, seeded from torch's
generator on every call, so ``torch.manual_seed`` and checkpointed RNG states
keep runs repeatable) and draws, applies and saves the mask in one
multi-threaded, vectorised pass; the backward pass is one more.

The kernels are built on first use with ``torch.utils.cpp_extension.load``
(about 30 s on 2 cores; needs a C++ compiler, the Python headers and ninja) into
torch's extension cache (``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``), once per machine: they are compiled for the
CPU they run on.

Which implementation the gates use is set by :func:`set_backend` or the
``BBDROP_KERNELS`` environment variable:

``"auto"`` (default)
    the compiled kernels for float32 tensors on the CPU, where they build;
    otherwise (no compiler, GPU tensors, float64) the eager implementation.
``"compiled"``
    as ``"auto"``, but a failed build is an error instead of a warning.
``"torch"``
    always the eager implementation (``torch.rand`` noise).

Both draw from the same distribution; they do not draw the same numbers, so
a run is repeatable within one backend (``results.json`` records which).
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "BACKENDS",
    "dbb_logit_phi",
    "gaussian_kl",
    "get_backend",
    "kumaraswamy_beta_kl",
    "kumaraswamy_logit",
    "load",
    "masked_mul",
    "resolved",
    "set_backend",
    "use_compiled",
]

BACKENDS = ("auto", "compiled", "torch")
ENV_VAR = "BBDROP_KERNELS"
SOURCE = Path(__file__).with_name("masks.cpp")

_lock = threading.Lock()
_module: ModuleType | None = None
_error: str | None = None  # why the build failed, once it has
_warned = False  # the "auto" fallback has said so


def _check_backend(name: str, origin: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{origin} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


_backend = _check_backend(os.environ.get(ENV_VAR, "auto"), f"the {ENV_VAR} environment variable")


def set_backend(name: str) -> None:
    """Choose the gates' training-mask implementation: "auto", "compiled" or "torch"."""
    global _backend
    _backend = _check_backend(name, "backend")


def get_backend() -> str:
    """The backend set by :func:`set_backend` or ``BBDROP_KERNELS``."""
    return _backend


def _cpu_tag() -> str:
    """What the build depends on: the source, torch, Python and the CPU's features
    (the kernels are compiled with -march=native)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    h = hashlib.sha256()
    parts = (torch.__version__, sys.version, platform.machine(), platform.processor(), flags)
    h.update(SOURCE.read_bytes())
    for part in parts:
        h.update(part.encode())
    return h.hexdigest()[:16]


def load() -> ModuleType:
    """The compiled kernels, built on the first call of a machine.

    Raises RuntimeError (with the compiler's reason) when they cannot be built.
    """
    global _module, _error
    if _module is not None:  # the hot path: every gate calls this on every step
        return _module
    with _lock:
        if _module is not None:
            return _module
        if _error is not None:
            raise RuntimeError(_error)
        from torch.utils import cpp_extension

        name = f"bbdrop_masks_{_cpu_tag()}"
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
        if not any(build_dir.glob(f"{name}*.so")):
            print(
                "bbdrop: compiling the CPU gate kernels (once per machine, about 30 s; "
                f"{ENV_VAR}=torch skips them)",
                file=sys.stderr,
                flush=True,
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's notes on compiler versions
                _module = cpp_extension.load(
                    name,
                    [str(SOURCE)],
                    extra_cflags=["-O3", "-march=native", "-fopenmp"],
                    extra_ldflags=["-fopenmp"],
                    build_directory=str(build_dir),
                    verbose=False,
                )
        except Exception as exc:  # compiler, headers or ninja missing, or a failed build
            _error = (
                f"bbdrop could not build its CPU gate kernels ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}). "
                f"They need a C++ compiler, the Python headers and ninja; set {ENV_VAR}=torch "
                "to use the eager implementation without this message"
            )
            raise RuntimeError(_error) from exc
        return _module


def use_compiled(*tensors: Tensor) -> bool:
    """Whether the gates should use the compiled kernels for these tensors."""
    if _backend == "torch":
        return False
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
        return False
    if _backend == "compiled":
        load()
        return True
    try:
        load()
    except RuntimeError as exc:
        global _warned
        if not _warned:
            warnings.warn(f"{exc}; using the eager implementation", RuntimeWarning, stacklevel=3)
            _warned = True
        return False
    return True


def resolved(device: torch.device | str = "cpu") -> str:
    """What the gates' float32 masks on ``device`` use now: "compiled" or "torch"."""
    if torch.device(device).type != "cpu":
        return "torch"
    return "compiled" if use_compiled(torch.empty(0)) else "torch"


def _seed() -> int:
    """A 63-bit seed for the counter-based generator, from torch's default generator."""
    return int(torch.empty((), dtype=torch.int64).random_())


class _MaskedMul(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: Tensor, logits1: Tensor, logits2: Tensor | None, temperature: float
    ) -> Tensor:
        x = x.contiguous()
        y, z1, z2 = _module.masked_forward(  # type: ignore[union-attr]
            x, logits1.contiguous(),
            None if logits2 is None else logits2.contiguous(), temperature, _seed(),
        )  # fmt: skip
        ctx.temperature = temperature
        ctx.per_unit = (logits1.dim() == 1, logits2 is not None and logits2.dim() == 1)
        ctx.two = logits2 is not None
        ctx.save_for_backward(x, z1, z2)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, z1, z2 = ctx.saved_tensors
        need_x, need_1, need_2 = ctx.needs_input_grad[:3]
        gx, g1, g2 = _module.masked_backward(  # type: ignore[union-attr]
            grad.contiguous(), x, z1, z2 if ctx.two else None, ctx.temperature, need_x
        )
        grad_x = gx if need_x else None
        grad_1 = (g1.sum(0) if ctx.per_unit[0] else g1) if need_1 else None
        grad_2 = (g2.sum(0) if ctx.per_unit[1] else g2) if ctx.two and need_2 else None
        return grad_x, grad_1, grad_2, None


def masked_mul(x: Tensor, logits1: Tensor, logits2: Tensor | None, temperature: float) -> Tensor:
    """``x`` times one or two relaxed-Bernoulli masks, drawn per example and unit, with
    the compiled kernels (call :func:`load` first, or check :func:`use_compiled`).

    ``x`` is (N, K) or (N, K, H, W); each ``logits`` is (K,) or (N, K); the mask is
    ``sigmoid((logits1 + L1) / t) * sigmoid((logits2 + L2) / t)`` with independent
    standard logistic noise L1, L2 (one factor when ``logits2`` is None).
    """
    load()
    return _MaskedMul.apply(x, logits1, logits2, temperature)


class _UnitFunction(torch.autograd.Function):
    """A per-unit quantity of the raw BB parameters, with its local derivatives from
    the kernel: the backward pass is two products."""

    @staticmethod
    def forward(ctx: Any, a_raw: Tensor, b_raw: Tensor, outputs: Any) -> Tensor:
        value, da, db = outputs
        ctx.save_for_backward(da, db)
        return value

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        da, db = ctx.saved_tensors
        return (
            grad * da if ctx.needs_input_grad[0] else None,
            grad * db if ctx.needs_input_grad[1] else None,
            None,
        )


def kumaraswamy_logit(
    a_raw: Tensor, b_raw: Tensor, u: Tensor, a_min: float, b_min: float, b_max: float
) -> Tensor:
    """``logit(pi)``, ``pi = (1 - u^(1/b))^(1/a)``, with ``a = softplus(max(a_raw, a_min))``
    and ``b = softplus(clamp(b_raw, b_min, b_max))``, from the compiled kernels:
    :func:`bbdrop.gates.functional.kumaraswamy_logit_rsample` in one call."""
    module = load()
    outputs = module.kumaraswamy_logit(a_raw.detach(), b_raw.detach(), u, a_min, b_min, b_max)
    return _UnitFunction.apply(a_raw, b_raw, outputs)


def kumaraswamy_beta_kl(
    a_raw: Tensor, b_raw: Tensor, c: float, a_min: float, b_min: float, b_max: float
) -> Tensor:
    """KL(Kumaraswamy(a, b) || Beta(c, 1)) per unit, ``a`` and ``b`` as in
    :func:`kumaraswamy_logit`, from the compiled kernels:
    :func:`bbdrop.gates.functional.kumaraswamy_beta_kl` in one call."""
    module = load()
    outputs = module.kumaraswamy_beta_kl(a_raw.detach(), b_raw.detach(), c, a_min, b_min, b_max)
    return _UnitFunction.apply(a_raw, b_raw, outputs)


def gaussian_kl(mean: Tensor, s_raw: Tensor, s_min: float, prior_std: float) -> Tensor:
    """KL(N(mean, s^2) || N(0, prior_std^2)) per unit, ``s = softplus(max(s_raw, s_min))``,
    from the compiled kernels: :func:`bbdrop.gates.functional.gaussian_kl` in one call."""
    module = load()
    outputs = module.gaussian_kl(mean.detach(), s_raw.detach(), s_min, prior_std)
    return _UnitFunction.apply(mean, s_raw, outputs)


class _DBBLogitPhi(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, shift: Tensor, scale: Tensor, x: Tensor, norm_eps: float, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        logit, mean, var, u, dlogit = _module.dbb_logit_phi(  # type: ignore[union-attr]
            x, shift.detach().contiguous(), scale.detach().contiguous(), norm_eps, eps
        )
        ctx.save_for_backward(u, dlogit)
        ctx.mark_non_differentiable(mean, var)
        return logit, mean, var

    @staticmethod
    def backward(ctx: Any, grad: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        u, dlogit = ctx.saved_tensors
        g_shift, g_scale = _module.dbb_logit_phi_backward(  # type: ignore[union-attr]
            grad.contiguous(), u, dlogit
        )
        return g_shift, g_scale, None, None, None


def dbb_logit_phi(
    x: Tensor, shift: Tensor, scale: Tensor, norm_eps: float, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """DBB's training-time ``logit(phi)`` with batch statistics, from the compiled kernels.

    ``h`` is ``x`` (detached) averaged over its trailing dimensions; returns
    ``logit(clamp(shift + scale (h - mean) / sqrt(var + norm_eps), eps, 1 - eps))``,
    differentiable w.r.t. ``shift`` and ``scale`` (both (K,)), and the batch mean and
    biased variance of ``h`` for the running statistics.
    """
    load()
    return _DBBLogitPhi.apply(shift, scale, x.detach().contiguous(), norm_eps, eps)
