"""The native CPU backend: C++ ops from ``csrc/`` for fused linear token scores and distillation.

The ops are loaded from the extension ``rba_core._C`` that ``pip install --no-build-isolation
-e .`` builds, or, in a source checkout without it, compiled just in time with
``torch.utils.cpp_extension.load`` into a cache folder (``$RBA_NATIVE_CACHE``, default
``~/.cache/rba/native``). ``RBA_NATIVE=0`` switches both off. When neither works,
:func:`available` is False and one warning says why; the public kernels then use their PyTorch
fallback.

The four backend functions share the signatures of the Triton and PyTorch backends (see the
kernel contract): every tensor is CPU, 2-D inputs contiguous, rows already compacted to valid
tokens. Each walks rows in chunks with one full-vocabulary logits GEMM per chunk, so the largest
temporary is one ``[rows, V]`` fp32 tile (:func:`tile_sizes` changes the rows) instead of
``[N, V]`` logits; the token-score ops walk ``[rows, vocab block]`` tiles instead, and their
autograd pair ``token_scores_forward_keep`` / ``token_scores_backward_kept`` keeps some of the
forward's logits so the backward recomputes fewer. The scalar losses use ``token_scores_chunk_forward`` / ``_backward`` and
``distill_fused`` to compute their gradients in the forward.
"""
from __future__ import annotations

import contextlib
import glob
import os
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Iterator, Optional

import torch

__all__ = [
    "available",
    "source",
    "unavailable_reason",
    "tile_sizes",
    "token_scores_forward",
    "token_scores_backward",
    "token_scores_forward_keep",
    "token_scores_backward_kept",
    "distill_forward",
    "distill_backward",
    "chunk_rows",
    "token_scores_chunk_forward",
    "token_scores_chunk_backward",
    "distill_fused",
]

# Must equal kAbiVersion in csrc/fused_linear_cpu.cpp; a prebuilt module from older sources is
# rebuilt just in time instead of being called with the wrong contract.
ABI_VERSION = 4

_lock = threading.Lock()
_state: dict = {"loaded": False, "module": None, "source": None, "reason": None}


def _csrc_dir() -> Optional[Path]:
    """csrc/ of a source checkout (kernels/ sits beside it), or None in an installed wheel."""
    candidate = Path(__file__).resolve().parent.parent / "csrc"
    return candidate if candidate.is_dir() else None


def _cache_dir() -> Path:
    root = os.environ.get("RBA_NATIVE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "rba", "native"
    )
    # One folder per torch version: an extension built against another torch will not load.
    path = Path(root) / f"torch-{torch.__version__}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _try_prebuilt() -> tuple[Optional[ModuleType], str]:
    try:
        from rba_core import _C  # type: ignore[attr-defined]
    except ImportError as exc:
        return None, f"the extension rba_core._C is not built ({exc})"
    if getattr(_C, "ABI_VERSION", None) != ABI_VERSION:
        return None, (
            f"rba_core._C is stale (ABI {getattr(_C, 'ABI_VERSION', None)}, expected "
            f"{ABI_VERSION}); rebuild with `pip install --no-build-isolation -e .`"
        )
    return _C, ""


def _try_jit() -> tuple[Optional[ModuleType], str]:
    csrc = _csrc_dir()
    if csrc is None:
        return None, "no csrc/ folder to build from (not a source checkout)"
    sources = sorted(glob.glob(str(csrc / "*.cpp")))
    if not sources:
        return None, f"no C++ sources in {csrc}"
    try:
        from torch.utils.cpp_extension import load

        module = load(
            name="rba_native",
            sources=sources,
            extra_cflags=["-O3", "-fno-trapping-math", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(csrc)],
            build_directory=str(_cache_dir()),
            verbose=False,
        )
    except Exception as exc:  # a missing compiler or ninja surfaces as many exception types
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"the just-in-time build failed ({first_line})"
    if getattr(module, "ABI_VERSION", None) != ABI_VERSION:
        return None, "the just-in-time build has an unexpected ABI version"
    return module, ""


def _load() -> Optional[ModuleType]:
    if _state["loaded"]:
        return _state["module"]
    with _lock:
        if _state["loaded"]:
            return _state["module"]
        module, src, reasons = None, None, []
        if os.environ.get("RBA_NATIVE", "1") == "0":
            reasons.append("disabled by RBA_NATIVE=0")
        else:
            module, why = _try_prebuilt()
            if module is not None:
                src = "prebuilt"
            else:
                reasons.append(why)
                module, why = _try_jit()
                if module is not None:
                    src = "jit"
                else:
                    reasons.append(why)
        _state.update(loaded=True, module=module, source=src)
        if module is None:
            _state["reason"] = "; ".join(reasons)
            warnings.warn(
                f"rba native CPU ops are unavailable: {_state['reason']}. CPU tensors use the "
                "PyTorch fallback (same results, more memory and time). Build them with "
                "`pip install --no-build-isolation -e .` (needs a C++ compiler).",
                RuntimeWarning,
                stacklevel=3,
            )
        return module


def available() -> bool:
    """True when the native ops are loaded (prebuilt or built just in time)."""
    return _load() is not None


def source() -> Optional[str]:
    """Where the ops came from: "prebuilt" (rba_core._C), "jit", or None when unavailable."""
    _load()
    return _state["source"]


def unavailable_reason() -> Optional[str]:
    """Why the native ops are unavailable, or None when they are loaded."""
    _load()
    return _state["reason"]


def _ops() -> ModuleType:
    module = _load()
    if module is None:
        raise RuntimeError(
            f"rba native CPU ops are unavailable ({_state['reason']}); check available() "
            "before calling the native backend"
        )
    return module


