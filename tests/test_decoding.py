"""entmax_attention_with_kvcache: decoding through a KV cache equals full causal attention; in-place appends;
errors that name the argument."""
import pytest
import torch

from entflash.api import entmax_attention
from entflash.decoding import entmax_attention_with_kvcache

_GARBAGE = 50.0  # finite junk in unused cache slots: it must never reach the output


def _randn(generator, *shape, dtype=torch.float64):
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)


def _sequence(seed, batch, num_q_heads, num_kv_heads, length, head_dim, dtype=torch.float64):
    """Fresh q (B, Hq, N, D), k, v (B, Hkv, N, D) for whole sequences."""
    generator = torch.Generator().manual_seed(seed)
    return (_randn(generator, batch, num_q_heads, length, head_dim, dtype=dtype).mul(1.5),
            _randn(generator, batch, num_kv_heads, length, head_dim, dtype=dtype).mul(1.5),
            _randn(generator, batch, num_kv_heads, length, head_dim, dtype=dtype))


def _empty_cache(seed, batch, num_kv_heads, num_slots, head_dim, dtype=torch.float64):
    """A cache pair full of finite junk (what a reused buffer holds)."""
    generator = torch.Generator().manual_seed(seed)
    return tuple(_randn(generator, batch, num_kv_heads, num_slots, head_dim, dtype=dtype).mul(_GARBAGE)
                 for _ in range(2))


def _full_rows(q, k, v, stop, alpha, window=None):
    """Per sequence b, the rows of full causal attention over its first stop[b] tokens: list of (Hq, stop[b], D)."""
    return [entmax_attention(q[b:b + 1, :, :stop[b]], k[b:b + 1, :, :stop[b]], v[b:b + 1, :, :stop[b]],
                             alpha=alpha, causal=True, window=window, backend="torch")[0]
            for b in range(q.shape[0])]


def _take(x, positions):
    """x (B, H, N, D) at per-sequence positions (B, n) along N: (B, H, n, D)."""
    index = positions.long()[:, None, :, None].expand(x.shape[0], x.shape[1], positions.shape[1], x.shape[3])
    return x.gather(2, index)


def _prefill(k_cache, v_cache, k, v, prompt):
    """Copy the first prompt[b] tokens of each sequence into the caches (ragged)."""
    for b, length in enumerate(prompt):
        k_cache[b, :, :length] = k[b, :, :length]
        v_cache[b, :, :length] = v[b, :, :length]


@pytest.mark.parametrize("alpha, window", [
    (1.5, None),
    (torch.tensor([1.25, 1.5, 1.75, 2.0], dtype=torch.float64), None),
    (1.5, (3, None)),
])
def test_token_by_token_decoding_equals_full_causal_attention(alpha, window):
    batch, num_q_heads, num_kv_heads, head_dim, steps = 3, 4, 2, 16, 5
    prompt = [2, 7, 4]  # ragged: each sequence has its own cache length
    total = max(prompt) + steps
    q, k, v = _sequence(10, batch, num_q_heads, num_kv_heads, total, head_dim)
    k_cache, v_cache = _empty_cache(11, batch, num_kv_heads, total + 3, head_dim)
    _prefill(k_cache, v_cache, k, v, prompt)
    full = _full_rows(q, k, v, [p + steps for p in prompt], alpha, window)
    cache_seqlens = torch.tensor(prompt, dtype=torch.int32)
    for step in range(steps):
        position = cache_seqlens[:, None]  # the new token of each sequence
        out = entmax_attention_with_kvcache(_take(q, position), k_cache, v_cache, cache_seqlens,
                                            k_new=_take(k, position), v_new=_take(v, position), alpha=alpha,
                                            window=window, backend="torch")
        assert out.shape == (batch, num_q_heads, 1, head_dim)
        for b in range(batch):
            torch.testing.assert_close(out[b, :, 0], full[b][:, prompt[b] + step])
        cache_seqlens = cache_seqlens + 1


