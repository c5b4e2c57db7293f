"""Every Triton kernel compiles to a cubin for sm_80 and sm_90 on a machine without a GPU.

The interpreter that runs the numerical tests accepts programs the GPU compiler rejects, so this
runs rba_core.kernels.compile_check in a subprocess without TRITON_INTERPRET.
"""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rba_core.kernels.compile_check import TRITON_MODULES

KERNELS_DIR = Path(__file__).resolve().parents[2] / "kernels"


def run_compile_check(*args, extra_path=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path),
                                                          env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "rba_core.kernels.compile_check", *args],
                          env=env, capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="module")
def compile_report():
    result = run_compile_check("--jobs", "2")
    return result.returncode, result.stdout + result.stderr


def test_every_triton_module_is_listed():
    on_disk = {f"rba_core.kernels.{p.stem}" for p in KERNELS_DIR.glob("*_triton.py")}
    assert on_disk == set(TRITON_MODULES), (
        "kernels/*_triton.py and compile_check.TRITON_MODULES differ: "
        f"unlisted {sorted(on_disk - set(TRITON_MODULES))}, "
        f"missing files {sorted(set(TRITON_MODULES) - on_disk)}"
    )


@pytest.mark.parametrize("module", TRITON_MODULES)
def test_module_kernels_compile_for_sm80_and_sm90(compile_report, module):
    _, output = compile_report
    lines = [line for line in output.splitlines() if f" {module}" in line]
    failures = [line for line in lines if line.startswith("FAIL")]
    assert not failures, "\n".join(failures)
    compiled = {(m.group(1), m.group(2)) for line in lines
                if (m := re.match(rf"ok   sm_(\d+) {re.escape(module)}\.(\w+) ", line))}
    assert {arch for arch, _ in compiled} == {"80", "90"}, output[-3000:]
    kernels = {name for _, name in compiled}
    assert all(("80", k) in compiled and ("90", k) in compiled for k in kernels)


def test_compile_check_reports_gpu_rejected_kernels_and_missing_specs(tmp_path):
    """A dot with K=8 runs under the interpreter but not on a GPU; a kernel without a spec is
    reported too."""
    (tmp_path / "rba_probe_kernels.py").write_text(textwrap.dedent("""
        import triton
        import triton.language as tl


        @triton.jit
        def tiny_dot_kernel(a_ptr, c_ptr, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            a = tl.load(a_ptr + offs[:, None] * BLOCK + offs[None, :])
            tl.store(c_ptr + offs[:, None] * BLOCK + offs[None, :], tl.dot(a, a))


        @triton.jit
        def forgotten_kernel(a_ptr):
            tl.store(a_ptr, 1.0)


        def compile_specs():
            return [(tiny_dot_kernel, {"a_ptr": "*fp16", "c_ptr": "*fp32", "BLOCK": "constexpr"},
                     {"BLOCK": 8})]
    """))
    result = run_compile_check("--module", "rba_probe_kernels", "--jobs", "1",
                               extra_path=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "kernels without a compile spec: forgotten_kernel" in output
    assert re.search(r"FAIL sm_80 rba_probe_kernels\.tiny_dot_kernel .*K >= 16", output, re.S), output
    assert re.search(r"FAIL sm_90 rba_probe_kernels\.tiny_dot_kernel", output), output
