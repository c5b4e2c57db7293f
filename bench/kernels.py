"""Forward + backward time and peak extra memory of rba's fused linear ops against their peers.

    python bench/kernels.py            # CPU: N=2048, D=576, V=49152; GPU (CUDA): N=8192, D=4096,
                                       # V=128256 and 151936
    python bench/kernels.py --quick    # small shapes, for a smoke run

Ops: per-token log-probs, the GRPO policy loss, and distillation (forward KL, reverse KL, JSD).
Peers: eager PyTorch (full [N, V] logits), torch.compile of that same eager code, and
Liger-Kernel (0.8). Liger's chunked losses are plain PyTorch (torch.compile'd, its default) and
run on the CPU too: LigerFusedLinearGRPOLoss for the policy loss and LigerFusedLinearJSDLoss for
distillation (its beta 0 is the forward KL, 1 the reverse KL, 0.5 the JSD, as rba's; hard-label
weight 0). Its Triton ops (fused linear cross entropy for log-probs, LigerFusedLinearJSD for the
JSD on CUDA) are n/a on the CPU. The rba op runs with backend="auto": the native C++ op on CPU,
Triton on CUDA.

Both sides of the policy loss compute one loss from the same tensors: hidden [B, T, D] with
B = 4 sequences of T = N / 4 tokens (the last T / 8 of each masked out), per-sequence advantages
[B] (Liger's input; rba broadcasts them over each sequence's tokens), old and reference
log-probs [B, T], GRPO normalisation (each sequence's mean, then the mean over sequences),
clip eps 0.2, k3 KL at beta 0.04. Liger processes one sequence per chunk (its chunk_size=1).

Every measurement runs in a fresh subprocess so no peer inherits another's allocations or
compiled code. The subprocess builds the inputs, runs one untimed warm-up step (compiling and
loading everything), drops the gradients, then:
- CPU memory: ATen allocates through malloc, which tracemalloc and torch.profiler do not see,
  so we read the kernel's resident-set high-water mark (VmHWM). It is reset after the warm-up
  (writing 5 to /proc/self/clear_refs), and glibc is told to serve every block of 64 KiB or more
  with mmap (MALLOC_MMAP_THRESHOLD_) so that freed memory leaves the resident set at once instead
  of lingering in malloc's arenas and hiding later allocations. That setting slows allocation,
  so CPU memory and CPU time come from two separate subprocesses; time runs with stock malloc.
- GPU memory: torch.cuda.max_memory_allocated after reset_peak_memory_stats (same process).
- extra = peak - (resident before the step, which holds the inputs) - the gradients of hidden
  and weight, which every peer must return.
- time: the median over the timed steps (taken round-robin across the peers).
The last printed line is one JSON object with every measured ratio, rba / peer (lower is better).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

from rba_core.dtypes import parse_dtype

OPS = ("logprobs", "policy_loss", "distill_forward_kl", "distill_reverse_kl", "distill_jsd")
PEERS = ("rba", "eager", "compile", "liger")


@dataclass
class Spec:
    op: str
    peer: str
    device: str
    n: int
    d: int
    vocab: int
    dtype: str
    reps: int


# ---------------------------------------------------------------------------------------------
# The code each peer runs (imported lazily inside the worker subprocess).


def _eager_logprobs(h, w, ids):
    logits = (h @ w.T).float()
    return torch.log_softmax(logits, dim=-1).gather(1, ids[:, None]).squeeze(1)


def _eager_policy_loss(h, w, ids, adv, old, ref, mask, eps=0.2, beta=0.04):
    logp = _eager_logprobs(h, w, ids).view(mask.shape)
    ratio = torch.exp(logp - old)
    a = adv[:, None]
    per_token = -torch.minimum(ratio * a, torch.clamp(ratio, 1 - eps, 1 + eps) * a)
    delta = ref - logp
    per_token = per_token + beta * (torch.exp(delta) - delta - 1)
    m = mask.float()
    return ((per_token * m).sum(1) / m.sum(1).clamp_min(1)).mean()


def _eager_distill(hs, ws, ht, wt, kind, beta=0.5):
    log_ps = torch.log_softmax((hs @ ws.T).float(), dim=-1)
    with torch.no_grad():
        log_pt = torch.log_softmax((ht @ wt.T).float(), dim=-1)
    if kind == "forward_kl":
        rows = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    elif kind == "reverse_kl":
        rows = (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    else:
        log_m = torch.logaddexp(log_pt + math.log(beta), log_ps + math.log(1 - beta))
        rows = (beta * (log_pt.exp() * (log_pt - log_m)).sum(-1)
                + (1 - beta) * (log_ps.exp() * (log_ps - log_m)).sum(-1))
    return rows.mean()


def _build_step(spec: Spec) -> tuple[Callable[[], None], list]:
    """The fwd+bwd closure for one (op, peer), and the leaf tensors whose grads it produces."""
    torch.manual_seed(0)
    dev = torch.device(spec.device)
    dtype = parse_dtype(spec.dtype)
    n, d, vocab = spec.n, spec.d, spec.vocab
    h = (torch.randn(n, d, device=dev) * 0.5).to(dtype).requires_grad_()
    w = (torch.randn(vocab, d, device=dev) / d**0.5).to(dtype).requires_grad_()
    ids = torch.randint(0, vocab, (n,), device=dev)
    leaves = [h, w]

    if spec.op == "logprobs":
        g = torch.randn(n, device=dev)
        if spec.peer == "rba":
            from rba_core.kernels import fused_linear_logprobs

            def step():
                (fused_linear_logprobs(h, w, ids) * g).sum().backward()
        elif spec.peer == "liger":
            if spec.device != "cuda":
                raise _NotApplicable("n/a on CPU (Triton-only)")
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            ce = LigerFusedLinearCrossEntropyLoss(reduction="sum")

            # Liger has no per-token log-prob op; its fused cross entropy is the nearest peer.
            def step():
                ce(w, h, ids).backward()
        else:
            fn = _eager_logprobs
            if spec.peer == "compile":
                fn = torch.compile(fn)

            def step():
                (fn(h, w, ids) * g).sum().backward()
        return step, leaves

    if spec.op == "policy_loss":
        b = 4 if n % 4 == 0 else 1
        t = n // b
        h3 = h.detach().view(b, t, d).requires_grad_()
        leaves = [h3, w]
        ids2 = ids.view(b, t)
        adv = torch.randn(b, device=dev)
        old = -torch.rand(b, t, device=dev) * 5 - 8
        ref = old + 0.1 * torch.randn(b, t, device=dev)
        mask = torch.ones(b, t, dtype=torch.bool, device=dev)
        mask[:, t - t // 8:] = False
        if spec.peer == "rba":
            from rba_core.kernels import fused_linear_policy_loss

            def step():
                loss, _ = fused_linear_policy_loss(h3, w, ids2, adv, old, ref, mask, beta=0.04,
                                                   loss_type="grpo", kl_estimator="k3")
                loss.backward()
        elif spec.peer == "liger":
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

            grpo = LigerFusedLinearGRPOLoss(beta=0.04, loss_type="grpo")

            def step():
                out = grpo(h3, w, ids2, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old)
                (out[0] if isinstance(out, tuple) else out).backward()
        else:
            fn = _eager_policy_loss
            if spec.peer == "compile":
                fn = torch.compile(fn)

            def step():
                fn(h3.view(n, d), w, ids, adv, old, ref, mask).backward()
        return step, leaves

    kind = spec.op.removeprefix("distill_")
    ht = (torch.randn(n, d, device=dev) * 0.5).to(dtype)
    wt = (torch.randn(vocab, d, device=dev) / d**0.5).to(dtype)
    if spec.peer == "rba":
        from rba_core.kernels import fused_linear_distill_loss

        def step():
            fused_linear_distill_loss(h, w, ht, wt, kind=kind, jsd_beta=0.5,
                                      temperature=1.0).backward()
    elif spec.peer == "liger" and kind == "jsd" and spec.device == "cuda":
        from liger_kernel.transformers import LigerFusedLinearJSD

        # beta = 0.5 is symmetric, so Liger's and rba's beta conventions agree here.
        jsd = LigerFusedLinearJSD(jsd_beta=0.5, temperature=1.0)

        def step():
            jsd(h, w, ht, wt).backward()
    elif spec.peer == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        beta = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": 0.5}[kind]
        # Soft loss alone (no hard-label cross entropy), averaged over the N tokens like rba's.
        divergence = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0,
                                             beta=beta, temperature=1.0)

        def step():
            divergence(h, w, ht, wt, ids).backward()
    else:
        fn = _eager_distill
        if spec.peer == "compile":
            fn = torch.compile(fn)

        def step():
            fn(h, w, ht, wt, kind).backward()
    return step, leaves


class _NotApplicable(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Worker: one measurement in a fresh process.


def _proc_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _warm(step: Callable[[], None], leaves: list, device: str) -> None:
    """One untimed step (compiles, loads the extension, touches the code paths), grads dropped."""
    import gc

    step()
    _sync(device)
    for leaf in leaves:
        leaf.grad = None
    gc.collect()


def _memory_worker(spec: Spec) -> dict:
    """Peak extra memory of one step of one peer, alone in this process."""
    try:
        step, leaves = _build_step(spec)
    except (ImportError, _NotApplicable) as exc:
        return {"na": str(exc).splitlines()[0][:60]}
    cuda = spec.device == "cuda"
    _warm(step, leaves, spec.device)
    if cuda:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        base = _proc_kib("VmRSS") * 1024
    step()
    _sync(spec.device)
    peak = torch.cuda.max_memory_allocated() if cuda else _proc_kib("VmHWM") * 1024
    held = sum(leaf.grad.numel() * leaf.grad.element_size() for leaf in leaves
               if leaf.grad is not None)
    return {"extra_bytes": max(peak - base - held, 0), "grad_bytes": held}


def _timing_worker(specs: list[Spec]) -> dict:
    """Step time of every peer of one op, measured round-robin in this one process.

    On a shared machine the available CPU drifts by several times within a minute; taking the
    peers' steps in turn and keeping each one's median puts them under the same conditions (a
    single lucky step cannot decide a ratio).
    """
    runs, out = {}, {}
    for spec in specs:
        try:
            step, leaves = _build_step(spec)
        except (ImportError, _NotApplicable) as exc:
            out[spec.peer] = {"na": str(exc).splitlines()[0][:60]}
            continue
        _warm(step, leaves, spec.device)
        runs[spec.peer] = (step, leaves, [])
    for _ in range(max(spec.reps for spec in specs)):
        for step, leaves, times in runs.values():
            t0 = time.perf_counter()
            step()
            _sync(specs[0].device)
            times.append(time.perf_counter() - t0)
            for leaf in leaves:
                leaf.grad = None
    for peer, (_, _, times) in runs.items():
        out[peer] = {"time_s": statistics.median(times)}
    return out


def _run_worker(spec, timeout: float, mmap_all: bool) -> dict:
    """Runs _memory_worker (one Spec) or _timing_worker (a list) in a fresh subprocess."""
    env = dict(os.environ)
    if mmap_all:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    env.setdefault("TRITON_INTERPRET", "0")
    payload = [asdict(x) for x in spec] if isinstance(spec, list) else asdict(spec)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(payload)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail[:100]}
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------------
# Driver.


def _liger_status() -> Optional[str]:
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return "n/a (liger-kernel not installed)"
    return None


def _fmt_mb(x: Optional[float]) -> str:
    return "-" if x is None else f"{x / 2**20:,.1f}"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes for a smoke run")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma list from {OPS}")
    parser.add_argument("--reps", type=int, default=5,
                        help="timed steps per peer, taken round-robin across the peers")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        payload = json.loads(args.worker)
        if isinstance(payload, list):
            print(json.dumps(_timing_worker([Spec(**x) for x in payload])))
        else:
            print(json.dumps(_memory_worker(Spec(**payload))))
        return 0

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        card = torch.cuda.get_device_name()
        shapes = [(8192, 4096, 128256), (8192, 4096, 151936)]
        dtype = "bfloat16"
        if args.quick:
            shapes = [(2048, 1024, 32768)]
    else:
        card = f"CPU, {torch.get_num_threads()} threads"
        shapes = [(2048, 576, 49152)]
        dtype = "float32"
        if args.quick:
            shapes = [(512, 128, 8192)]
    ops = [op for op in args.ops.split(",") if op]
    unknown = set(ops) - set(OPS)
    if unknown:
        parser.error(f"unknown ops {sorted(unknown)}; choose from {OPS}")
    liger_na = _liger_status()
    if device == "cpu":
        from rba_core.kernels import native

        backend = "native C++" if native.available() else "PyTorch fallback (native not built)"
    else:
        backend = "Triton"

    print(f"# rba fused linear ops, forward + backward; device: {card}; dtype {dtype}; "
          f"rba backend: {backend}; torch {torch.__version__}")
    header = (f"{'op':<20} {'N':>5} {'D':>5} {'V':>7} {'peer':<8} {'time s':>8} "
              f"{'extra MB':>10} {'rba time/peer':>14} {'rba mem/peer':>13}")
    print(header)
    print("-" * len(header))
    ratios: dict[str, Optional[float]] = {}
    for n, d, vocab in shapes:
        vtag = "" if len(shapes) == 1 else f"_v{vocab}"
        for op in ops:
            peers = [p for p in PEERS if not (p == "liger" and liger_na)]
            results = {p: {} for p in PEERS}
            if liger_na:
                results["liger"] = {"na": liger_na}
            for peer in peers:
                results[peer].update(_run_worker(Spec(op, peer, device, n, d, vocab, dtype, 1),
                                                 args.timeout, mmap_all=device == "cpu"))
            timing = _run_worker([Spec(op, p, device, n, d, vocab, dtype, args.reps)
                                  for p in peers], args.timeout, mmap_all=False)
            for peer in peers:
                if "error" in timing:
                    results[peer].setdefault("error", timing["error"])
                else:
                    results[peer].update(timing[peer])
            mine = results["rba"]
            for peer in PEERS:
                r = results[peer]
                prefix = f"{op:<20} {n:>5} {d:>5} {vocab:>7} {peer:<8}"
                if "time_s" not in r or "extra_bytes" not in r:
                    print(f"{prefix} {r.get('na') or r.get('error')}")
                    if peer != "rba":
                        ratios[f"{op}_{device}{vtag}_time_vs_{peer}"] = None
                        ratios[f"{op}_{device}{vtag}_peak_mem_vs_{peer}"] = None
                    continue
                t_ratio = m_ratio = None
                if peer != "rba" and "time_s" in mine and "extra_bytes" in mine:
                    t_ratio = mine["time_s"] / r["time_s"]
                    m_ratio = mine["extra_bytes"] / max(r["extra_bytes"], 1)
                    ratios[f"{op}_{device}{vtag}_time_vs_{peer}"] = round(t_ratio, 3)
                    ratios[f"{op}_{device}{vtag}_peak_mem_vs_{peer}"] = round(m_ratio, 4)
                print(f"{prefix} {r['time_s']:>8.3f} {_fmt_mb(r['extra_bytes']):>10} "
                      f"{'' if t_ratio is None else f'{t_ratio:.2f}':>14} "
                      f"{'' if m_ratio is None else f'{m_ratio:.3f}':>13}")
            sys.stdout.flush()
    print(json.dumps(ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
