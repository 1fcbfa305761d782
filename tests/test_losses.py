"""Entmax (Fenchel-Young) losses (entflash.losses) against the `entmax` package, a direct formula and autograd."""
import math

import entmax as entmax_package
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entflash.losses import entmax_loss, sparsemax_loss
from entflash.reference.rowwise import entmax


def tsallis_entropy(distribution, alpha):
    """(1 - sum q^alpha) / (alpha (alpha - 1)) over the last axis, zeros skipped; alpha a float or (R, 1)."""
    powered = torch.where(distribution > 0, distribution.clamp(min=1e-300) ** alpha, torch.zeros_like(distribution))
    alpha = torch.as_tensor(alpha, dtype=distribution.dtype).reshape(-1)
    return (1 - powered.sum(-1)) / (alpha * (alpha - 1))


def direct_loss(logits, target, alpha, label_smoothing):
    """Per-row loss from the definition, with the smoothed target distribution y materialized; logits (R, C)."""
    num_classes = logits.shape[-1]
    y = torch.full_like(logits, label_smoothing / num_classes)
    y.scatter_add_(1, target[:, None], torch.full_like(logits[:, :1], 1 - label_smoothing))
    p = entmax(logits, alpha)
    return ((p - y) * logits).sum(-1) + tsallis_entropy(p, alpha) - tsallis_entropy(y, alpha), p - y


@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0, 1000.0])
def test_agrees_with_the_entmax_package_losses(scale):
    logits = torch.randn(40, 33, dtype=torch.float64) * scale
    target = torch.randint(0, 33, (40,))
    torch.testing.assert_close(entmax_loss(logits, target, 1.5, reduction="none"),
                               entmax_package.Entmax15Loss(k=None, reduction="none")(logits, target),
                               atol=1e-10 * scale, rtol=1e-10)
    torch.testing.assert_close(sparsemax_loss(logits, target, reduction="none"),
                               entmax_package.SparsemaxLoss(reduction="none")(logits, target),
                               atol=1e-10 * scale, rtol=1e-10)
    for alpha in (1.25, 1.75):
        expected = entmax_package.EntmaxBisectLoss(alpha, n_iter=100, reduction="none")(logits, target)
        torch.testing.assert_close(entmax_loss(logits, target, alpha, reduction="none"), expected,
                                   atol=1e-10 * scale, rtol=1e-10)


@pytest.mark.parametrize("alpha", [1.3, 1.5, 2.0])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.7])
def test_matches_the_direct_formula_and_its_gradient(alpha, label_smoothing):
    logits = (torch.randn(12, 9, dtype=torch.float64) * 3).requires_grad_()
    target = torch.randint(0, 9, (12,))
    losses = entmax_loss(logits, target, alpha, reduction="none", label_smoothing=label_smoothing)
    expected, expected_gradient = direct_loss(logits.detach(), target, alpha, label_smoothing)
    torch.testing.assert_close(losses, expected, atol=1e-12, rtol=1e-12)
    assert (losses > -1e-12).all()
    weights = torch.rand(12, dtype=torch.float64)
    (losses * weights).sum().backward()
    torch.testing.assert_close(logits.grad, expected_gradient * weights[:, None], atol=1e-12, rtol=0)


@settings(max_examples=30, deadline=None)
@given(alpha=st.floats(1.05, 2.0), num_classes=st.integers(2, 30), margin=st.floats(0.0, 5.0))
def test_loss_is_non_negative_and_vanishes_when_entmax_hits_the_target(alpha, num_classes, margin):
    logits = torch.randn(6, num_classes, dtype=torch.float64)
    target = torch.randint(0, num_classes, (6,))
    assert (entmax_loss(logits, target, alpha, reduction="none") >= -1e-12).all()
    # a target logit 1/(alpha-1) above every other one gets p = one-hot(target): zero loss
    confident = logits.clone()
    confident.scatter_(1, target[:, None], logits.max(-1, keepdim=True).values + 1 / (alpha - 1) + margin)
    torch.testing.assert_close(entmax_loss(confident, target, alpha, reduction="none"),
                               torch.zeros(6, dtype=torch.float64), atol=1e-12, rtol=0)


def test_ignore_index_and_reductions():
    logits = (torch.randn(10, 7, dtype=torch.float64) * 0.2).requires_grad_()  # p never one-hot: loss > 0
    target = torch.randint(0, 6, (10,))
    target[target >= 3] += 1  # class 3 only where set below
    target[[1, 4, 5]] = 3
    ignored = torch.zeros(10, dtype=torch.bool)
    ignored[[1, 4, 5]] = True
    losses = entmax_loss(logits, target, 1.5, ignore_index=3, reduction="none")
    assert (losses[ignored] == 0).all() and (losses[~ignored] > 0).all()
    # the package applies a non-negative ignore_index the same way
    expected = entmax_package.Entmax15Loss(k=None, ignore_index=3, reduction="none")(logits.detach(), target)
    torch.testing.assert_close(losses, expected, atol=1e-12, rtol=0)
    total = entmax_loss(logits, target, 1.5, ignore_index=3, reduction="sum")
    mean = entmax_loss(logits, target, 1.5, ignore_index=3)
    torch.testing.assert_close(total, losses.sum(), atol=1e-12, rtol=0)
    torch.testing.assert_close(mean, losses.sum() / 7, atol=1e-12, rtol=0)
    mean.backward()
    assert (logits.grad[ignored] == 0).all() and (logits.grad[~ignored] != 0).any()
    # the default ignore_index -100 behaves like cross_entropy's
    target[0] = -100
    assert entmax_loss(logits, target, 1.5, reduction="none")[0] == 0
    assert math.isnan(entmax_loss(logits, torch.full_like(target, -100), 1.5).item())