def test_chunked_prefill_equals_full_causal_attention():
    batch, num_q_heads, num_kv_heads, head_dim, chunk = 2, 6, 3, 8, 4
    start = [3, 0]  # tokens already cached; then chunks of `chunk` tokens per call
    chunks = 3
    total = max(start) + chunk * chunks
    alpha = torch.tensor([1.1, 1.3, 1.5, 1.7, 1.9, 2.0], dtype=torch.float64)
    q, k, v = _sequence(20, batch, num_q_heads, num_kv_heads, total, head_dim)
    k_cache, v_cache = _empty_cache(21, batch, num_kv_heads, total, head_dim)
    _prefill(k_cache, v_cache, k, v, start)
    full = _full_rows(q, k, v, [s + chunk * chunks for s in start], alpha)
    for c in range(chunks):
        positions = torch.tensor(start)[:, None] + c * chunk + torch.arange(chunk)  # (B, chunk)
        cache_seqlens = torch.tensor(start) + c * chunk
        out, aux = entmax_attention_with_kvcache(_take(q, positions), k_cache, v_cache, cache_seqlens,
                                                 k_new=_take(k, positions), v_new=_take(v, positions), alpha=alpha,
                                                 return_aux=True, backend="torch")
        for b in range(batch):
            rows = positions[b]
            torch.testing.assert_close(out[b], full[b][:, rows])
            # query at position t sees at most t + 1 keys
            assert (aux["support"][b] <= (rows + 1)).all() and (aux["support"][b] >= 1).all()


def test_speculative_queries_without_append_and_python_int_lengths():
    """Nq > 1 queries over a cache that already holds them (no k_new); cache_seqlens a python int."""
    batch, num_q_heads, head_dim, length, num_queries = 2, 2, 8, 9, 3
    q, k, v = _sequence(30, batch, num_q_heads, num_q_heads, length, head_dim)
    k_cache, v_cache = _empty_cache(31, batch, num_q_heads, length + 4, head_dim)
    _prefill(k_cache, v_cache, k, v, [length] * batch)
    out = entmax_attention_with_kvcache(q[:, :, -num_queries:], k_cache, v_cache, length, alpha=1.7,
                                        backend="torch")
    full = _full_rows(q, k, v, [length] * batch, 1.7)
    for b in range(batch):
        torch.testing.assert_close(out[b], full[b][:, -num_queries:])


def test_non_causal_window_attends_within_the_valid_prefix():
    batch, num_q_heads, num_kv_heads, head_dim, num_queries = 2, 4, 1, 8, 2
    cache_seqlens = torch.tensor([6, 10])
    q, k, v = _sequence(40, batch, num_q_heads, num_kv_heads, 12, head_dim)
    k_cache, v_cache = _empty_cache(41, batch, num_kv_heads, 16, head_dim)
    _prefill(k_cache, v_cache, k, v, cache_seqlens.tolist())
    window = (3, 1)
    queries = q[:, :, :num_queries]
    out = entmax_attention_with_kvcache(queries, k_cache, v_cache, cache_seqlens, causal=False, window=window,
                                        backend="torch")
    for b, length in enumerate(cache_seqlens.tolist()):
        expected = entmax_attention(queries[b:b + 1], k[b:b + 1, :, :length], v[b:b + 1, :, :length],
                                    causal=False, window=window, backend="torch")
        torch.testing.assert_close(out[b:b + 1], expected)


def test_full_cache_when_cache_seqlens_is_none():
    q, k, v = _sequence(50, 2, 4, 2, 11, 8)
    out = entmax_attention_with_kvcache(q[:, :, -2:], k, v, alpha=1.5, backend="torch")
    torch.testing.assert_close(out, entmax_attention(q, k, v, causal=True, backend="torch")[:, :, -2:])


