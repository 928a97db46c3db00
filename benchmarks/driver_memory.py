"""What the CUDA driver holds for a process beyond torch's pool, read where it can be read.

The accuracy tables see pynvml's process memory less torch's reserved bytes step by 128 MiB
between models. One suspect was the driver's local-memory reservation, which grows (and stays
grown) when a kernel needing more per-thread local memory (stack, register spills) than reserved
so far is launched. These readouts let a trainer run record that state beside its memory: the
context's per-thread stack limit, and the local memory of every Triton kernel the process compiled.
On the H100 (session 9) the limit stayed at 1,024 B a thread and the kernels need 16 B at most, while
the step followed bitsandbytes' first optimizer launch (benchmarks/results/session9/README.md).
"""

from __future__ import annotations

import ctypes

CU_LIMIT_STACK_SIZE = 0x00
CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES = 3


def _libcuda():
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None


def stack_limit_bytes() -> int | None:
    """The current context's per-thread stack limit (``cuCtxGetLimit(CU_LIMIT_STACK_SIZE)``), or None."""
    lib = _libcuda()
    if lib is None:
        return None
    value = ctypes.c_size_t()
    return value.value if lib.cuCtxGetLimit(ctypes.byref(value), CU_LIMIT_STACK_SIZE) == 0 else None


def outside_pool_bytes() -> int | None:
    """pynvml's process memory less torch's reserved bytes now (the CUDA context included), or None without NVML."""
    import torch

    from vramplan.gpu import used_memory_bytes

    used = used_memory_bytes()
    return None if used is None else used - torch.cuda.memory_reserved()


def _local_bytes(lib, function) -> int | None:
    value = ctypes.c_int()
    handle = ctypes.c_void_p(int(function))
    ok = lib.cuFuncGetAttribute(ctypes.byref(value), CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES, handle) == 0
    return value.value if ok else None


def triton_kernels_with_local_memory(modules=None) -> list[dict]:
    """How many Triton kernels of ``modules`` (default: vramplan_kernels') are compiled, then each one that
    spills or uses local memory: its name, local bytes a thread, spills and registers."""
    import importlib
    import pkgutil

    from triton.runtime.jit import JITFunction

    lib = _libcuda()
    if modules is None:
        import vramplan_kernels

        modules = [importlib.import_module(f"vramplan_kernels.{m.name}") for m in pkgutil.iter_modules(vramplan_kernels.__path__)]
    rows, compiled = [], 0
    for module in modules:
        for name, fn in vars(module).items():
            if not isinstance(fn, JITFunction):  # an autotuner or heuristics wrapper holds the JITFunction
                fn = getattr(fn, "fn", None)
            if not isinstance(fn, JITFunction):
                continue
            for caches in getattr(fn, "device_caches", {}).values():
                kernels = [k for c in (caches if isinstance(caches, tuple) else (caches,)) if isinstance(c, dict)
                           for k in c.values() if hasattr(k, "n_spills")]
                compiled += len(kernels)
                for kernel in kernels:
                    function = getattr(kernel, "function", None)
                    local = _local_bytes(lib, function) if lib is not None and function else None
                    spills = getattr(kernel, "n_spills", None)
                    if local or spills:
                        rows.append({"kernel": f"{module.__name__.rsplit('.', 1)[-1]}.{name}", "local_bytes": local,
                                     "spills": spills, "registers": getattr(kernel, "n_regs", None)})
    return [{"compiled": compiled}] + rows
