"""The torch backend (entflash.reference.attention) against a dense float64 oracle built here from the
`entmax` package's entmax_bisect, with the masking rules of docs/ARCHITECTURE.md written out as loops."""
import math

import pytest
import torch

entmax_bisect = pytest.importorskip("entmax", reason="the dense oracle needs the `entmax` package (dev extra)"
                                    ).entmax_bisect

from entflash.reference.attention import query_chunk_rows, torch_attention

MASKED_SCORE = -1.0e4  # far below every row's max - 1/(alpha-1) for the scores used here: exactly zero weight


def oracle_visible(batch, num_queries, num_keys, causal, window, seqlens_q, seqlens_k):
    """(B, Nq, Nk) bool, spelled out entry by entry."""
    visible = torch.zeros(batch, num_queries, num_keys, dtype=torch.bool)
    for b in range(batch):
        length_q = num_queries if seqlens_q is None else int(seqlens_q[b])
        length_k = num_keys if seqlens_k is None else int(seqlens_k[b])
        for i in range(length_q):
            own = i + length_k - length_q
            for j in range(length_k):
                ok = not (causal and j > own)
                if window is not None:
                    left, right = window
                    ok = ok and (left is None or j >= own - left) and (right is None or j <= own + right)
                visible[b, i, j] = ok
    return visible


def dense_oracle(q, k, v, alpha, causal=False, scale=None, window=None, seqlens_q=None, seqlens_k=None):
    """Materialized float64 entmax attention. Returns out (B, Hq, Nq, D) and p (B, Hq, Nq, Nk)."""
    batch, num_q_heads, num_queries, head_dim = q.shape
    group = num_q_heads // k.shape[1]
    keys, values = k.repeat_interleave(group, 1).double(), v.repeat_interleave(group, 1).double()
    scale = 1 / math.sqrt(head_dim) if scale is None else scale
    scores = scale * q.double() @ keys.transpose(-1, -2)
    visible = oracle_visible(batch, num_queries, k.shape[2], causal, window, seqlens_q, seqlens_k)[:, None]
    scores = torch.where(visible, scores, torch.full_like(scores, MASKED_SCORE))
    if isinstance(alpha, torch.Tensor):
        alpha_rows = alpha.double().view(1, -1, 1, 1).expand(batch, num_q_heads, num_queries, 1)
    else:
        alpha_rows = alpha
    probs = entmax_bisect(scores, alpha_rows, dim=-1, n_iter=200)
    probs = torch.where(visible.any(-1, keepdim=True), probs, torch.zeros_like(probs))
    return probs @ values, probs


def random_inputs(seed, batch, num_q_heads, num_kv_heads, num_queries, num_keys, head_dim, dtype=torch.float64,
                  spread=2.0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(batch, num_q_heads, num_queries, head_dim), (batch, num_kv_heads, num_keys, head_dim),
              (batch, num_kv_heads, num_keys, head_dim)]
    return [(spread * torch.randn(s, generator=generator, dtype=torch.float64)).to(dtype).requires_grad_()
            for s in shapes]


CASES = {
    "nq_ne_nk": dict(shape=(2, 2, 2, 3, 7, 8)),
    "n_equals_1": dict(shape=(1, 2, 2, 1, 1, 4)),
    "one_query_causal": dict(shape=(2, 2, 1, 1, 5, 4), causal=True),
    "odd_head_dim": dict(shape=(1, 3, 3, 6, 6, 5), causal=True),
    "gqa_per_head_alpha": dict(shape=(2, 6, 2, 5, 9, 4), alpha=[1.1, 1.25, 1.5, 1.75, 1.9, 2.0]),
    "sparsemax": dict(shape=(1, 2, 1, 7, 7, 3), alpha=2.0),
    "low_alpha": dict(shape=(1, 2, 2, 4, 6, 3), alpha=1.15),
    "window_both_sides": dict(shape=(1, 2, 1, 9, 9, 4), window=(2, 1)),
    "window_left_only_causal_bottom_right": dict(shape=(2, 2, 2, 4, 9, 4), causal=True, window=(3, None)),
    "window_right_only": dict(shape=(1, 2, 2, 5, 5, 4), window=(None, 0)),
    "seqlens_with_zero_length": dict(shape=(3, 2, 1, 6, 6, 4), causal=True, seqlens=([0, 4, 6], [0, 4, 6])),
    "seqlens_pair_differ": dict(shape=(3, 4, 2, 5, 8, 4), causal=True, window=(2, 2),
                                seqlens=([5, 2, 0], [8, 1, 3])),
    "keys_only_seqlens": dict(shape=(2, 2, 2, 3, 7, 4), seqlens=(None, [2, 0])),
    "fully_masked_rows_causal_nq_gt_nk": dict(shape=(2, 2, 1, 6, 3, 4), causal=True),
    "custom_scale": dict(shape=(1, 2, 2, 4, 5, 6), scale=0.9),
}


