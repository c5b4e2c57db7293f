"""pytest-benchmark microbenchmarks of the fused linear ops (forward + backward) at a small shape.

    python -m pytest bench/test_bench_kernels.py --benchmark-columns=min,median,rounds

Each (op, peer) pair times one training step on CPU tensors; the rba and Liger runs also check
that their gradients agree with eager PyTorch, so a fast but wrong kernel (or a peer computing
another loss) cannot pass. The full-size table with memory ratios comes from bench/kernels.py.
"""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "rba_bench_kernels", Path(__file__).with_name("kernels.py")
)
bench_kernels = importlib.util.module_from_spec(_spec)
# dataclasses look their module up in sys.modules.
sys.modules[_spec.name] = bench_kernels
_spec.loader.exec_module(bench_kernels)

N, D, VOCAB = 256, 64, 4096


def _step(op: str, peer: str):
    spec = bench_kernels.Spec(op, peer, "cpu", N, D, VOCAB, "float32", 1)
    step, leaves = bench_kernels._build_step(spec)

    def run():
        for leaf in leaves:
            leaf.grad = None
        step()

    return run, leaves


# Liger's chunked losses run on the CPU; its log-prob peer (fused cross entropy) is Triton-only.
CASES = [(op, peer) for op in bench_kernels.OPS for peer in ("rba", "eager")] + [
    (op, "liger") for op in bench_kernels.OPS if op != "logprobs"]


@pytest.mark.parametrize("op, peer", CASES)
def test_fused_linear_fwd_bwd(benchmark, op, peer):
    if peer == "liger":
        pytest.importorskip("liger_kernel")
    benchmark.group = op
    run, leaves = _step(op, peer)
    benchmark(run)
    grads = [leaf.grad for leaf in leaves]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    # rba's and Liger's rows must compute the eager loss, or their ratios compare nothing.
    if peer in ("rba", "liger"):
        eager_run, eager_leaves = _step(op, "eager")
        eager_run()
        for mine, ref in zip(grads, (leaf.grad for leaf in eager_leaves)):
            torch.testing.assert_close(mine, ref, rtol=1e-3, atol=1e-5)
