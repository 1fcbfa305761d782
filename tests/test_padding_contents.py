"""Slots past a sequence's length (right padding, unused KV-cache slots) are never read: whatever they hold,
NaN and inf included, the outputs and gradients equal those of clean zero padding, on every backend."""
import pytest
import torch

from entflash import entmax_attention

BACKENDS = ["torch", "triton"]  # "triton" runs through the interpreter on CPU (tests/conftest.py)


def _problem(poison: float, seed: int):
    torch.manual_seed(seed)
    B, Hq, Hkv, Nq, Nk, D = 3, 4, 2, 40, 72, 16
    q = torch.randn(B, Hq, Nq, D)
    k = torch.randn(B, Hkv, Nk, D)
    v = torch.randn(B, Hkv, Nk, D)
    seqlens_q = torch.tensor([40, 17, 0], dtype=torch.int32)
    seqlens_k = torch.tensor([72, 30, 5], dtype=torch.int32)
    for b in range(B):
        q[b, :, seqlens_q[b]:] = poison
        k[b, :, seqlens_k[b]:] = poison
        v[b, :, seqlens_k[b]:] = poison
    return q, k, v, (seqlens_q, seqlens_k)


def _run(backend, q, k, v, seqlens, alpha):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = entmax_attention(q, k, v, alpha=alpha, causal=True, seqlens=seqlens, backend=backend)
    out.backward(torch.ones_like(out))
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_poisoned_padding_changes_nothing(backend, poison):
    seed = int(torch.randint(0, 10_000, ()))
    alpha = torch.tensor([1.5, 1.25, 2.0, 1.75])
    clean = _run(backend, *_problem(0.0, seed), alpha)
    poisoned = _run(backend, *_problem(poison, seed), alpha)
    for name, a, b in zip(("out", "dq", "dk", "dv"), clean, poisoned):
        assert torch.isfinite(b).all(), f"{name} is not finite with {poison} in the padding"
        assert torch.equal(a, b), f"{name} depends on the padding's contents"
    out, dq, dk, dv = poisoned
    assert (out[2] == 0).all() and (dq[2] == 0).all()        # the zero-length query row
    assert (dk[2, :, 5:] == 0).all() and (dv[1, :, 30:] == 0).all()  # keys past the end get no gradient
