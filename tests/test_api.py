"""The public entry points: backend dispatch, varlen packing, strided views, dtype round trips."""
import sys
import types

import pytest
import torch

from entflash import api
from entflash.api import entmax_attention, entmax_attention_varlen
from entflash.reference.attention import torch_attention


def _inputs(seed, batch, num_q_heads, num_kv_heads, num_queries, num_keys, head_dim, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64).mul(1.5).to(dtype).requires_grad_()
            for shape in ((batch, num_q_heads, num_queries, head_dim), (batch, num_kv_heads, num_keys, head_dim),
                          (batch, num_kv_heads, num_keys, head_dim))]


class _Recorder:
    """A backend with the contract's signature that records its arguments and delegates to torch_attention."""

    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, alpha, causal, scale, window, seqlens_q, seqlens_k, return_aux):
        self.calls.append(dict(q=q, k=k, v=v, alpha=alpha, causal=causal, scale=scale, window=window,
                               seqlens_q=seqlens_q, seqlens_k=seqlens_k, return_aux=return_aux))
        return torch_attention(q, k, v, alpha, causal, scale, window, seqlens_q, seqlens_k, return_aux)


@pytest.fixture
def fake_fused(monkeypatch):
    """Install a stand-in entflash.autograd exposing triton_attention only; returns its recorder."""
    recorder = _Recorder()
    module = types.ModuleType("entflash.autograd")
    module.triton_attention = recorder
    monkeypatch.setitem(sys.modules, "entflash.autograd", module)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return module


def test_torch_backend_receives_normalized_arguments(monkeypatch):
    recorder = _Recorder()
    monkeypatch.setattr(api, "torch_attention", recorder)
    q, k, v = _inputs(0, 2, 4, 2, 5, 5, 16)
    entmax_attention(q, k, v, alpha=2, window=[3, None], seqlens=torch.tensor([5, 2]), backend="torch")
    call = recorder.calls[0]
    assert call["alpha"] == 2.0 and isinstance(call["alpha"], float)
    assert call["scale"] == pytest.approx(0.25) and call["window"] == (3, None) and call["causal"] is False
    assert call["seqlens_q"].dtype == torch.int32 and call["seqlens_k"].tolist() == [5, 2]


def test_auto_uses_the_torch_backend_on_cpu(monkeypatch, fake_fused):
    recorder = _Recorder()
    monkeypatch.setattr(api, "torch_attention", recorder)
    q, k, v = _inputs(1, 1, 2, 2, 3, 3, 4)
    entmax_attention(q, k, v)
    assert len(recorder.calls) == 1 and fake_fused.triton_attention.calls == []


def test_auto_picks_the_fused_backend_on_cuda_only_when_it_imports(monkeypatch, fake_fused):
    cuda = torch.device("cuda")
    assert api.resolve_backend("auto", cuda, "f") == "triton"
    monkeypatch.setitem(sys.modules, "entflash.autograd", None)  # import now fails
    assert api.resolve_backend("auto", cuda, "f") == "torch"
    assert api.resolve_backend("auto", torch.device("cpu"), "f") == "torch"


def test_triton_backend_dispatches_to_the_fused_module(fake_fused):
    q, k, v = _inputs(2, 2, 4, 1, 6, 7, 8)
    seqlens_k = torch.tensor([7, 3])
    out, aux = entmax_attention(q, k, v, causal=True, seqlens=(None, seqlens_k), return_aux=True, backend="triton")
    call = fake_fused.triton_attention.calls[0]
    assert call["q"] is q and call["causal"] is True and call["return_aux"] is True and call["seqlens_q"] is None
    expected = entmax_attention(q, k, v, causal=True, seqlens=(None, seqlens_k), backend="torch")
    torch.testing.assert_close(out, expected)


def test_triton_backend_missing_is_a_clear_runtime_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "entflash.autograd", None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = _inputs(3, 1, 2, 2, 3, 3, 4)
    with pytest.raises(RuntimeError, match="fused backend is unavailable"):
        entmax_attention(q, k, v, backend="triton")
    monkeypatch.setitem(sys.modules, "entflash.autograd", types.ModuleType("entflash.autograd"))
    with pytest.raises(RuntimeError, match="triton_attention"):
        entmax_attention(q, k, v, backend="triton")


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch, fake_fused):
    monkeypatch.delenv("TRITON_INTERPRET")
    q, k, v = _inputs(4, 1, 2, 2, 3, 3, 4)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        entmax_attention(q, k, v, backend="triton")
    assert fake_fused.triton_attention.calls == []


