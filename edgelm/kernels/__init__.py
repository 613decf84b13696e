"""edgelm's own CPU kernels (`cpu.cpp`), built on first use with torch's C++ extension tooling.

`ext()` returns the compiled module, or None when it cannot be had (no C++ compiler, a build error,
or `EDGELM_KERNELS=0`): every caller then falls back to stock PyTorch ops, so edgelm runs anywhere
and the kernels are purely a speed-up. The build (~1 min, once) is cached under
`$EDGELM_CACHE` (default ~/.cache/edgelm/kernels), keyed by the source's hash and the ISA flags.
"""

import hashlib
import logging
import os
import pathlib
import warnings
import weakref

import torch

log = logging.getLogger(__name__)
SOURCE = pathlib.Path(__file__).with_name("cpu.cpp")
_state: dict = {}
# module -> (its buffers' addresses, C++ Linear); outside the module so deepcopy/pickle never see it
_HANDLES: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _isa_flags() -> list[str]:
    """AVX2+FMA+F16C when this CPU has them (every x86-64 since 2013), else portable scalar code."""
    try:
        flags = pathlib.Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        flags = []
    if {"avx2", "fma", "f16c"} <= set(flags):
        return ["-mavx2", "-mfma", "-mf16c", "-mtune=native"]  # tuning only: the ISA stays AVX2
    return []


def enabled() -> bool:
    return os.environ.get("EDGELM_KERNELS", "1") not in ("0", "false", "no")


def ext():
    """The compiled kernel module, or None (see the module docstring)."""
    if not enabled():
        return None
    if "mod" not in _state:
        _state["mod"] = _build()
    return _state["mod"]


def _build():
    # -fopenmp: at::parallel_for is an inline OpenMP loop; libgomp.so.1 resolves to the copy torch
    # already loaded, so both share one thread pool.
    # -ffp-contract=off: scalar code rounds like the torch references (no implicit FMA), so the
    # C++ dequantize is bit-exact; the vector kernels use explicit FMA intrinsics anyway.
    flags = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off", *_isa_flags()]
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode() + torch.__version__.encode()).hexdigest()[:12]
    name = f"edgelm_cpu_{digest}"
    root = pathlib.Path(os.environ.get("EDGELM_CACHE", pathlib.Path.home() / ".cache" / "edgelm")) / "kernels" / name
    try:
        from torch.utils import cpp_extension

        root.mkdir(parents=True, exist_ok=True)
        if not any(root.glob("*.so")):
            log.warning("edgelm: building CPU kernels (once, ~1 min) in %s", root)
        return cpp_extension.load(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            build_directory=str(root),
            verbose=False,
        )
    except Exception as e:  # no compiler, missing headers, ...: stock kernels still work
        warnings.warn(f"edgelm CPU kernels unavailable ({type(e).__name__}: {e}); using stock PyTorch kernels")
        return None


def available() -> bool:
    return ext() is not None


def linear_handle(module: torch.nn.Module, kind: int, w: torch.Tensor, s: torch.Tensor | None, bias):
    """The C++ Linear (`make_linear`: kind 0 dense fp32, 1 int4 blocks, 2 int8) over `module`'s
    own buffers, cached per module and rebuilt when a buffer is replaced."""
    key = (kind, w.data_ptr(), None if s is None else s.data_ptr(), None if bias is None else bias.data_ptr())
    cached = _HANDLES.get(module)
    if cached is None or cached[0] != key:
        b = None if bias is None else bias.detach().float().contiguous()
        scales = torch.empty(0) if s is None else s
        cached = _HANDLES[module] = (key, ext().make_linear(kind, w.detach(), scales, b))
    return cached[1]


def dense_handle(m: torch.nn.Module):
    """The C++ Linear over a dense fp32 nn.Linear's own weight; None for anything else."""
    if type(m) is not torch.nn.Linear or m.weight.dtype != torch.float32 or ext() is None:
        return None
    return linear_handle(m, 0, m.weight, None, m.bias)


FEW_ROW_LINEARS = True  # False: `linear` always calls the module (benchmarks' plain path)
_SLICES: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def stacked_linear(m: torch.nn.Module, e: int, x: torch.Tensor) -> torch.Tensor | None:
    """x @ m.weight[e].T for a stacked fp32 weight (E, out, in) (a MoE's experts) by the few-rows
    kernel, or None when it does not apply. One handle per expert slice, cached per module."""
    w = m.weight
    mod = _few_rows_ext(x, w.shape[-1])
    if not FEW_ROW_LINEARS or mod is None or w.dtype != torch.float32 or not w.is_contiguous():
        return None
    cached = _SLICES.get(m)
    if cached is None or cached[0] != w.data_ptr():
        cached = _SLICES[m] = (w.data_ptr(), [None] * w.shape[0])
    handles = cached[1]
    if handles[e] is None:
        handles[e] = mod.make_linear(0, w[e].detach(), torch.empty(0), None)
    return mod.linear(handles[e], x.contiguous())


def _few_rows_ext(x: torch.Tensor, in_features: int):
    """The kernel module when x (..., in_features) is few fp32 rows outside autograd, else None."""
    if x.dtype != torch.float32 or torch.is_grad_enabled():
        return None
    mod = ext()
    return mod if mod is not None and x.numel() <= mod.few_rows * in_features else None


def linear(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """m(x), with few rows of a dense fp32 nn.Linear on the C++ kernel (`dense_linear`): on this
    CPU MKL's GEMV reads a weight at ~60% of the kernel's speed, and its GEMM for 2-64 rows costs
    3-6x its GEMV. The module runs itself when hooks watch it (the profiler's breakdown)."""
    if FEW_ROW_LINEARS and not (m._forward_hooks or m._forward_pre_hooks):
        out = dense_linear(m, x)
        if out is not None:
            return out
    return m(x)


def dense_linear(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """m(x) by the C++ few-rows fp32 kernel, or None when it does not apply (no kernels, autograd,
    not a dense fp32 nn.Linear, more rows than the kernel's `few_rows`, where it would hand them to
    MKL anyway). Used for a dense LM head: an 8-row verify or batched step reads the 113 MB fp32
    head of a 49K vocabulary once (~1.1x one row), where MKL's GEMM costs 3-6x its one-row GEMV on
    this CPU. Each row's output is the same for any rows beside it (tests/test_kernels.py)."""
    mod = _few_rows_ext(x, getattr(m, "in_features", 0))
    handle = None if mod is None else dense_handle(m)
    return None if handle is None else mod.linear(handle, x.contiguous())
