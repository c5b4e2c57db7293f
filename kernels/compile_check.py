"""Compile every Triton kernel for real GPU targets without a GPU.

The interpreter (TRITON_INTERPRET=1) accepts programs that the GPU compiler rejects (layout,
dot-shape and type rules), so CI also lowers each kernel to a cubin for sm_80 and sm_90 with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`; ptxas ships with Triton,
so no GPU or CUDA toolkit is needed. Each module in TRITON_MODULES defines
`compile_specs() -> list[(kernel, signature, constexprs)]`.

Run it in a process where TRITON_INTERPRET is unset (the interpreter replaces @triton.jit
functions with ones that cannot be compiled):

    python -m rba_core.kernels.compile_check [--arch 80 90] [--module NAME ...]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass

# Every kernels/*_triton.py module, by its installed name. A new Triton module is added here
# (tests/kernels/test_kernels_compile.py fails while one is missing).
TRITON_MODULES = (
    "rba_core.kernels.linear_logprobs_triton",
    "rba_core.kernels.policy_loss_triton",
    "rba_core.kernels.linear_distill_triton",
    "rba_core.kernels.audio_adapter_triton",
    "rba_core.kernels.cascade_attention_triton",
)

DEFAULT_ARCHS = (80, 90)


@dataclass
class CompileResult:
    module: str
    kernel: str
    arch: int
    constexprs: dict
    seconds: float
    error: str | None


def jit_kernels(module) -> dict[str, object]:
    """The @triton.jit functions a module defines itself (not helpers it imports)."""
    import triton
    return {
        name: value for name, value in vars(module).items()
        if isinstance(value, triton.runtime.jit.JITFunction)
        and value.fn.__module__ == module.__name__
    }


def _compile_spec(module_name: str, index: int, arch: int) -> CompileResult:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, signature, constexprs = importlib.import_module(module_name).compile_specs()[index]
    start = time.perf_counter()
    error = None
    try:
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32))
        if not compiled.asm.get("cubin"):
            error = "no cubin produced"
    except Exception as exc:  # report every failing variant, not just the first
        error = f"{type(exc).__name__}: {exc}"
    return CompileResult(module_name, kernel.__name__, arch, dict(constexprs),
                         time.perf_counter() - start, error)


def compile_modules(module_names: tuple[str, ...], archs: tuple[int, ...], jobs: int = 1
                    ) -> list[CompileResult]:
    """Compile every spec of every module for every arch, `jobs` compiles at a time."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_check must run without TRITON_INTERPRET=1 (the interpreter "
                           "replaces the kernels with uncompilable ones); unset it")
    tasks = [
        (name, index, arch)
        for name in module_names
        for index in range(len(importlib.import_module(name).compile_specs()))
        for arch in archs
    ]
    if jobs <= 1 or len(tasks) <= 1:
        return [_compile_spec(*task) for task in tasks]
    # fork: the workers inherit the imported modules; nothing here has touched CUDA.
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        return list(pool.map(_compile_spec, *zip(*tasks)))


def uncovered_kernels(module_name: str) -> list[str]:
    """Kernels a module defines that none of its compile_specs builds.

    A @triton.jit function called from another one in the module is a helper, compiled as part
    of its callers; every other one is a launched kernel and needs a spec.
    """
    import re
    module = importlib.import_module(module_name)
    covered = {spec[0].__name__ for spec in module.compile_specs()}
    defined = jit_kernels(module)
    helpers = {
        name for name in defined
        if any(re.search(rf"\b{name}\s*\(", other.src) for other_name, other in defined.items()
               if other_name != name)
    }
    return sorted(set(defined) - helpers - covered)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS))
    parser.add_argument("--module", nargs="+", default=list(TRITON_MODULES))
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                        help="compiles run in parallel (default: min(4, CPU count))")
    args = parser.parse_args(argv)
    failures = 0
    for module_name in args.module:
        missing = uncovered_kernels(module_name)
        if missing:
            failures += len(missing)
            print(f"FAIL {module_name}: kernels without a compile spec: {', '.join(missing)}")
    for r in compile_modules(tuple(args.module), tuple(args.arch), args.jobs):
        status = "ok  " if r.error is None else "FAIL"
        print(f"{status} sm_{r.arch} {r.module}.{r.kernel} {r.constexprs} "
              f"({r.seconds:.2f} s){'' if r.error is None else ': ' + r.error}")
        failures += r.error is not None
    print("all kernels compiled" if not failures else f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
