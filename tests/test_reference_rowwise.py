"""Exact row-wise alpha-entmax (entflash.reference.rowwise) and the public ops (entflash.rowwise).

Oracles: the `entmax` package (entmax15, sparsemax, entmax_bisect and its autograd alpha gradient),
torch.softmax for alpha -> 1, finite differences (gradcheck), and the defining equations themselves.
"""
import math

import entmax as entmax_package
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from entflash import rowwise
from entflash.reference.rowwise import entmax, entmax15, entmax_threshold, sparsemax

ALPHA_MIX = (1.01, 1.25, 1.5, 1.75, 2.0)
SCALES = (0.1, 1.0, 10.0, 1000.0)

rows_strategy = hnp.arrays(
    np.float64,
    st.tuples(st.integers(1, 4), st.integers(1, 40)),
    elements=st.floats(-30, 30, allow_nan=False, allow_infinity=False),
)
alpha_strategy = st.one_of(st.sampled_from([1.5, 2.0]), st.floats(1.05, 2.0))


def probabilities_from_threshold(x, alpha, tau):
    """The defining formula p = [(alpha-1) x - tau]_+ ** (1/(alpha-1)) for a python-float alpha."""
    return torch.clamp((alpha - 1) * x - tau, min=0) ** (1 / (alpha - 1))


@settings(max_examples=60, deadline=None)
@given(rows=rows_strategy, alpha=alpha_strategy)
def test_probabilities_are_a_sparse_distribution_cut_at_the_threshold(rows, alpha):
    x = torch.from_numpy(rows)
    p = entmax(x, alpha)
    tau = entmax_threshold(x, alpha)
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(x.shape[0], dtype=x.dtype), atol=1e-12, rtol=0)
    margin = 1e-9 * (1 + tau.abs())
    scaled = (alpha - 1) * x
    assert (p[scaled < tau - margin] == 0).all()  # exact zeros below the threshold
    assert (p[scaled > tau + margin] > 0).all()
    torch.testing.assert_close(p, probabilities_from_threshold(x, alpha, tau), atol=1e-12, rtol=0)


@settings(max_examples=40, deadline=None)
@given(rows=rows_strategy, alpha=alpha_strategy, shift=st.floats(-100, 100))
def test_adding_a_constant_to_a_row_changes_nothing(rows, alpha, shift):
    x = torch.from_numpy(rows)
    torch.testing.assert_close(entmax(x + shift, alpha), entmax(x, alpha), atol=1e-10, rtol=0)


@settings(max_examples=40, deadline=None)
@given(rows=rows_strategy)
def test_alpha_two_is_sparsemax(rows):
    x = torch.from_numpy(rows)
    p = entmax(x, 2.0)
    torch.testing.assert_close(p, sparsemax(x), atol=0, rtol=0)
    torch.testing.assert_close(p, entmax_package.sparsemax(x, dim=-1), atol=1e-12, rtol=0)
    # the general solver, at an alpha a hair below 2, lands on the same projection
    torch.testing.assert_close(entmax(x, 2.0 - 1e-9), p, atol=1e-6, rtol=0)


def test_alpha_near_one_approaches_softmax():
    x = torch.randn(64, 30, dtype=torch.float64) * 2
    softmax = torch.softmax(x, dim=-1)
    gaps = [(entmax(x, alpha) - softmax).abs().max().item() for alpha in (1.1, 1.01, 1.001)]
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 5e-3


@pytest.mark.parametrize("scale", SCALES)
def test_agrees_with_the_entmax_package(scale):
    x = torch.randn(32, 257, dtype=torch.float64) * scale
    torch.testing.assert_close(entmax15(x), entmax_package.entmax15(x, dim=-1), atol=1e-12, rtol=0)
    torch.testing.assert_close(sparsemax(x), entmax_package.sparsemax(x, dim=-1), atol=1e-12, rtol=0)
    for alpha in (1.01, 1.25, 1.75, 1.99):
        expected = entmax_package.entmax_bisect(x, alpha, dim=-1, n_iter=100)
        torch.testing.assert_close(entmax(x, alpha), expected, atol=1e-12, rtol=0)


