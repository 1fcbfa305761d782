"""Every validation error of the public entry points: the right exception type, naming the argument."""
import pytest
import torch

from entflash import checks
from entflash.api import entmax_attention, entmax_attention_varlen


def _padded_inputs(batch=2, num_q_heads=4, num_kv_heads=2, num_queries=5, num_keys=5, head_dim=8):
    return (torch.randn(batch, num_q_heads, num_queries, head_dim),
            torch.randn(batch, num_kv_heads, num_keys, head_dim),
            torch.randn(batch, num_kv_heads, num_keys, head_dim))


def _expect(error_type, argument, call):
    with pytest.raises(error_type) as caught:
        call()
    message = str(caught.value)
    assert f"`{argument}`" in message, message
    assert message.split(":")[0] in ("entmax_attention", "entmax_attention_varlen"), message
    return message


PADDED_ERRORS = {
    # name: (change to (q, k, v, options), error type, argument named)
    "q_rank": (lambda q, k, v, o: (q[0], k, v, o), ValueError, "q"),
    "k_rank": (lambda q, k, v, o: (q, k[..., None], v, o), ValueError, "k"),
    "v_rank": (lambda q, k, v, o: (q, k, v[0], o), ValueError, "v"),
    "q_not_tensor": (lambda q, k, v, o: (q.tolist(), k, v, o), TypeError, "q"),
    "batch_mismatch": (lambda q, k, v, o: (q, k[:1], v[:1], o), ValueError, "k"),
    "head_dim_k": (lambda q, k, v, o: (q, k[..., :6], v, o), ValueError, "k"),
    "head_dim_kv_both": (lambda q, k, v, o: (q, k[..., :6], v[..., :6], o), ValueError, "k"),
    "head_dim_v": (lambda q, k, v, o: (q, k, v[..., :7], o), ValueError, "v"),
    "heads_not_divisible": (lambda q, k, v, o: (q[:, :3], k, v, o), ValueError, "k"),
    "v_heads_differ": (lambda q, k, v, o: (q, k, v[:, :1], o), ValueError, "v"),
    "v_length_differs": (lambda q, k, v, o: (q, k, v[:, :, :4], o), ValueError, "v"),
    "int_dtype": (lambda q, k, v, o: (q.long(), k, v, o), TypeError, "q"),
    "mixed_dtype": (lambda q, k, v, o: (q, k.double(), v, o), TypeError, "k"),
    "mixed_dtype_v": (lambda q, k, v, o: (q, k, v.half(), o), TypeError, "v"),
    "alpha_one": (lambda q, k, v, o: (q, k, v, dict(o, alpha=1.0)), ValueError, "alpha"),
    "alpha_above_two": (lambda q, k, v, o: (q, k, v, dict(o, alpha=2.5)), ValueError, "alpha"),
    "alpha_string": (lambda q, k, v, o: (q, k, v, dict(o, alpha="1.5")), TypeError, "alpha"),
    "alpha_bool": (lambda q, k, v, o: (q, k, v, dict(o, alpha=True)), TypeError, "alpha"),
    "alpha_tensor_value": (lambda q, k, v, o: (q, k, v, dict(o, alpha=torch.tensor([1.5, 1.2, 0.9, 2.0]))),
                           ValueError, "alpha"),
    "alpha_tensor_shape": (lambda q, k, v, o: (q, k, v, dict(o, alpha=torch.full((2,), 1.5))), ValueError, "alpha"),
    "alpha_tensor_int": (lambda q, k, v, o: (q, k, v, dict(o, alpha=torch.tensor([2, 2, 2, 2]))), TypeError,
                         "alpha"),
    "scale_negative": (lambda q, k, v, o: (q, k, v, dict(o, scale=-0.1)), ValueError, "scale"),
    "scale_zero": (lambda q, k, v, o: (q, k, v, dict(o, scale=0.0)), ValueError, "scale"),
    "scale_inf": (lambda q, k, v, o: (q, k, v, dict(o, scale=float("inf"))), ValueError, "scale"),
    "scale_nan": (lambda q, k, v, o: (q, k, v, dict(o, scale=float("nan"))), ValueError, "scale"),
    "scale_tensor": (lambda q, k, v, o: (q, k, v, dict(o, scale=torch.tensor(0.5))), TypeError, "scale"),
    "window_negative": (lambda q, k, v, o: (q, k, v, dict(o, window=(-1, 2))), ValueError, "window"),
    "window_float": (lambda q, k, v, o: (q, k, v, dict(o, window=(1.5, 2))), TypeError, "window"),
    "window_three": (lambda q, k, v, o: (q, k, v, dict(o, window=(1, 2, 3))), TypeError, "window"),
    "window_int": (lambda q, k, v, o: (q, k, v, dict(o, window=3)), TypeError, "window"),
    "causal_not_bool": (lambda q, k, v, o: (q, k, v, dict(o, causal="yes")), TypeError, "causal"),
    "return_aux_not_bool": (lambda q, k, v, o: (q, k, v, dict(o, return_aux=1)), TypeError, "return_aux"),
    "backend_unknown": (lambda q, k, v, o: (q, k, v, dict(o, backend="cuda")), ValueError, "backend"),
    "seqlens_float": (lambda q, k, v, o: (q, k, v, dict(o, seqlens=torch.tensor([1.0, 2.0]))), TypeError,
                      "seqlens"),
    "seqlens_shape": (lambda q, k, v, o: (q, k, v, dict(o, seqlens=torch.tensor([1, 2, 3]))), ValueError,
                      "seqlens"),
    "seqlens_negative": (lambda q, k, v, o: (q, k, v, dict(o, seqlens=torch.tensor([-1, 2]))), ValueError,
                         "seqlens"),
    "seqlens_too_long": (lambda q, k, v, o: (q, k, v, dict(o, seqlens=torch.tensor([6, 2]))), ValueError,
                         "seqlens"),
    "seqlens_list": (lambda q, k, v, o: (q, k, v, dict(o, seqlens=[3, 2])), TypeError, "seqlens[0]"),
    "seqlens_pair_q_too_long": (lambda q, k, v, o: (q, k, v, dict(o, seqlens=(torch.tensor([6, 1]), None))),
                                ValueError, "seqlens[0]"),
    "seqlens_pair_k_shape": (lambda q, k, v, o: (q, k, v, dict(o, seqlens=(None, torch.tensor([[1, 1]])))),
                             ValueError, "seqlens[1]"),
    "seqlens_one_tensor_nq_ne_nk": (lambda q, k, v, o: (q[:, :, :3], k, v, dict(o, seqlens=torch.tensor([1, 2]))),
                                    ValueError, "seqlens"),
    "seqlens_triple": (lambda q, k, v, o: (q, k, v, dict(o, seqlens=(None, None, None))), TypeError, "seqlens"),
}