def test_queries_before_the_start_of_a_short_sequence_give_zeros():
    q, k, v = _sequence(55, 2, 2, 2, 8, 8)
    out, aux = entmax_attention_with_kvcache(q[:, :, :3], k, v, torch.tensor([1, 8]), return_aux=True,
                                             backend="torch")
    # sequence 0 holds one token: its query positions are -2, -1, 0
    assert (out[0, :, :2] == 0).all() and torch.isinf(aux["tau"][0, :, :2]).all()
    torch.testing.assert_close(out[0, :, 2], v[0, :, 0])  # one visible key: weight 1
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("transposed", [False, True])
def test_append_writes_exactly_the_new_slots(transposed):
    batch, num_kv_heads, num_slots, head_dim, num_new = 3, 2, 10, 4, 3
    generator = torch.Generator().manual_seed(60)
    if transposed:  # FlashAttention's (B, Ncache, Hkv, D) buffer seen as (B, Hkv, Ncache, D)
        buffers = [_randn(generator, batch, num_slots, num_kv_heads, head_dim, dtype=torch.float32)
                   for _ in range(2)]
        k_cache, v_cache = (buffer.transpose(1, 2) for buffer in buffers)
    else:
        k_cache, v_cache = (_randn(generator, batch, num_kv_heads, num_slots, head_dim, dtype=torch.float32)
                            for _ in range(2))
    before_k, before_v = k_cache.clone(), v_cache.clone()
    k_new = _randn(generator, batch, num_kv_heads, num_new, head_dim, dtype=torch.float32)
    v_new = _randn(generator, batch, num_kv_heads, num_new, head_dim, dtype=torch.float32)
    q = _randn(generator, batch, 4, 1, head_dim, dtype=torch.float32)
    cache_seqlens = torch.tensor([0, 5, num_slots - num_new], dtype=torch.int64)
    entmax_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new=k_new, v_new=v_new, backend="torch")
    if transposed:
        assert k_cache.data_ptr() == buffers[0].data_ptr()
        torch.testing.assert_close(buffers[0].transpose(1, 2), k_cache, rtol=0, atol=0)
    for cache, before, new in ((k_cache, before_k, k_new), (v_cache, before_v, v_new)):
        written = torch.zeros(cache.shape, dtype=torch.bool)
        for b, start in enumerate(cache_seqlens.tolist()):
            written[b, :, start:start + num_new] = True
            assert torch.equal(cache[b, :, start:start + num_new], new[b])
        assert torch.equal(cache[~written], before[~written])


def test_out_of_cache_garbage_is_ignored_and_aux_has_the_documented_shapes():
    batch, num_q_heads, num_kv_heads, head_dim = 2, 4, 2, 8
    q, k, v = _sequence(70, batch, num_q_heads, num_kv_heads, 6, head_dim, dtype=torch.float32)
    k_cache, v_cache = _empty_cache(71, batch, num_kv_heads, 20, head_dim, dtype=torch.float32)
    _prefill(k_cache, v_cache, k, v, [5, 5])
    k_other, v_other = _empty_cache(72, batch, num_kv_heads, 20, head_dim, dtype=torch.float32)
    _prefill(k_other, v_other, k, v, [5, 5])  # same valid prefix, different junk after it
    results = [entmax_attention_with_kvcache(q[:, :, 5:], kc, vc, 5, k_new=k[:, :, 5:], v_new=v[:, :, 5:],
                                             return_aux=True, backend="torch")
               for kc, vc in ((k_cache, v_cache), (k_other, v_other))]
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    out, aux = results[0]
    assert out.dtype == torch.float32 and aux["tau"].shape == (batch, num_q_heads, 1)
    assert aux["support"].dtype == torch.int32 and (aux["support"] <= 6).all()


def test_gradients_reach_q_and_the_appended_keys_and_values():
    batch, num_q_heads, num_kv_heads, head_dim, num_new = 2, 4, 2, 8, 3
    q, k, v = _sequence(75, batch, num_q_heads, num_kv_heads, 5, head_dim)
    alpha = torch.tensor([1.3, 1.5, 1.8, 2.0], dtype=torch.float64)
    k_cache, v_cache = _empty_cache(76, batch, num_kv_heads, 9, head_dim)
    _prefill(k_cache, v_cache, k, v, [2, 2])
    leaves = [x[:, :, 2:].clone().requires_grad_() for x in (q, k, v)]
    out = entmax_attention_with_kvcache(leaves[0], k_cache, v_cache, 2, k_new=leaves[1], v_new=leaves[2],
                                        alpha=alpha, backend="torch")
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(77), dtype=torch.float64)
    (out * weights).sum().backward()
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    (entmax_attention(*full, alpha=alpha, causal=True, backend="torch")[:, :, 2:] * weights).sum().backward()
    for leaf, whole in zip(leaves, full):
        torch.testing.assert_close(leaf.grad, whole.grad[:, :, 2:])