def test_rows_with_windows_of_very_different_sizes():
    # the solvers look only at each row's k largest entries, k the widest window of the batch
    x = torch.randn(6, 900, dtype=torch.float64) * torch.tensor([0.05, 0.4, 1, 10, 100, 1000],
                                                              dtype=torch.float64)[:, None]
    x[0, 300:] -= 100  # row 0: about a third of its entries inside the window
    torch.testing.assert_close(entmax15(x), entmax_package.entmax15(x, dim=-1), atol=1e-12, rtol=0)
    torch.testing.assert_close(sparsemax(x), entmax_package.sparsemax(x, dim=-1), atol=1e-12, rtol=0)
    torch.testing.assert_close(entmax(x, 1.4), entmax_package.entmax_bisect(x, 1.4, n_iter=100), atol=1e-12,
                               rtol=0)


@pytest.mark.parametrize("alpha", [1.01, 1.3, 1.5, 1.75, 1.999, 2.0])
def test_threshold_meets_the_precision_contract(alpha):
    x64 = torch.randn(16, 3000, dtype=torch.float64) * 4
    tau = entmax_threshold(x64, alpha)
    assert tau.shape == (16, 1) and tau.dtype == torch.float64
    row_sums = probabilities_from_threshold(x64, alpha, tau).sum(-1)
    assert (row_sums - 1).abs().max() < 1e-13
    x32 = x64.float()
    tau32 = entmax_threshold(x32, alpha)
    assert tau32.dtype == torch.float32
    # float32 rounding of (alpha-1) x - tau grows with |tau| and is amplified by the exponent 1/(alpha-1)
    conditioning = (1 + tau32.abs().max().item()) * (1 + 1 / (alpha - 1))
    assert (probabilities_from_threshold(x32, alpha, tau32).sum(-1) - 1).abs().max() < 1e-6 * conditioning
    torch.testing.assert_close(entmax(x32, alpha).double(), entmax(x64, alpha), atol=2e-6, rtol=0)


@pytest.mark.parametrize("alpha", [1.01, 1.5, 1.8, 2.0])
def test_degenerate_rows_ties_single_winner_and_one_entry(alpha):
    n = 1000
    ties = torch.full((1, n), 3.0, dtype=torch.float64)
    torch.testing.assert_close(entmax(ties, alpha), torch.full_like(ties, 1 / n), atol=1e-14, rtol=0)
    winner = torch.randn(1, n, dtype=torch.float64)
    winner[0, 17] = winner.max() + 2 / (alpha - 1)
    assert entmax(winner, alpha)[0, 17] == 1 and entmax(winner, alpha).sum() == 1
    single = torch.randn(5, 1, dtype=torch.float64)
    assert (entmax(single, alpha) == 1).all()


def test_per_row_alpha_mix_matches_each_alpha_alone():
    x = torch.randn(3, 5, 2, 40, dtype=torch.float64) * 3
    alpha = torch.tensor(ALPHA_MIX, dtype=torch.float64)[:, None]  # (5, 1) over rows of shape (3, 5, 2)
    p = entmax(x, alpha, dim=-1)
    for h, value in enumerate(ALPHA_MIX):
        torch.testing.assert_close(p[:, h], entmax(x[:, h], value), atol=1e-13, rtol=0)
        torch.testing.assert_close(p[:, h], entmax_package.entmax_bisect(x[:, h], value, n_iter=100), atol=1e-12,
                                   rtol=0)
    # a shuffled per-row mix, along a middle axis, in the "dim kept" form
    per_row = torch.tensor(ALPHA_MIX, dtype=torch.float64)[torch.randint(0, 5, (3, 1, 2, 40))]
    p_mid = entmax(x, per_row, dim=1)
    tau = entmax_threshold(x, per_row, dim=1)
    assert tau.shape == (3, 1, 2, 40)
    torch.testing.assert_close(p_mid.sum(1), torch.ones(3, 2, 40, dtype=torch.float64), atol=1e-13, rtol=0)
    torch.testing.assert_close(p_mid, probabilities_from_threshold(x, per_row, tau), atol=1e-12, rtol=0)


