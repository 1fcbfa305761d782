"""entflash.nn: HeadAlpha, ASEntmaxScaling, EntmaxAttention, MultiheadEntmaxAttention, dense_entmax_attention."""
import math

import pytest
import torch

import entflash.nn

from entflash.api import entmax_attention
from entflash.nn import (ASEntmaxScaling, EntmaxAttention, HeadAlpha, MultiheadEntmaxAttention,
                         dense_entmax_attention, query_positions)


def _pair(embed_dim=32, num_heads=4, alpha=1.5, seed=0, **options):
    """A torch MultiheadAttention and a MultiheadEntmaxAttention holding the same weights."""
    torch.manual_seed(seed)
    softmax = torch.nn.MultiheadAttention(embed_dim, num_heads, **options)
    entmax = MultiheadEntmaxAttention(embed_dim, num_heads, alpha=alpha, **options)
    missing, unexpected = entmax.load_state_dict(softmax.state_dict(), strict=False)
    assert not unexpected and all(name.startswith("attention.") for name in missing)
    return softmax.eval(), entmax.eval()


# ------------------------------------------------------------------------------------------------------------
# HeadAlpha / ASEntmaxScaling / EntmaxAttention
# ------------------------------------------------------------------------------------------------------------

def test_head_alpha_parametrization_and_gradient():
    head_alpha = HeadAlpha(3, [1.2, 1.5, 1.9])
    alpha = head_alpha()
    torch.testing.assert_close(alpha, torch.tensor([1.2, 1.5, 1.9]))
    alpha.sum().backward()
    sigmoid = alpha.detach() - 1
    torch.testing.assert_close(head_alpha.alpha_logit.grad, sigmoid * (1 - sigmoid))
    assert HeadAlpha(2, 2.0, learnable=False)() == 2.0
    assert not list(HeadAlpha(2, 1.5, learnable=False).parameters())


@pytest.mark.parametrize("bad", [1.0, 2.0, 0.5, [1.5]])
def test_head_alpha_rejects_bad_init(bad):
    with pytest.raises(ValueError, match="init_alpha"):
        HeadAlpha(2, bad)


def test_asentmax_factor_formula():
    scaling = ASEntmaxScaling(2, "head", init_beta=0.3, init_gamma=0.5)
    positions = torch.tensor([[0, 1, 7, 100]])
    factors = scaling(positions)
    assert factors.shape == (1, 2, 4, 1)
    expected = 1 + 0.3 * torch.log(positions.float() + 2) ** 0.5
    torch.testing.assert_close(factors[0, 0, :, 0], expected[0], rtol=1e-5, atol=1e-6)


def test_asentmax_per_token_uses_hidden_states():
    torch.manual_seed(0)
    scaling = ASEntmaxScaling(2, "token", hidden_size=8)
    hidden = torch.randn(3, 5, 8)
    positions = query_positions(5, 0, hidden.device)
    start = scaling(positions, hidden)
    torch.testing.assert_close(start, scaling(positions, torch.randn(3, 5, 8)))  # zero-initialized weights
    torch.nn.init.normal_(scaling.beta_proj.weight)
    moved = scaling(positions, hidden)
    assert moved.shape == (3, 2, 5, 1) and (moved - start).abs().max() > 1e-3
    moved.sum().backward()
    assert scaling.gamma_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="hidden_states"):
        scaling(positions, None)