def test_transposed_views_reach_the_backend_without_copies(monkeypatch):
    recorder = _Recorder()
    monkeypatch.setattr(api, "torch_attention", recorder)
    generator = torch.Generator().manual_seed(5)
    q_bnhd = torch.randn(2, 6, 4, 8, generator=generator, requires_grad=True)
    kv_bnhd = [torch.randn(2, 9, 2, 8, generator=generator, requires_grad=True) for _ in range(2)]
    q, k, v = q_bnhd.transpose(1, 2), kv_bnhd[0].transpose(1, 2), kv_bnhd[1].transpose(1, 2)
    assert not q.is_contiguous()
    out = entmax_attention(q, k, v, causal=True)
    call = recorder.calls[0]
    for name, view in (("q", q), ("k", k), ("v", v)):
        assert call[name].data_ptr() == view.data_ptr() and call[name].stride() == view.stride()
    expected = entmax_attention(q.detach().contiguous(), k.detach().contiguous(), v.detach().contiguous(),
                                causal=True)
    torch.testing.assert_close(out, expected)
    grad_out = torch.randn_like(out)
    (out * grad_out).sum().backward()
    q_copy = q.detach().contiguous().requires_grad_()
    (entmax_attention(q_copy, k.detach(), v.detach(), causal=True) * grad_out).sum().backward()
    torch.testing.assert_close(q_bnhd.grad, q_copy.grad.transpose(1, 2))


@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 2e-2), (torch.float16, 4e-3), (torch.float32, 1e-5)])
def test_dtype_round_trip(dtype, tolerance):
    q, k, v = _inputs(6, 2, 4, 2, 7, 7, 16, dtype=dtype)
    alpha = torch.tensor([1.3, 1.5, 1.7, 2.0], requires_grad=True)
    out, aux = entmax_attention(q, k, v, alpha=alpha, causal=True, return_aux=True)
    assert out.dtype == dtype and aux["tau"].dtype == torch.float32 and aux["support"].dtype == torch.int32
    grad_out = torch.randn(out.shape, dtype=torch.float64)
    (out.double() * grad_out).sum().backward()
    assert q.grad.dtype == dtype and k.grad.dtype == dtype and v.grad.dtype == dtype
    assert alpha.grad.dtype == torch.float32

    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    alpha_exact = alpha.detach().double().requires_grad_()
    expected = entmax_attention(*exact, alpha=alpha_exact, causal=True)
    (expected * grad_out).sum().backward()
    torch.testing.assert_close(out.double(), expected, atol=tolerance, rtol=tolerance)
    for mine, reference in zip((q.grad, k.grad, v.grad), (t.grad for t in exact)):
        torch.testing.assert_close(mine.double(), reference, atol=10 * tolerance, rtol=10 * tolerance)


def _pack(padded, lengths):
    """(B, H, N, D) padded -> (sum(lengths), H, D) packed."""
    return torch.cat([padded[b, :, :length].transpose(0, 1) for b, length in enumerate(lengths)])


def _cu(lengths):
    return torch.tensor([0] + lengths).cumsum(0).to(torch.int32)