def test_alpha_forms_dim_removed_and_dim_kept_agree():
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    alpha = 1 + torch.rand(2, 3, 4, dtype=torch.float64)
    expected = entmax(x, alpha, dim=-1)
    torch.testing.assert_close(entmax(x, alpha.unsqueeze(-1), dim=-1), expected, atol=0, rtol=0)
    torch.testing.assert_close(entmax(x.transpose(1, 3), alpha.transpose(1, 2), dim=1),
                               expected.transpose(1, 3), atol=1e-14, rtol=0)
    torch.testing.assert_close(entmax_threshold(x, alpha), entmax_threshold(x, alpha.unsqueeze(-1)), atol=0, rtol=0)


def test_masked_entries_and_rows_without_any_score():
    x = torch.randn(4, 12, dtype=torch.float64)
    x[0] = -math.inf
    x[1, :7] = -math.inf
    for alpha in (1.3, 1.5, 2.0, torch.tensor([1.3, 1.5, 2.0, 1.7], dtype=torch.float64)):
        p = entmax(x, alpha)
        assert not p.isnan().any()
        assert (p[0] == 0).all() and (p[1, :7] == 0).all()
        row_alpha = alpha if isinstance(alpha, float) else alpha[1].item()
        torch.testing.assert_close(p[1, 7:], entmax(x[1, 7:], row_alpha), atol=1e-14, rtol=0)
        tau = entmax_threshold(x, alpha)
        assert tau[0, 0] == math.inf and tau[1:].isfinite().all()
    leaf = x.clone().requires_grad_()
    alpha = torch.tensor([1.3, 1.5, 2.0, 1.7], dtype=torch.float64, requires_grad=True)
    (entmax(leaf, alpha) * torch.randn(4, 12, dtype=torch.float64)).sum().backward()
    assert leaf.grad.isfinite().all() and (leaf.grad[0] == 0).all() and (leaf.grad[1, :7] == 0).all()
    assert alpha.grad.isfinite().all() and alpha.grad[0] == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("alpha", [1.25, 1.5, 2.0])
def test_half_precision_inputs(dtype, alpha):
    x = (torch.randn(8, 100) * 3).to(dtype)
    x[0, :50] = -math.inf
    p = entmax(x, alpha)
    assert p.dtype == dtype
    expected = entmax(x.double(), alpha)
    tolerance = 4e-3 if dtype == torch.float16 else 2e-2
    torch.testing.assert_close(p.double(), expected, atol=tolerance, rtol=0)
    assert entmax_threshold(x, alpha).dtype == torch.float32
    leaf = x.clone().requires_grad_()
    entmax(leaf, alpha)[:, 3].sum().backward()
    assert leaf.grad.dtype == dtype and leaf.grad.isfinite().all()


@pytest.mark.parametrize("alpha", [1.25, 1.5, 2.0])
def test_gradcheck_scores_with_a_float_alpha(alpha):
    x = torch.randn(3, 7, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: entmax(t, alpha, dim=1), (x,))