def _case_arguments(case, seed):
    batch, num_q_heads, num_kv_heads, num_queries, num_keys, head_dim = case["shape"]
    q, k, v = random_inputs(seed, batch, num_q_heads, num_kv_heads, num_queries, num_keys, head_dim)
    alpha = case.get("alpha", 1.5)
    if isinstance(alpha, list):
        alpha = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
    seqlens_q = seqlens_k = None
    if "seqlens" in case:
        seqlens_q, seqlens_k = (None if s is None else torch.tensor(s, dtype=torch.int32) for s in case["seqlens"])
    scale = case.get("scale", 1 / math.sqrt(head_dim))
    return q, k, v, alpha, case.get("causal", False), scale, case.get("window"), seqlens_q, seqlens_k


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_dense_oracle_forward_aux_and_gradients(name):
    seed = sorted(CASES).index(name)
    q, k, v, alpha, causal, scale, window, seqlens_q, seqlens_k = _case_arguments(CASES[name], seed)
    out, aux = torch_attention(q, k, v, alpha, causal, scale, window, seqlens_q, seqlens_k, True)
    expected, probs = dense_oracle(q, k, v, alpha, causal, scale, window, seqlens_q, seqlens_k)
    assert out.dtype == torch.float64 and out.shape == q.shape
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-9)

    # aux: support is the number of non-zeros; tau reproduces the oracle's probabilities; empty rows are +inf / 0
    assert aux["support"].dtype == torch.int32 and aux["tau"].dtype == torch.float32
    assert torch.equal(aux["support"], (probs > 0).sum(-1, dtype=torch.int32))
    empty_rows = aux["support"] == 0
    assert torch.isinf(aux["tau"][empty_rows]).all() and torch.isfinite(aux["tau"][~empty_rows]).all()
    alpha_rows = alpha.detach().view(1, -1, 1, 1) if isinstance(alpha, torch.Tensor) else alpha
    keys = k.detach().repeat_interleave(q.shape[1] // k.shape[1], 1)
    scores = scale * q.detach() @ keys.transpose(-1, -2)
    from_tau = torch.clamp((alpha_rows - 1) * scores - aux["tau"].double()[..., None], min=0) ** (1 / (alpha_rows - 1))
    from_tau = torch.where(empty_rows[..., None], torch.zeros_like(from_tau), from_tau)
    torch.testing.assert_close(from_tau.masked_fill(probs == 0, 0), probs, atol=1e-5, rtol=1e-4)

    grad_out = torch.randn_like(out)
    inputs = [q, k, v] + ([alpha] if isinstance(alpha, torch.Tensor) else [])
    ours = torch.autograd.grad((out * grad_out).sum(), inputs)
    theirs = torch.autograd.grad((expected * grad_out).sum(), inputs)
    for name_of_input, mine, reference in zip("qkva", ours, theirs):
        assert torch.isfinite(mine).all(), name_of_input
        torch.testing.assert_close(mine, reference, atol=1e-8, rtol=1e-7, msg=f"gradient of {name_of_input}")


def test_rows_without_keys_are_zero_with_zero_gradients_not_nan():
    q, k, v = random_inputs(7, 2, 2, 2, 5, 5, 4, dtype=torch.float32)
    seqlens = torch.tensor([0, 3], dtype=torch.int32)
    out, aux = torch_attention(q, k, v, 1.5, True, 0.5, None, seqlens, seqlens, True)
    padded_rows = torch.zeros(2, 5, dtype=torch.bool)
    padded_rows[0] = True
    padded_rows[1, 3:] = True
    assert torch.isfinite(out).all()
    assert out[:, :, :, :][padded_rows[:, None].expand(2, 2, 5)].abs().max() == 0
    assert out[1, :, :3].abs().min() > 0
    assert (aux["support"][padded_rows[:, None].expand(2, 2, 5)] == 0).all()
    (out * torch.randn_like(out)).sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()
    assert q.grad[0].abs().max() == 0 and k.grad[0].abs().max() == 0 and q.grad[1, :, 3:].abs().max() == 0
    assert k.grad[1, :, 3:].abs().max() == 0 and v.grad[1, :, 3:].abs().max() == 0
    assert q.grad[1, :, :3].abs().max() > 0


def test_gradcheck_float64_tiny_gqa_window_and_alpha():
    q, k, v = random_inputs(11, 1, 4, 2, 3, 4, 3)
    alpha = torch.tensor([1.3, 1.5, 1.7, 2.0], dtype=torch.float64, requires_grad=True)

    def attention(q, k, v, alpha):
        return torch_attention(q, k, v, alpha, True, 0.7, (2, None), None, None, False)

    assert torch.autograd.gradcheck(attention, (q, k, v, alpha), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk_rows", [1, 3])
def test_chunking_matches_a_single_chunk(chunk_rows):
    q, k, v = random_inputs(13, 2, 4, 2, 7, 9, 5)
    alpha = torch.tensor([1.2, 1.5, 1.8, 1.6], dtype=torch.float64, requires_grad=True)
    seqlens_q, seqlens_k = torch.tensor([7, 4], dtype=torch.int32), torch.tensor([9, 6], dtype=torch.int32)
    grad_out = torch.randn(q.shape, dtype=torch.float64)
    results = []
    for rows in (7, chunk_rows):
        out, aux = torch_attention(q, k, v, alpha, True, 0.4, (4, 1), seqlens_q, seqlens_k, True, chunk_rows=rows)
        grads = torch.autograd.grad((out * grad_out).sum(), (q, k, v, alpha))
        results.append((out, aux["tau"], aux["support"]) + grads)
    for single, chunked in zip(*results):
        torch.testing.assert_close(chunked, single, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("causal,window,num_queries,num_keys", [
    (True, None, 9, 6),          # early chunks see no key at all
    (True, (2, None), 5, 11),
    (False, (1, 0), 8, 8),
    (False, (None, 1), 7, 9),
    (False, (3, 2), 10, 4),
])
def test_key_bounded_chunks_match_the_oracle(causal, window, num_queries, num_keys):
    q, k, v = random_inputs(num_queries * 31 + num_keys, 1, 2, 1, num_queries, num_keys, 4)
    grad_out = torch.randn(q.shape, dtype=torch.float64)
    expected, _ = dense_oracle(q, k, v, 1.5, causal, 0.5, window)
    expected_grads = torch.autograd.grad((expected * grad_out).sum(), (q, k, v))
    for rows in (1, 2, 3):
        out = torch_attention(q, k, v, 1.5, causal, 0.5, window, None, None, False, chunk_rows=rows)
        torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-9)
        grads = torch.autograd.grad((out * grad_out).sum(), (q, k, v))
        for mine, reference in zip(grads, expected_grads):
            torch.testing.assert_close(mine, reference, atol=1e-8, rtol=1e-7)


def test_no_keys_at_all_gives_zero_rows():
    q = torch.randn(2, 2, 3, 4, requires_grad=True)
    empty = torch.randn(2, 1, 0, 4)
    out, aux = torch_attention(q, empty, empty, 1.5, False, 0.5, None, None, None, True)
    assert out.shape == q.shape and out.abs().max() == 0
    assert torch.isinf(aux["tau"]).all() and (aux["support"] == 0).all()
    (out * torch.randn_like(out)).sum().backward()
    assert q.grad.abs().max() == 0


def test_chunk_rows_follow_the_memory_budget():
    rows = [query_chunk_rows(2, 8, 4096, torch.float32, budget_bytes=budget) for budget in (1, 2**20, 2**26, 2**30)]
    assert rows[0] == 1
    assert rows == sorted(rows) and rows[-1] > rows[1]
    bytes_per_row = 2 * 8 * 4096 * 4
    assert rows[2] * bytes_per_row <= 2**26
    assert query_chunk_rows(2, 8, 4096, torch.float64, budget_bytes=2**26) < rows[2]


def test_half_precision_inputs_compute_in_float32_and_return_their_dtype():
    q, k, v = random_inputs(17, 1, 2, 1, 6, 6, 8, dtype=torch.bfloat16)
    out = torch_attention(q, k, v, 1.5, True, 0.35, None, None, None, False)
    expected, _ = dense_oracle(q, k, v, 1.5, True, 0.35)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=2e-2)
    out.float().square().sum().backward()
    assert q.grad.dtype == torch.bfloat16 and torch.isfinite(q.grad.float()).all()


def test_alpha_tensor_without_grad_and_float_alpha_agree():
    q, k, v = random_inputs(19, 1, 3, 3, 4, 4, 4)
    alpha_tensor = torch.full((3,), 1.5, dtype=torch.float64)
    by_tensor = torch_attention(q, k, v, alpha_tensor, False, 0.5, None, None, None, False)
    by_float = torch_attention(q, k, v, 1.5, False, 0.5, None, None, None, False)
    torch.testing.assert_close(by_tensor, by_float, atol=1e-12, rtol=1e-12)
    by_tensor.sum().backward()
    assert alpha_tensor.grad is None and q.grad is not None
