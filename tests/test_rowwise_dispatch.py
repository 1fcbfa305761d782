"""The public row-wise ops route CUDA tensors to the fused kernels and everything else to the reference."""
import pytest
import torch

import entflash
from entflash import losses, rowwise
from entflash.reference import rowwise as reference


def _chosen(table, *args):
    return next(impl for accepts, impl in table if accepts(*args))


def test_cpu_and_float64_take_the_reference():
    assert _chosen(rowwise._IMPLEMENTATIONS, torch.randn(2, 5), 1.5) is reference.entmax
    assert _chosen(losses._LOSSES, torch.randn(2, 5), 1.5) is losses._reference_losses


def test_fused_entries_match_the_reference_under_the_interpreter():
    x = torch.randn(6, 37) * 3
    alpha = torch.tensor([1.25, 1.5, 2.0, 1.75, 1.01, 1.5]).unsqueeze(-1)
    fused = rowwise._fused_entmax(x, alpha, -1)
    exact = reference.entmax(x.double(), alpha.double(), -1)
    assert torch.allclose(fused.double(), exact, atol=1e-5)
    target = torch.randint(0, 37, (6,))
    target[2] = -100
    for reduction in ("none", "sum", "mean"):
        fused_loss = losses._fused_losses(x, target, 1.5, -100, 0.1, reduction)
        exact_loss = losses._reference_losses(x.double(), target, 1.5, -100, 0.1, reduction)
        assert fused_loss.shape == exact_loss.shape
        assert torch.allclose(fused_loss.double(), exact_loss, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_cuda_tensors_take_the_fused_kernels():
    x = torch.randn(4, 1000, device="cuda")
    assert _chosen(rowwise._IMPLEMENTATIONS, x, 1.5) is rowwise._fused_entmax
    assert _chosen(rowwise._IMPLEMENTATIONS, x.double(), 1.5) is reference.entmax
    assert _chosen(losses._LOSSES, x, 1.5) is losses._fused_losses
    assert _chosen(losses._LOSSES, x, torch.full((4, 1), 1.5, device="cuda")) is losses._reference_losses
    p = entflash.entmax(x, 1.5)
    assert torch.allclose(p.sum(-1), torch.ones(4, device="cuda"), atol=1e-5)