@pytest.mark.parametrize("causal,window", [(True, None), (False, (1, 2))])
def test_varlen_equals_per_sequence_results(causal, window):
    lengths_q, lengths_k = [3, 0, 5, 1], [4, 2, 5, 6]
    q_pad, k_pad, v_pad = _inputs(7, 4, 4, 2, max(lengths_q), max(lengths_k), 8, dtype=torch.float64)
    alpha = torch.tensor([1.4, 1.5, 1.9, 1.2], dtype=torch.float64, requires_grad=True)
    q, k, v = (_pack(x, lens).detach().requires_grad_()
               for x, lens in ((q_pad, lengths_q), (k_pad, lengths_k), (v_pad, lengths_k)))
    out, aux = entmax_attention_varlen(q, k, v, _cu(lengths_q), _cu(lengths_k), 6, 7, alpha=alpha, causal=causal,
                                       window=window, return_aux=True)
    assert out.shape == q.shape and aux["tau"].shape == q.shape[:2] and aux["support"].shape == q.shape[:2]
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad((out * grad_out).sum(), (q, k, v, alpha))

    pieces, taus, alpha_grad = [], [], torch.zeros_like(alpha)
    expected_grads = [torch.zeros_like(t) for t in (q, k, v)]
    start_q = start_k = 0
    for length_q, length_k in zip(lengths_q, lengths_k):
        rows_q, rows_k = slice(start_q, start_q + length_q), slice(start_k, start_k + length_k)
        one = [t[rows].detach().transpose(0, 1)[None].requires_grad_() for t, rows in ((q, rows_q), (k, rows_k),
                                                                                          (v, rows_k))]
        one_alpha = alpha.detach().requires_grad_()
        piece, piece_aux = entmax_attention(*one, alpha=one_alpha, causal=causal, window=window, return_aux=True)
        piece = piece[0].transpose(0, 1)
        pieces.append(piece)
        taus.append(piece_aux["tau"][0].transpose(0, 1))
        if length_q:
            piece_grads = torch.autograd.grad((piece * grad_out[rows_q]).sum(), one + [one_alpha])
            for total, part, rows in zip(expected_grads, piece_grads[:3], (rows_q, rows_k, rows_k)):
                total[rows] = part[0].transpose(0, 1)
            alpha_grad += piece_grads[3]
        start_q, start_k = start_q + length_q, start_k + length_k
    torch.testing.assert_close(out, torch.cat(pieces), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(aux["tau"], torch.cat(taus))
    for mine, reference in zip(grads, expected_grads + [alpha_grad]):
        torch.testing.assert_close(mine, reference, atol=1e-12, rtol=1e-10)


def test_varlen_triton_pads_for_the_fused_backend_or_uses_its_varlen_entry(fake_fused):
    lengths_q, lengths_k = [2, 4], [5, 3]
    q_pad, k_pad, v_pad = _inputs(8, 2, 2, 1, 4, 5, 8)
    q, k, v = _pack(q_pad, lengths_q), _pack(k_pad, lengths_k), _pack(v_pad, lengths_k)
    arguments = (q, k, v, _cu(lengths_q), _cu(lengths_k), 4, 5)
    out = entmax_attention_varlen(*arguments, causal=True, backend="triton")
    call = fake_fused.triton_attention.calls[0]
    assert call["q"].shape == (2, 2, 4, 8) and call["seqlens_q"].tolist() == lengths_q
    assert call["seqlens_k"].tolist() == lengths_k
    torch.testing.assert_close(out, entmax_attention_varlen(*arguments, causal=True, backend="torch"))

    varlen_calls = []
    fake_fused.triton_attention_varlen = lambda *args: varlen_calls.append(args) or args[0]
    assert entmax_attention_varlen(*arguments, backend="triton") is q
    assert len(varlen_calls) == 1 and len(fake_fused.triton_attention.calls) == 1


def test_fused_backend_agrees_with_the_torch_backend_through_the_api():
    """Integration with entflash.autograd (interpreter on CPU): padded call with seqlens, and the varlen call."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (t.detach().to(device) for t in _inputs(9, 2, 4, 2, 20, 24, 16))
    seqlens = (torch.tensor([20, 7], device=device), torch.tensor([24, 0], device=device))
    results = [entmax_attention(q, k, v, causal=True, seqlens=seqlens, return_aux=True, backend=backend)
               for backend in ("triton", "torch")]
    (fused, fused_aux), (exact, exact_aux) = results
    torch.testing.assert_close(fused, exact, atol=2e-5, rtol=2e-5)
    assert torch.equal(fused_aux["support"], exact_aux["support"])

    lengths_q, lengths_k = [5, 0, 11], [9, 3, 11]
    generator = torch.Generator().manual_seed(10)
    packed = [torch.randn(total, heads, 16, generator=generator).to(device)
              for total, heads in ((sum(lengths_q), 4), (sum(lengths_k), 2), (sum(lengths_k), 2))]
    arguments = (*packed, _cu(lengths_q).to(device), _cu(lengths_k).to(device), 11, 11)
    torch.testing.assert_close(entmax_attention_varlen(*arguments, window=(4, 2), backend="triton"),
                               entmax_attention_varlen(*arguments, window=(4, 2), backend="torch"),
                               atol=2e-5, rtol=2e-5)


def test_deterministic_must_be_a_bool():
    q, k, v = _inputs(11, 1, 2, 2, 4, 4, 8)
    with pytest.raises(TypeError, match="deterministic"):
        entmax_attention(q, k, v, deterministic=1, backend="torch")
    with pytest.raises(TypeError, match="deterministic"):
        entmax_attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), _cu([4]), _cu([4]),
                                4, 4, deterministic="yes", backend="torch")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_deterministic_gradients_are_bit_identical_across_runs(backend):
    """deterministic=True (FlashAttention's keyword): two backward passes give the same bits for q, k, v and a
    learnable per-head alpha, with GQA (dK/dV summed over the group), and deterministic=False matches them (the
    same kernels run). The fused path runs under the interpreter on CPU, compiled on a GPU."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (t.detach().to(device) for t in _inputs(12, 1, 4, 2, 40, 40, 16))
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(13)).to(device)

    def gradients(deterministic):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        alpha = torch.tensor([1.25, 1.5, 1.75, 2.0], device=device, requires_grad=True)
        out = entmax_attention(*leaves, alpha=alpha, causal=True, backend=backend, deterministic=deterministic)
        return torch.autograd.grad(out, leaves + [alpha], grad_out)

    first, second, default = gradients(True), gradients(True), gradients(False)
    for a, b, c in zip(first, second, default):
        assert torch.isfinite(a).all() and a.abs().sum() > 0
        assert torch.equal(a, b) and torch.equal(a, c)


# ------------------------------------------------------------------------------------------------------------
# check_alpha: reading a tensor alpha's values (a host sync on a GPU) can be skipped
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("entry", ["padded", "varlen"])
def test_check_alpha_false_leaves_tensor_alpha_values_unread(entry):
    q, k, v = (t.detach() for t in _inputs(31, 1, 2, 2, 9, 9, 16))
    out_of_range = torch.tensor([1.5, 2.5])

    def call(**options):
        if entry == "padded":
            return entmax_attention(q, k, v, alpha=out_of_range, backend="torch", **options)
        cu = torch.tensor([0, 9])
        return entmax_attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu,
                                       9, 9, alpha=out_of_range, backend="torch", **options)

    with pytest.raises(ValueError, match=r"alpha.*\(1, 2\]"):
        call()
    assert torch.isfinite(call(check_alpha=False)).all()  # no read, so no error: the values were not looked at