@pytest.mark.parametrize("case", sorted(PADDED_ERRORS))
def test_entmax_attention_rejects_bad_arguments(case):
    change, error_type, argument = PADDED_ERRORS[case]
    q, k, v, options = change(*_padded_inputs(), {})
    _expect(error_type, argument, lambda: entmax_attention(q, k, v, **options))


def test_error_message_style_shows_what_was_passed():
    q, k, v = _padded_inputs()
    message = _expect(ValueError, "k", lambda: entmax_attention(q, k[0], v))
    assert message.startswith("entmax_attention: `k` must have 4 dims (B, Hkv, Nk, D), got shape (2, 5, 8)")
    message = _expect(ValueError, "alpha", lambda: entmax_attention(q, k, v, alpha=2.25))
    assert "(1, 2]" in message and "2.25" in message


def test_tensors_on_different_devices_are_rejected():
    q, k, v = _padded_inputs()
    _expect(ValueError, "k", lambda: entmax_attention(q, k.to("meta"), v))
    _expect(ValueError, "alpha", lambda: entmax_attention(q, k, v, alpha=torch.full((4,), 1.5, device="meta")))
    _expect(ValueError, "seqlens", lambda: entmax_attention(q, k, v, seqlens=torch.ones(2, dtype=torch.int32,
                                                                                           device="meta")))