def _error_case(name):
    generator = torch.Generator().manual_seed(80)
    q = _randn(generator, 2, 4, 1, 8, dtype=torch.float32)
    k_cache = _randn(generator, 2, 2, 6, 8, dtype=torch.float32)
    v_cache = _randn(generator, 2, 2, 6, 8, dtype=torch.float32)
    new = _randn(generator, 2, 2, 2, 8, dtype=torch.float32)
    kwargs = dict(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=torch.tensor([1, 3]), k_new=new,
                  v_new=new.clone())
    changes = {
        "overflow": dict(cache_seqlens=torch.tensor([1, 5])),
        "overflow_int": dict(cache_seqlens=5),
        "overflow_full": dict(cache_seqlens=None),
        "v_new_missing": dict(v_new=None),
        "k_new_missing": dict(k_new=None),
        "seqlens_high": dict(cache_seqlens=torch.tensor([1, 7])),
        "seqlens_negative": dict(cache_seqlens=torch.tensor([-1, 0])),
        "seqlens_int_high": dict(cache_seqlens=9, k_new=None, v_new=None),
        "seqlens_shape": dict(cache_seqlens=torch.tensor([1, 2, 3])),
        "seqlens_float": dict(cache_seqlens=torch.tensor([1.0, 2.0])),
        "seqlens_type": dict(cache_seqlens=1.5),
        "kv_heads": dict(k_cache=k_cache[:, :1].repeat(1, 3, 1, 1), v_cache=v_cache[:, :1].repeat(1, 3, 1, 1)),
        "v_cache_shape": dict(v_cache=v_cache[:, :, :5]),
        "k_cache_dim": dict(k_cache=k_cache[..., :4], v_cache=v_cache[..., :4]),
        "k_cache_dtype": dict(k_cache=k_cache.double()),
        "k_cache_rank": dict(k_cache=k_cache[0]),
        "k_new_heads": dict(k_new=new[:, :1], v_new=new[:, :1]),
        "v_new_shape": dict(v_new=new[:, :, :1]),
        "v_new_dtype": dict(v_new=new.half()),
        "alpha": dict(alpha=2.5),
    }
    kwargs.update(changes[name])
    return kwargs


@pytest.mark.parametrize("case, error, argument", [
    ("overflow", ValueError, "k_new"),
    ("overflow_int", ValueError, "k_new"),
    ("overflow_full", ValueError, "k_new"),
    ("v_new_missing", ValueError, "v_new"),
    ("k_new_missing", ValueError, "k_new"),
    ("seqlens_high", ValueError, "cache_seqlens"),
    ("seqlens_negative", ValueError, "cache_seqlens"),
    ("seqlens_int_high", ValueError, "cache_seqlens"),
    ("seqlens_shape", ValueError, "cache_seqlens"),
    ("seqlens_float", TypeError, "cache_seqlens"),
    ("seqlens_type", TypeError, "cache_seqlens"),
    ("kv_heads", ValueError, "k_cache"),
    ("v_cache_shape", ValueError, "v_cache"),
    ("k_cache_dim", ValueError, "k_cache"),
    ("k_cache_dtype", TypeError, "k_cache"),
    ("k_cache_rank", ValueError, "k_cache"),
    ("k_new_heads", ValueError, "k_new"),
    ("v_new_shape", ValueError, "v_new"),
    ("v_new_dtype", TypeError, "v_new"),
    ("alpha", ValueError, "alpha"),
])
def test_bad_arguments_raise_naming_the_argument_and_leave_the_cache_untouched(case, error, argument):
    kwargs = _error_case(case)
    caches = (kwargs["k_cache"], kwargs["v_cache"])
    before = [cache.clone() for cache in caches]
    with pytest.raises(error, match=rf"^entmax_attention_with_kvcache: `{argument}` must"):
        entmax_attention_with_kvcache(kwargs.pop("q"), kwargs.pop("k_cache"), kwargs.pop("v_cache"),
                                      kwargs.pop("cache_seqlens"), backend="torch", **kwargs)
    assert all(torch.equal(cache, copy) for cache, copy in zip(caches, before))