def test_check_alpha_false_still_checks_type_shape_and_floats():
    q, k, v = (t.detach() for t in _inputs(32, 1, 2, 2, 5, 5, 8))
    with pytest.raises(ValueError, match=r"alpha.*shape \(2,\)"):
        entmax_attention(q, k, v, alpha=torch.full((3,), 1.5), backend="torch", check_alpha=False)
    with pytest.raises(TypeError, match="alpha"):
        entmax_attention(q, k, v, alpha=torch.ones(2, dtype=torch.int64), backend="torch", check_alpha=False)
    with pytest.raises(ValueError, match="alpha"):
        entmax_attention(q, k, v, alpha=2.5, backend="torch", check_alpha=False)
    with pytest.raises(TypeError, match="check_alpha"):
        entmax_attention(q, k, v, alpha=1.5, backend="torch", check_alpha="no")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_unchecked_nan_alpha_gives_nan_rows_not_zeros(backend):
    """A NaN alpha that check_alpha=False lets through must not come out as plausible zeros."""
    q, k, v = (t.detach() for t in _inputs(33, 1, 2, 1, 70, 70, 16))
    alpha = torch.tensor([1.5, float("nan")])
    with torch.no_grad():
        out = entmax_attention(q, k, v, alpha=alpha, causal=True, backend=backend, check_alpha=False)
        expected = entmax_attention(q, k, v, alpha=1.5, causal=True, backend="torch")
    assert torch.isnan(out[:, 1]).all()
    torch.testing.assert_close(out[:, 0], expected[:, 0], atol=1e-4, rtol=1e-4)


def test_check_alpha_must_be_a_bool_on_every_entry_point():
    import entflash.nn

    q, k, v = (t.detach() for t in _inputs(34, 1, 2, 2, 5, 5, 8))
    cu = torch.tensor([0, 5])
    packed = [t[0].transpose(0, 1) for t in (q, k, v)]
    calls = [lambda: entmax_attention_varlen(*packed, cu, cu, 5, 5, backend="torch", check_alpha=1),
             lambda: entflash.nn.unpadded_entmax_attention(q, k, v, torch.ones(1, 5, dtype=torch.bool),
                                                          backend="torch", check_alpha=None)]
    for call in calls:
        with pytest.raises(TypeError, match="check_alpha"):
            call()