def test_spatial_layout_matches_flattened_rows():
    logits = torch.randn(3, 6, 4, 5, dtype=torch.float64)
    target = torch.randint(0, 6, (3, 4, 5))
    alpha = 1.1 + 0.9 * torch.rand(3, 4, 5, dtype=torch.float64)  # one alpha per sample
    losses = entmax_loss(logits, target, alpha, reduction="none", label_smoothing=0.2)
    assert losses.shape == (3, 4, 5)
    rows = logits.movedim(1, -1).reshape(-1, 6)
    flat = entmax_loss(rows, target.reshape(-1), alpha.reshape(-1), reduction="none", label_smoothing=0.2)
    torch.testing.assert_close(losses.reshape(-1), flat, atol=1e-13, rtol=0)
    for i in (0, 17, 59):
        single = entmax_loss(rows[i], target.reshape(-1)[i], alpha.reshape(-1)[i].item(), label_smoothing=0.2)
        torch.testing.assert_close(single, flat[i], atol=1e-13, rtol=0)


def test_gradcheck_logits_and_alpha():
    logits = torch.randn(5, 6, 3, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 6, (5, 3))
    target[0, 0] = -100
    per_sample = (1.1 + 0.8 * torch.rand(5, 3, dtype=torch.float64)).requires_grad_()
    shared = torch.tensor(1.6, dtype=torch.float64, requires_grad=True)
    for alpha in (per_sample, shared):
        for label_smoothing in (0.0, 0.3):
            assert torch.autograd.gradcheck(
                lambda z, a: entmax_loss(z, target, a, reduction="sum", label_smoothing=label_smoothing),
                (logits, alpha))


def test_masked_logits_and_half_precision():
    logits = torch.randn(4, 10)
    logits[:, :3] = -math.inf
    target = torch.randint(3, 10, (4,))
    losses = entmax_loss(logits, target, 1.5, reduction="none")
    torch.testing.assert_close(losses, entmax_loss(logits[:, 3:], target - 3, 1.5, reduction="none"))
    assert entmax_loss(logits, torch.zeros(4, dtype=torch.int64), 1.5, reduction="none").isinf().all()
    half = torch.randn(8, 50).to(torch.bfloat16).requires_grad_()
    target = torch.randint(0, 50, (8,))
    loss = sparsemax_loss(half, target)
    assert loss.dtype == torch.bfloat16
    torch.testing.assert_close(loss.float(), sparsemax_loss(half.detach().float(), target), atol=2e-2, rtol=1e-2)
    loss.backward()
    assert half.grad.dtype == torch.bfloat16 and half.grad.isfinite().all()


LOGITS = torch.randn(4, 5)
TARGET = torch.randint(0, 5, (4,))


@pytest.mark.parametrize("kwargs, error, argument", [
    (dict(logits=LOGITS.long(), target=TARGET), TypeError, "`logits`"),
    (dict(logits=torch.tensor(1.0), target=TARGET), ValueError, "`logits`"),
    (dict(logits=LOGITS, target=TARGET.float()), TypeError, "`target`"),
    (dict(logits=LOGITS, target=TARGET[:3]), ValueError, "`target`"),
    (dict(logits=LOGITS, target=torch.tensor([0, 1, 5, 2])), ValueError, "`target`"),
    (dict(logits=LOGITS, target=torch.tensor([0, 1, -1, 2])), ValueError, "`target`"),
    (dict(logits=LOGITS, target=TARGET, alpha=0.5), ValueError, "`alpha`"),
    (dict(logits=LOGITS, target=TARGET, alpha=torch.full((3,), 1.5)), ValueError, "`alpha`"),
    (dict(logits=LOGITS, target=TARGET, reduction="elementwise_mean"), ValueError, "`reduction`"),
    (dict(logits=LOGITS, target=TARGET, label_smoothing=1.5), ValueError, "`label_smoothing`"),
    (dict(logits=LOGITS, target=TARGET, label_smoothing="0.1"), TypeError, "`label_smoothing`"),
    (dict(logits=LOGITS, target=TARGET, ignore_index=1.0), TypeError, "`ignore_index`"),
])
def test_rejects_bad_arguments(kwargs, error, argument):
    with pytest.raises(error, match=argument):
        entmax_loss(**kwargs)
    if "alpha" not in kwargs:
        with pytest.raises(error, match=argument):
            sparsemax_loss(**kwargs)


@pytest.mark.gpu
def test_gpu_loss_paths_tensor_alpha_warns_once_and_bad_targets_raise():
    """On CUDA a tensor alpha runs the PyTorch loss and says so once; an out-of-range target raises on both the
    fused (float alpha) and the PyTorch path."""
    import warnings

    import entflash.losses as losses_module
    losses_module._warned_reference_loss = False
    logits = torch.randn(8, 100, device="cuda")
    target = torch.randint(0, 100, (8,), device="cuda")
    alpha = torch.full((8,), 1.5, device="cuda")
    with pytest.warns(UserWarning, match="tensor alpha"):
        by_tensor = entmax_loss(logits, target, alpha)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        entmax_loss(logits, target, alpha)
        torch.testing.assert_close(entmax_loss(logits, target, 1.5), by_tensor)
    target[2] = 100
    for path_alpha in (1.5, alpha):
        with pytest.raises(ValueError, match="`target`"):
            entmax_loss(logits, target, path_alpha)