def test_entmax_attention_module_matches_functional_call():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    module = EntmaxAttention(4, alpha=[1.3, 1.5, 1.7, 1.9])
    expected = entmax_attention(q, k, v, alpha=torch.tensor([1.3, 1.5, 1.7, 1.9]), causal=True)
    out = module(q, k, v, causal=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    assert module.head_alpha.alpha_logit.grad.abs().min() > 0


def test_asentmax_decoding_with_position_offset_matches_full_sequence():
    torch.manual_seed(1)
    module = EntmaxAttention(2, alpha=1.5, asentmax="head", asentmax_init=(0.8, 1.2))
    q, k, v = torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    full = module(q, k, v, causal=True)
    last = module(q[:, :, -1:], k, v, causal=True, position_offset=9)
    torch.testing.assert_close(last, full[:, :, -1:], atol=1e-5, rtol=1e-5)
    wrong_offset = module(q[:, :, -1:], k, v, causal=True, position_offset=0)
    assert (wrong_offset - full[:, :, -1:]).abs().max() > 1e-4
    # The factor is a row-wise scaling of q: the same as scaling q by hand.
    factors = 1 + 0.8 * torch.log(torch.arange(10.0) + 2) ** 1.2
    by_hand = entmax_attention(q * factors.view(1, 1, 10, 1), k, v, alpha=torch.full((2,), 1.5), causal=True)
    torch.testing.assert_close(full, by_hand, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# dense_entmax_attention
# ------------------------------------------------------------------------------------------------------------

def test_dense_path_matches_entmax_attention_and_handles_empty_rows():
    torch.manual_seed(2)
    q, k, v = torch.randn(2, 4, 7, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    keep = torch.ones(7, 7, dtype=torch.bool).tril()[None, None]
    out, weights = dense_entmax_attention(q, k, v, alpha=1.5, keep=keep)
    torch.testing.assert_close(out, entmax_attention(q, k, v, causal=True), atol=1e-5, rtol=1e-5)
    assert bool((weights.masked_select(~keep.expand_as(weights)) == 0).all())
    empty = keep.clone()
    empty[..., 3, :] = False
    out, weights = dense_entmax_attention(q, k, v, keep=empty)
    assert bool((out[:, :, 3] == 0).all()) and bool((weights[:, :, 3] == 0).all())


# ------------------------------------------------------------------------------------------------------------
# MultiheadEntmaxAttention vs torch.nn.MultiheadAttention
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [
    dict(batch_first=True),
    dict(batch_first=False),
    dict(batch_first=True, kdim=24, vdim=16),
    dict(batch_first=True, add_bias_kv=True, add_zero_attn=True),
    dict(batch_first=True, bias=False),
])
def test_shapes_and_near_softmax_limit(options):
    softmax, entmax = _pair(alpha=1.001, **options)
    batch, length, source = 3, 6, 9
    first = (lambda n: (batch, n)) if options.get("batch_first") else (lambda n: (n, batch))
    query = torch.randn(*first(length), 32)
    key = torch.randn(*first(source), options.get("kdim", 32))
    value = torch.randn(*first(source), options.get("vdim", 32))
    padding = torch.zeros(batch, source, dtype=torch.bool)
    padding[1, 5:] = True
    padding[2, :2] = True
    expected, expected_weights = softmax(query, key, value, key_padding_mask=padding)
    out, weights = entmax(query, key, value, key_padding_mask=padding)
    assert out.shape == expected.shape and weights.shape == expected_weights.shape
    torch.testing.assert_close(out, expected, atol=5e-3, rtol=0)
    torch.testing.assert_close(weights, expected_weights, atol=5e-3, rtol=0)
    far = _pair(alpha=1.5, **options)[1]
    assert (far(query, key, value, key_padding_mask=padding)[0] - expected).abs().max() > 1e-2


def test_unbatched_and_per_head_weights():
    softmax, entmax = _pair(alpha=1.001)
    query, key = torch.randn(5, 32), torch.randn(7, 32)
    expected, expected_weights = softmax(query, key, key, average_attn_weights=False)
    out, weights = entmax(query, key, key, average_attn_weights=False)
    assert out.shape == (5, 32) and weights.shape == (4, 5, 7)
    torch.testing.assert_close(weights, expected_weights, atol=5e-3, rtol=0)


def test_need_weights_rows_sum_to_one_with_exact_zeros():
    _, entmax = _pair(alpha=1.5, batch_first=True)
    torch.manual_seed(3)
    x = 3 * torch.randn(2, 12, 32)
    out, weights = entmax(x, x, x, average_attn_weights=False)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 12), atol=1e-5, rtol=0)
    assert bool((weights >= 0).all()) and (weights == 0).float().mean() > 0.05
    fast, none = entmax(x, x, x, need_weights=False)
    assert none is None
    torch.testing.assert_close(fast, out, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:MultiheadEntmaxAttention")
@pytest.mark.parametrize("case", ["causal_mask", "is_causal", "right_padding", "arbitrary"])
def test_masks_are_honoured(case, monkeypatch):
    _, entmax = _pair(alpha=1.5, batch_first=True)
    torch.manual_seed(4)
    x = torch.randn(2, 8, 32)
    kwargs, hidden = {}, torch.zeros(2, 8, 8, dtype=torch.bool)  # hidden[b, i, j]: key j hidden from query i
    if case in ("causal_mask", "is_causal"):
        future = torch.ones(8, 8, dtype=torch.bool).triu(1)
        kwargs = dict(attn_mask=future, is_causal=True) if case == "causal_mask" else dict(is_causal=True)
        hidden[:] = future
    elif case == "right_padding":
        padding = torch.zeros(2, 8, dtype=torch.bool)
        padding[0, 5:] = True
        kwargs = dict(key_padding_mask=padding)
        hidden[:] = padding[:, None, :]
    else:
        mask = torch.rand(8, 8) < 0.4
        mask.fill_diagonal_(False)
        mask[:3, 6:] = True
        kwargs = dict(attn_mask=mask)
        hidden[:] = mask
    if case == "arbitrary":
        with pytest.warns(UserWarning, match="dense path"):
            entmax(x, x, x, need_weights=False, **kwargs)
    out, weights = entmax(x, x, x, **kwargs)
    assert bool((weights[hidden.expand_as(weights)] == 0).all())
    with monkeypatch.context() as patch:
        if case != "arbitrary":  # causal and right padding run on entmax_attention, not the dense path
            patch.setattr(entflash.nn, "dense_entmax_attention", None)
        fast, _ = entmax(x, x, x, need_weights=False, **kwargs)
    torch.testing.assert_close(fast, out, atol=1e-5, rtol=1e-5)
    # Hidden keys' values do not reach the query.
    changed = x.clone()
    changed[:, 6:] += torch.randn(2, 2, 32)
    moved, _ = entmax(x, changed, changed, need_weights=False, **kwargs)
    blind = hidden[:, :, 6:].all(dim=-1)  # queries that see neither key 6 nor 7
    assert blind.any()
    torch.testing.assert_close(moved[blind], out[blind], atol=1e-5, rtol=1e-5)


def test_learnable_alpha_gets_gradient_and_dropout_runs():
    torch.manual_seed(5)
    module = MultiheadEntmaxAttention(16, 2, dropout=0.2, batch_first=True, alpha=1.4, learn_alpha=True)
    x = torch.randn(2, 6, 16)
    out, _ = module(x, x, x, need_weights=False)
    out.square().sum().backward()
    assert module.attention.head_alpha.alpha_logit.grad.abs().min() > 0
    module.eval()
    first, _ = module(x, x, x, need_weights=False)
    second, _ = module(x, x, x, need_weights=False)
    torch.testing.assert_close(first, second)


@pytest.mark.parametrize("kwargs, match", [
    (dict(embed_dim=10, num_heads=3), "num_heads"),
    (dict(embed_dim=8, num_heads=2, dropout=1.5), "dropout"),
    (dict(embed_dim=8, num_heads=2, alpha=2.5), "alpha"),
])
def test_constructor_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiheadEntmaxAttention(**kwargs)


def test_forward_errors_name_the_argument():
    module = MultiheadEntmaxAttention(8, 2, batch_first=True)
    x = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="key_padding_mask"):
        module(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask"):
        module(x, x, x, attn_mask=torch.zeros(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="query"):
        module(torch.randn(8), x, x)
    assert math.isclose(HeadAlpha(1, 1.5)().item(), 1.5, rel_tol=1e-6)


def test_entmax_attention_module_does_not_read_its_alpha_back(monkeypatch):
    """HeadAlpha's alpha is in range by construction: EntmaxAttention asks entmax_attention not to read it (a read
    is a host sync per call on a GPU); a tensor alpha passed to entmax_attention directly is still read."""
    import entflash.checks

    reads = []
    check = entflash.checks.check_alpha

    def recording_check(alpha, num_heads, device, caller, read_values=True):
        reads.append((isinstance(alpha, torch.Tensor), read_values))
        return check(alpha, num_heads, device, caller, read_values)

    monkeypatch.setattr(entflash.checks, "check_alpha", recording_check)
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    module = EntmaxAttention(2, alpha=[1.3, 1.7], learn_alpha=True, backend="torch")
    out = module(q, k, v, causal=True)
    assert reads == [(True, False)]
    torch.testing.assert_close(out, entmax_attention(q, k, v, alpha=module.alpha(), causal=True, backend="torch"))
    assert reads[-1] == (True, True)


def test_unpadded_attention_does_not_read_its_mask_counts_back(monkeypatch):
    """The lengths unpadded_entmax_attention counts from its masks are in range by construction: their values are
    not read (a host sync on a GPU), while seqlens passed to entmax_attention are."""
    import entflash.checks

    reads = []
    check = entflash.checks.check_lengths

    def recording_check(lengths, argument, batch, max_length, device, caller, read_values=True):
        reads.append((argument, caller, read_values))
        return check(lengths, argument, batch, max_length, device, caller, read_values)

    monkeypatch.setattr(entflash.checks, "check_lengths", recording_check)
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 2, 7, 8) for _ in range(3))
    key_valid = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    out = entflash.nn.unpadded_entmax_attention(q, k, v, key_valid, key_valid, causal=True, backend="torch")
    assert reads == [("seqlens[0]", "unpadded_entmax_attention", False),
                     ("seqlens[1]", "unpadded_entmax_attention", False)]
    lengths = key_valid.sum(dim=1)
    expected = entmax_attention(q, k, v, causal=True, seqlens=lengths, backend="torch")
    torch.testing.assert_close(out[0], expected[0])
    torch.testing.assert_close(out[1, :, :4], expected[1, :, :4])
    assert reads[-1] == ("seqlens", "entmax_attention", True)
