"""Cascade attention against plain attention over each sample's concatenated K/V (float64)."""
import pytest
import torch

from rba_core.kernels.cascade_attention import attention_reference, cascade_attention


def _case(dtype, *, B=3, G=3, Hkv=2, rep=3, D=16, P=21, T=9, Tq=1, drop=(), rows_extra=2):
    """Random ragged prompts and suffixes; ``drop`` removes samples (finished ones)."""
    Hq = Hkv * rep
    prefix_lens = torch.randint(1, P + 1, (B,))
    prefix_lens[0] = P
    sample_prompt = torch.arange(B).repeat_interleave(G)
    keep = torch.tensor([s not in drop for s in range(B * G)])
    sample_prompt = sample_prompt[keep]
    S = sample_prompt.numel()
    # Storage rows are a shuffled subset so that the sample -> row indirection is exercised.
    sample_rows = torch.randperm(S + rows_extra)[:S]
    suffix_lens = torch.randint(Tq, T + 1, (S,))
    q = torch.randn(S, Tq, Hq, D, dtype=torch.float64)
    pk = torch.randn(B, Hkv, P, D, dtype=torch.float64)
    pv = torch.randn(B, Hkv, P, D, dtype=torch.float64)
    sk = torch.randn(S + rows_extra, Hkv, T, D, dtype=torch.float64)
    sv = torch.randn(S + rows_extra, Hkv, T, D, dtype=torch.float64)
    # Keys past each valid length hold huge values: any leak past the masks shows.
    for b in range(B):
        pk[b, :, prefix_lens[b]:] = 1e4
        pv[b, :, prefix_lens[b]:] = 1e4
    for s in range(S):
        sk[sample_rows[s], :, suffix_lens[s]:] = 1e4
        sv[sample_rows[s], :, suffix_lens[s]:] = 1e4
    tensors = [t.to(dtype) for t in (q, pk, pv, sk, sv)]
    return tensors, prefix_lens, suffix_lens, sample_prompt, sample_rows


def _oracle(tensors, prefix_lens, suffix_lens, sample_prompt, sample_rows):
    q, pk, pv, sk, sv = (t.double() for t in tensors)
    return attention_reference(q, pk, pv, prefix_lens, sk, sv, suffix_lens, sample_prompt,
                               sample_rows)


TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float64: 1e-10}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("drop", [(1, 4, 5), ()])
def test_decode_matches_concatenated_attention(backend, dtype, drop):
    G = 3
    tensors, plen, slen, sp, rows = _case(dtype, G=G, drop=drop)
    expected = _oracle(tensors, plen, slen, sp, rows)
    q, pk, pv, sk, sv = tensors
    # Group starts and the group bound given up front: the sync-free call the engine makes.
    starts = torch.cat([torch.zeros(1, dtype=torch.long),
                        torch.bincount(sp, minlength=3).cumsum(0)])
    out = cascade_attention(q, pk, pv, plen, sk, sv, slen, sp, rows, backend=backend,
                            max_group=G, group_starts=starts)
    assert out.dtype == dtype and out.shape == expected.shape
    err = (out.double() - expected).abs().max().item()
    assert err < (1e-5 if dtype == torch.float32 else 3e-2), err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_without_gqa_and_single_group(dtype):
    tensors, plen, slen, sp, rows = _case(dtype, B=1, G=5, Hkv=3, rep=1, D=24, P=70, T=3)
    expected = _oracle(tensors, plen, slen, sp, rows)
    out = cascade_attention(*tensors[:3], plen, *tensors[3:], slen, sp, rows, backend="triton")
    assert (out.double() - expected).abs().max().item() < (1e-5 if dtype == torch.float32 else 3e-2)


def test_triton_overwrites_poisoned_output(monkeypatch):
    tensors, plen, slen, sp, rows = _case(torch.float32)
    poisoned = []
    real_empty = torch.empty

    def poison_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)
        poisoned.append(t)
        return t

    from rba_core.kernels import cascade_attention_triton

    monkeypatch.setattr(cascade_attention_triton.torch, "empty", poison_empty)
    out = cascade_attention(*tensors[:3], plen, *tensors[3:], slen, sp, rows, backend="triton")
    monkeypatch.undo()
    assert len(poisoned) >= 4  # acc, m, l and the output were all poisoned
    assert torch.isfinite(out).all()
    expected = _oracle(tensors, plen, slen, sp, rows)
    assert (out.double() - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_multi_token_queries_forward_and_backward(dtype):
    tensors, plen, slen, sp, rows = _case(dtype, Tq=4, drop=(2,))
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = cascade_attention(*leaves[:3], plen, *leaves[3:], slen, sp, rows)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in tensors]
    expected = attention_reference(*ref_leaves[:3], plen, *ref_leaves[3:], slen, sp, rows)
    tol = TOL[dtype] * (1 if dtype != torch.bfloat16 else 2) * 10
    scale_out = expected.abs().max().item()
    assert (out.double() - expected).abs().max().item() < tol * max(1.0, scale_out)
    weight = torch.randn_like(expected)
    (out.double() * weight).sum().backward()
    (expected * weight).sum().backward()
    for got, want in zip(leaves, ref_leaves):
        assert got.grad is not None and torch.isfinite(got.grad).all()
        err = (got.grad.double() - want.grad).abs().max().item()
        assert err < tol * max(1.0, want.grad.abs().max().item()), err


def test_bad_inputs_raise_clear_errors():
    tensors, plen, slen, sp, rows = _case(torch.float32, Tq=2)
    q, pk, pv, sk, sv = tensors
    with pytest.raises(ValueError, match="Tq == 1"):
        cascade_attention(q, pk, pv, plen, sk, sv, slen, sp, rows, backend="triton")
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        cascade_attention(q[:, :, :5], pk, pv, plen, sk, sv, slen, sp, rows)
    with pytest.raises(ValueError, match="head size"):
        cascade_attention(q, pk[..., :8], pv[..., :8], plen, sk, sv, slen, sp, rows)
    with pytest.raises(ValueError, match="suffix_lens"):
        cascade_attention(q, pk, pv, plen, sk, sv, slen[:-1], sp, rows)
    with pytest.raises(ValueError, match="backend"):
        cascade_attention(q, pk, pv, plen, sk, sv, slen, sp, rows, backend="cuda")
    with pytest.raises(ValueError, match="no backward"):
        cascade_attention(q[:, :1].requires_grad_(True), pk, pv, plen, sk, sv, slen, sp, rows,
                          backend="triton")