@contextlib.contextmanager
def tile_sizes(rows: int, vocab: int) -> Iterator[None]:
    """Temporarily set the rows per chunk (0: automatic, 12 * 2**20 // V rounded down to a
    multiple of 64; for the token-score ops 12 * 2**20 // vocab) and the vocabulary block
    (default 4096: the token-score ops' blocks, elsewhere the blocks in which 16-bit weights
    are converted to fp32); process-wide."""
    ops = _ops()
    old = ops.get_tile_sizes()
    ops.set_tile_sizes(int(rows), int(vocab))
    try:
        yield
    finally:
        ops.set_tile_sizes(*old)


def chunk_rows(vocab: int) -> int:
    """Rows per chunk of the ops other than token_scores_* for a vocabulary of `vocab` entries
    (256 at V = 49152)."""
    return _ops().chunk_rows(int(vocab))


def token_scores_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    ids: torch.Tensor,
    scale: float,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(logp [N], lse [N], entropy [N] or None), all float32, for z = (h W^T + b) * scale."""
    return _ops().token_scores_forward(hidden, weight, bias, ids, float(scale), bool(with_entropy))


def token_scores_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    ids: torch.Tensor,
    scale: float,
    lse: torch.Tensor,
    entropy: Optional[torch.Tensor],
    grad_logp: torch.Tensor,
    grad_entropy: Optional[torch.Tensor],
    need_weight_grad: bool,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(grad_hidden, grad_weight or None, grad_bias or None) from the forward's lse/entropy.

    grad_weight and grad_bias (when a bias is given) come back only with need_weight_grad.
    """
    return _ops().token_scores_backward(
        hidden, weight, bias, ids, float(scale), lse, entropy, grad_logp, grad_entropy,
        bool(need_weight_grad),
    )


def token_scores_forward_keep(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    ids: torch.Tensor,
    scale: float,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """token_scores_forward plus the logits tiles it keeps for token_scores_backward_kept (at
    most a quarter of the [N, V] logits and 96 MiB), so the backward recomputes fewer."""
    return _ops().token_scores_forward_keep(hidden, weight, bias, ids, float(scale),
                                            bool(with_entropy))


def token_scores_backward_kept(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    ids: torch.Tensor,
    scale: float,
    lse: torch.Tensor,
    entropy: Optional[torch.Tensor],
    grad_logp: torch.Tensor,
    grad_entropy: Optional[torch.Tensor],
    need_weight_grad: bool,
    kept: torch.Tensor,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """token_scores_backward from token_scores_forward_keep's `kept` tiles, which it
    overwrites: each may serve one backward only."""
    return _ops().token_scores_backward_kept(
        hidden, weight, bias, ids, float(scale), lse, entropy, grad_logp, grad_entropy,
        bool(need_weight_grad), kept,
    )


def distill_forward(
    s_hidden: torch.Tensor,
    s_weight: torch.Tensor,
    t_hidden: torch.Tensor,
    t_weight: torch.Tensor,
    temperature: float,
    kind: str,
    jsd_beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss_rows [N], s_lse [N], t_lse [N]) for kind "forward_kl", "reverse_kl" or "jsd"."""
    return _ops().distill_forward(
        s_hidden, s_weight, t_hidden, t_weight, float(temperature), str(kind), float(jsd_beta)
    )


def distill_backward(
    s_hidden: torch.Tensor,
    s_weight: torch.Tensor,
    t_hidden: torch.Tensor,
    t_weight: torch.Tensor,
    temperature: float,
    kind: str,
    jsd_beta: float,
    s_lse: torch.Tensor,
    t_lse: torch.Tensor,
    grad_rows: torch.Tensor,
    need_weight_grad: bool,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(grad_s_hidden, grad_s_weight or None); the teacher gets no gradient."""
    return _ops().distill_backward(
        s_hidden, s_weight, t_hidden, t_weight, float(temperature), str(kind), float(jsd_beta),
        s_lse, t_lse, grad_rows, bool(need_weight_grad),
    )


def token_scores_chunk_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    ids: torch.Tensor,
    scale: float,
    with_entropy: bool,
    logits: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(logp, lse, entropy or None) of one row chunk, in the accumulation dtype; the chunk's
    logits are left in `logits` [rows, V] (accumulation dtype) for token_scores_chunk_backward."""
    return _ops().token_scores_chunk_forward(hidden, weight, bias, ids, float(scale),
                                             bool(with_entropy), logits)


def token_scores_chunk_backward(
    logits: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    ids: torch.Tensor,
    scale: float,
    lse: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_hidden: torch.Tensor,
    grad_weight: Optional[torch.Tensor],
    grad_bias: Optional[torch.Tensor],
) -> None:
    """Gradient of sum_r grad_logp[r] * logp[r] for one row chunk, from the logits that
    token_scores_chunk_forward left (overwritten): writes grad_hidden [rows, D] and adds into
    grad_weight [V, D] and grad_bias [V] when given (all in the accumulation dtype)."""
    _ops().token_scores_chunk_backward(logits, hidden, weight, bias, ids, float(scale), lse,
                                       grad_logp, grad_hidden, grad_weight, grad_bias)


def distill_fused(
    s_hidden: torch.Tensor,
    s_weight: torch.Tensor,
    t_hidden: torch.Tensor,
    t_weight: torch.Tensor,
    temperature: float,
    kind: str,
    jsd_beta: float,
    grad_scale: float,
    need_weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(loss_rows, s_lse, t_lse, grad_s_hidden, grad_s_weight or None) of the scalar loss
    grad_scale * sum(loss_rows), gradients computed in the same pass over row chunks."""
    return _ops().distill_fused(
        s_hidden, s_weight, t_hidden, t_weight, float(temperature), str(kind), float(jsd_beta),
        float(grad_scale), bool(need_weight_grad),
    )