def test_valid_edge_values_are_accepted_and_normalized():
    assert checks.check_alpha(2, 4, torch.device("cpu"), "f") == 2.0
    alpha = torch.tensor(1.5, requires_grad=True)
    expanded = checks.check_alpha(alpha, 4, torch.device("cpu"), "f")
    assert expanded.shape == (4,) and expanded.requires_grad
    assert checks.check_window((0, None), "f") == (0, None)
    assert checks.check_scale(None, 16, "f") == 0.25
    lengths_q, lengths_k = checks.check_seqlens(torch.tensor([0, 5]), 2, 5, 5, torch.device("cpu"), "f")
    assert lengths_q.dtype == torch.int32 and lengths_q is lengths_k and lengths_q.tolist() == [0, 5]


def _packed_inputs():
    cu_seqlens_q = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    cu_seqlens_k = torch.tensor([0, 2, 6, 9], dtype=torch.int32)
    q, k, v = torch.randn(7, 4, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 8)
    return [q, k, v, cu_seqlens_q, cu_seqlens_k, 4, 4], {}


VARLEN_ERRORS = {
    "q_rank": (lambda a, o: ([a[0][None]] + a[1:], o), ValueError, "q"),
    "k_heads": (lambda a, o: ([a[0], a[1][:, :1].expand(9, 3, 8), a[2][:, :1].expand(9, 3, 8)] + a[3:], o),
                ValueError, "k"),
    "v_dtype": (lambda a, o: (a[:2] + [a[2].double()] + a[3:], o), TypeError, "v"),
    "cu_float": (lambda a, o: (a[:3] + [a[3].float()] + a[4:], o), TypeError, "cu_seqlens_q"),
    "cu_not_tensor": (lambda a, o: (a[:3] + [[0, 3, 3, 7]] + a[4:], o), TypeError, "cu_seqlens_q"),
    "cu_not_starting_at_zero": (lambda a, o: (a[:3] + [torch.tensor([1, 3, 3, 7])] + a[4:], o), ValueError,
                                "cu_seqlens_q"),
    "cu_decreasing": (lambda a, o: (a[:4] + [torch.tensor([0, 4, 2, 9])] + a[5:], o), ValueError, "cu_seqlens_k"),
    "cu_wrong_total": (lambda a, o: (a[:4] + [torch.tensor([0, 2, 6, 8])] + a[5:], o), ValueError, "cu_seqlens_k"),
    "cu_2d": (lambda a, o: (a[:3] + [a[3][None]] + a[4:], o), ValueError, "cu_seqlens_q"),
    "cu_different_batch": (lambda a, o: (a[:4] + [torch.tensor([0, 9])] + a[5:], o), ValueError, "cu_seqlens_k"),
    "max_seqlen_too_small": (lambda a, o: (a[:5] + [3, 4], o), ValueError, "max_seqlen_q"),
    "max_seqlen_not_int": (lambda a, o: (a[:6] + [4.0], o), TypeError, "max_seqlen_k"),
    "alpha": (lambda a, o: (a, dict(o, alpha=0.5)), ValueError, "alpha"),
    "window": (lambda a, o: (a, dict(o, window=(1, -2))), ValueError, "window"),
    "backend": (lambda a, o: (a, dict(o, backend="flash")), ValueError, "backend"),
}


@pytest.mark.parametrize("case", sorted(VARLEN_ERRORS))
def test_entmax_attention_varlen_rejects_bad_arguments(case):
    change, error_type, argument = VARLEN_ERRORS[case]
    arguments, options = change(*_packed_inputs())
    _expect(error_type, argument, lambda: entmax_attention_varlen(*arguments, **options))