def test_gradcheck_scores_and_per_row_alpha():
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    alpha = (1.1 + 0.8 * torch.rand(3, 4, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda t, a: entmax(t, a, dim=-1), (x, alpha))
    per_head = torch.tensor([1.2, 1.5, 1.7, 2.0], dtype=torch.float64, requires_grad=True)  # reduced over rows
    assert torch.autograd.gradcheck(lambda t, a: entmax(t, a, dim=-1), (x, per_head))


def test_alpha_gradient_matches_the_entmax_package():
    x = torch.randn(10, 30, dtype=torch.float64) * 2
    alpha = (1.1 + 0.8 * torch.rand(10, dtype=torch.float64)).requires_grad_()
    alpha_package = alpha.detach().clone().unsqueeze(-1).requires_grad_()
    weights = torch.randn(10, 30, dtype=torch.float64)
    (entmax(x, alpha) * weights).sum().backward()
    (entmax_package.entmax_bisect(x, alpha_package, n_iter=100) * weights).sum().backward()
    torch.testing.assert_close(alpha.grad, alpha_package.grad.squeeze(-1), atol=1e-9, rtol=1e-7)


def test_public_ops_dispatch_to_the_reference():
    x = torch.randn(5, 3, 9)
    alpha = 1.2 + 0.7 * torch.rand(5, 9)
    torch.testing.assert_close(rowwise.entmax(x, alpha, dim=1), entmax(x, alpha, dim=1), atol=0, rtol=0)
    torch.testing.assert_close(rowwise.sparsemax(x, dim=0), sparsemax(x, dim=0), atol=0, rtol=0)
    torch.testing.assert_close(rowwise.entmax15(x), entmax15(x), atol=0, rtol=0)
    torch.testing.assert_close(rowwise.entmax(x, 1.3, -2), entmax(x, 1.3, dim=1), atol=0, rtol=0)


X = torch.randn(2, 3, 4)


@pytest.mark.parametrize("kwargs, error, argument", [
    (dict(x=[1.0, 2.0]), TypeError, "`x`"),
    (dict(x=torch.ones(3, dtype=torch.int64)), TypeError, "`x`"),
    (dict(x=torch.tensor(1.0)), ValueError, "`x`"),
    (dict(x=torch.ones(3, 0)), ValueError, "`x`"),
    (dict(x=X, dim=3), ValueError, "`dim`"),
    (dict(x=X, dim=-4), ValueError, "`dim`"),
    (dict(x=X, dim=1.0), TypeError, "`dim`"),
    (dict(x=X, alpha=1.0), ValueError, "`alpha`"),
    (dict(x=X, alpha=2.5), ValueError, "`alpha`"),
    (dict(x=X, alpha=float("nan")), ValueError, "`alpha`"),
    (dict(x=X, alpha="1.5"), TypeError, "`alpha`"),
    (dict(x=X, alpha=True), TypeError, "`alpha`"),
    (dict(x=X, alpha=torch.tensor([1.5, 2.5, 1.2])), ValueError, "`alpha`"),
    (dict(x=X, alpha=torch.tensor([2, 2, 2])), TypeError, "`alpha`"),
    (dict(x=X, alpha=torch.full((4,), 1.5)), ValueError, "`alpha`"),
    (dict(x=X, alpha=torch.full((2, 3, 4), 1.5)), ValueError, "`alpha`"),
])
def test_public_entmax_rejects_bad_arguments(kwargs, error, argument):
    with pytest.raises(error, match=argument):
        rowwise.entmax(**kwargs)


def test_public_sparsemax_and_entmax15_reject_bad_arguments():
    with pytest.raises(TypeError, match="sparsemax: `x`"):
        rowwise.sparsemax(torch.ones(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="entmax15: `dim`"):
        rowwise.entmax15(X, dim=5)


@pytest.mark.gpu
@pytest.mark.parametrize("alpha", [1.25, 1.5, 2.0])
def test_reference_on_cuda_matches_cpu(alpha):
    x = torch.randn(64, 5000, dtype=torch.float64) * 3
    x[0] = -math.inf
    per_row = 1.1 + 0.9 * torch.rand(64, dtype=torch.float64)
    for a in (alpha, per_row):
        on_device = entmax(x.cuda(), a.cuda() if isinstance(a, torch.Tensor) else a).cpu()
        torch.testing.assert_close(on_device, entmax(x, a), atol=1e-13, rtol=0)