def test_triton_backend_matches_the_torch_backend():
    batch, num_q_heads, num_kv_heads, head_dim = 2, 2, 1, 16
    q, k, v = _sequence(90, batch, num_q_heads, num_kv_heads, 40, head_dim, dtype=torch.float32)
    results = []
    for backend in ("torch", "triton"):
        k_cache, v_cache = _empty_cache(91, batch, num_kv_heads, 48, head_dim, dtype=torch.float32)
        _prefill(k_cache, v_cache, k, v, [30, 37])
        cache_seqlens = torch.tensor([30, 37], dtype=torch.int32)
        picked = [_take(x, cache_seqlens[:, None]) for x in (q, k, v)]
        results.append(entmax_attention_with_kvcache(picked[0], k_cache, v_cache, cache_seqlens, k_new=picked[1],
                                                     v_new=picked[2], alpha=1.5, return_aux=True, backend=backend))
    (out_torch, aux_torch), (out_triton, aux_triton) = results
    assert aux_triton["tile_map"].shape == (batch, num_q_heads, 1, 1)  # the fused path ran
    torch.testing.assert_close(out_triton, out_torch, rtol=2e-4, atol=2e-5)
    assert torch.equal(aux_triton["support"], aux_torch["support"])


def test_values_are_read_once_per_call(monkeypatch):
    """A decoding step reads a tensor alpha's values and a tensor cache_seqlens once each (each read is a host sync
    on a GPU): the cache lengths' range and the room for the new tokens come from one read, and the attention call
    after the append reads neither again; an int cache_seqlens is checked on the host."""
    import entflash.checks

    reads = []
    check_alpha, check_lengths = entflash.checks.check_alpha, entflash.checks.check_lengths
    length_range = entflash.checks.length_range

    def alpha_spy(alpha, num_heads, device, caller, read_values=True):
        reads.append(("alpha", read_values and isinstance(alpha, torch.Tensor)))
        return check_alpha(alpha, num_heads, device, caller, read_values)

    def lengths_spy(lengths, argument, batch, max_length, device, caller, read_values=True):
        reads.append((argument, read_values))
        return check_lengths(lengths, argument, batch, max_length, device, caller, read_values)

    def range_spy(lengths):
        reads.append(("range", True))
        return length_range(lengths)

    monkeypatch.setattr(entflash.checks, "check_alpha", alpha_spy)
    monkeypatch.setattr(entflash.checks, "check_lengths", lengths_spy)
    monkeypatch.setattr(entflash.checks, "length_range", range_spy)
    torch.manual_seed(5)
    k_cache, v_cache = torch.randn(2, 2, 16, 8), torch.randn(2, 2, 16, 8)
    q, k_new, v_new = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8)
    alpha = torch.tensor([1.3, 1.5, 1.7, 2.0])
    entmax_attention_with_kvcache(q, k_cache, v_cache, torch.tensor([3, 9]), k_new=k_new, v_new=v_new,
                                  alpha=alpha, backend="torch")
    assert sorted(name for name, read in reads if read) == ["alpha", "range"]
    reads.clear()
    entmax_attention_with_kvcache(q, k_cache, v_cache, 10, k_new=k_new, v_new=v_new, alpha=1.5, backend="torch")
    assert [name for name, read in reads if read] == []
    # both checks still fire from that one read
    with pytest.raises(ValueError, match="cache_seqlens"):
        entmax_attention_with_kvcache(q, k_cache, v_cache, torch.tensor([3, 17]), backend="torch")
    with pytest.raises(ValueError, match="k_new"):
        entmax_attention_with_kvcache(q, k_cache, v_cache, torch.tensor([3, 16]), k_new=k_new, v_new=v_new,
                                      backend="torch")
