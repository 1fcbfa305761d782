"""Fused row-wise entmax kernels (src/entflash/kernels/rowwise.py) against float64 oracles.

On CPU the kernels run through the Triton interpreter (tests/conftest.py) at small shapes; the
`gpu` group runs them at vocabulary scale. Oracles: `entmax.entmax_bisect` in float64 (probabilities
and gradients, x and alpha) and the exact `entflash.reference.rowwise.entmax_threshold` (tau).
"""
import math

import pytest
import torch

from entmax import entmax_bisect

from entflash.kernels import rowwise as kr
from entflash.reference.rowwise import entmax_threshold

ALPHAS = [1.01, 1.25, 1.5, 1.75, 2.0]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def oracle(x, alpha, dim=-1):
    """float64 alpha-entmax of x (any dtype) along dim; alpha float or tensor broadcastable over rows."""
    a = alpha.double() if isinstance(alpha, torch.Tensor) else torch.tensor(alpha, dtype=torch.float64)
    return entmax_bisect(x.double(), a.to(x.device), dim=dim, n_iter=100)


def p_tol(alpha):
    """Absolute tolerance on p for float32 inputs: with r = 1/(alpha-1), rounding of the shifted score
    (about 6e-8 relative) is amplified r times in p = u^r."""
    return 2e-6 + 6e-8 / (alpha - 1)


def random_rows(rows, n, scale=2.0, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, n, generator=g) * scale).to(dtype).to(DEVICE)


@pytest.fixture
def poison_empty(monkeypatch):
    """Make torch.empty return NaN-filled float tensors, so an output entry the kernel never writes shows."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)


# ----------------------------------------------------------------------------- forward, uniform alpha

@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("n,block_n", [(1, None), (7, None), (64, None), (1000, None), (5000, None),
                                       (5000, 1024)])
def test_forward_matches_oracle(n, block_n, alpha, poison_empty):
    x = random_rows(3, n, seed=n + int(100 * alpha))
    p, tau = kr.entmax_rows_forward(x, alpha, block_n=block_n)
    ref = oracle(x, alpha)
    assert p.dtype == x.dtype and p.shape == x.shape
    assert not torch.isnan(p).any() and not torch.isnan(tau).any()
    assert (p >= 0).all()
    torch.testing.assert_close(p.double(), ref, atol=p_tol(alpha), rtol=0)
    torch.testing.assert_close(p.double().sum(-1), torch.ones(3, dtype=torch.float64, device=DEVICE),
                               atol=30 * p_tol(alpha), rtol=0)
    # tau in (alpha - 1) * x units: float32 of (alpha-1)*max plus the shift
    tau_ref = entmax_threshold(x.double(), alpha, dim=-1).squeeze(-1)
    torch.testing.assert_close(tau.double(), tau_ref, atol=1e-5, rtol=1e-6)
    # support: entries that are exactly zero in the oracle (by a margin) are exactly zero here
    sure_zero = (alpha - 1) * x.double() < tau_ref[:, None] - 1e-4
    assert (p[sure_zero] == 0).all()


def test_forward_chunked_equals_single_block():
    x = random_rows(2, 1500, scale=3.0, seed=11)
    for alpha in (1.25, 1.5, 2.0):
        p1, t1 = kr.entmax_rows_forward(x, alpha)
        p2, t2 = kr.entmax_rows_forward(x, alpha, block_n=256)
        torch.testing.assert_close(p1, p2, atol=p_tol(alpha), rtol=0)
        torch.testing.assert_close(t1, t2, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- per-row alpha, dim, dtype

@pytest.mark.parametrize("n,block_n", [(7, None), (1000, None), (3000, 1024)])
def test_forward_per_row_alpha(n, block_n):
    alphas = torch.tensor([1.01, 1.3, 1.5, 1.9, 2.0], device=DEVICE)
    x = random_rows(5, n, seed=n)
    p, tau = kr.entmax_rows_forward(x, alphas, block_n=block_n)
    ref = oracle(x, alphas[:, None])
    assert not torch.isnan(p).any()
    torch.testing.assert_close(p.double(), ref, atol=p_tol(1.01), rtol=0)
    tau_ref = entmax_threshold(x.double(), alphas.double()[:, None], dim=-1).squeeze(-1)
    torch.testing.assert_close(tau.double(), tau_ref, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_fused_entmax_any_dim_and_broadcast_alpha(dim):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 33, 3, generator=g) * 2).to(DEVICE)[:, 3:8]  # strided view (2, 5, 3)
    shape = [2, 5, 3]
    shape[dim] = 1
    # broadcast over dim 0 (or, for dim = 0, given with dim 0 of size 1)
    alpha = (1.05 + 0.9 * torch.rand(shape if dim == 0 else shape[1:], generator=g)).to(DEVICE)
    p = kr.fused_entmax(x, alpha, dim=dim)
    ref = oracle(x, alpha.expand(shape), dim=dim)
    assert p.shape == x.shape
    torch.testing.assert_close(p.double(), ref, atol=p_tol(1.05), rtol=0)


def test_fused_entmax_last_dim_contiguous_makes_no_copy(monkeypatch):
    x = random_rows(6, 50, seed=5).reshape(2, 3, 50)
    seen = {}
    real = kr.entmax_rows_forward

    def spy(x2d, alpha_rows, **kw):
        seen["ptr"] = x2d.data_ptr()
        return real(x2d, alpha_rows, **kw)

    monkeypatch.setattr(kr, "entmax_rows_forward", spy)
    kr.fused_entmax(x, 1.5, dim=-1)
    assert seen["ptr"] == x.data_ptr()


@pytest.mark.parametrize("dtype,alpha", [(torch.bfloat16, 1.25), (torch.bfloat16, 1.5),
                                         (torch.bfloat16, 2.0), (torch.float16, 1.5)])
def test_forward_half_precision(dtype, alpha):
    x = random_rows(3, 1000, dtype=dtype, seed=21)
    p, _ = kr.entmax_rows_forward(x, alpha)
    assert p.dtype == dtype
    ref = oracle(x, alpha)  # on the bf16-rounded input
    torch.testing.assert_close(p.double(), ref, atol=4e-3, rtol=1e-2)
    assert abs(p.double().sum(-1) - 1).max() < 2e-2


# ----------------------------------------------------------------------------- extreme inputs

def test_extreme_logits_no_nan():
    n = 300
    g = torch.Generator().manual_seed(9)
    rows = [
        (torch.randint(0, 2, (n,), generator=g) * 2 - 1).float() * 1e4,  # +-1e4: ties at the max
        torch.full((n,), 3.7),  # all equal: uniform
        torch.cat([torch.tensor([50.0]), torch.randn(n - 1, generator=g)]),  # one dominant
        torch.where(torch.rand(n, generator=g) < 0.5, float("-inf"), torch.randn(n, generator=g)),
        torch.full((n,), float("-inf")),  # nothing visible
        torch.randn(n, generator=g) * 1e4 + 1e4,  # large offset and spread
    ]
    x = torch.stack(rows).to(DEVICE)
    for alpha in (1.01, 1.5, 2.0):
        p, tau = kr.entmax_rows_forward(x, alpha)
        assert not torch.isnan(p).any()
        assert (p[4] == 0).all() and math.isinf(tau[4].item()) and tau[4] > 0
        ref = oracle(x[[0, 1, 2, 3, 5]], alpha)
        torch.testing.assert_close(p[[0, 1, 2, 3, 5]].double(), ref, atol=p_tol(alpha), rtol=0)
        assert torch.allclose(p[1], torch.full_like(p[1], 1.0 / n))
        if alpha >= 1.5:  # near alpha = 1 the tail is tiny but not zero
            assert p[2, 0] == 1.0 and (p[2, 1:] == 0).all()


def test_all_neg_inf_rows_have_zero_gradients():
    x = random_rows(3, 40, seed=2)
    x[1] = float("-inf")
    x.requires_grad_(True)
    alpha = torch.tensor([1.3, 1.6, 1.9], device=DEVICE, requires_grad=True)
    p = kr.fused_entmax(x, alpha[:, None], dim=-1)
    (p * torch.randn_like(p)).sum().backward()
    assert not torch.isnan(x.grad).any() and not torch.isnan(alpha.grad).any()
    assert (x.grad[1] == 0).all() and alpha.grad[1] == 0 and (p[1] == 0).all()


def test_empty_shapes():
    p, tau = kr.entmax_rows_forward(torch.zeros(0, 5, device=DEVICE), 1.5)
    assert p.shape == (0, 5) and tau.shape == (0,)
    out = kr.fused_entmax(torch.zeros(2, 0, 3, device=DEVICE), 1.5, dim=1)
    assert out.shape == (2, 0, 3)


# ----------------------------------------------------------------------------- gradients

def oracle_grads(x, alpha, gout, dim=-1):
    """float64 (dx, dalpha) of sum(entmax(x, alpha) * gout) by autograd through entmax_bisect."""
    xd = x.detach().double().requires_grad_(True)
    ad = alpha.detach().double().requires_grad_(True)
    (entmax_bisect(xd, ad, dim=dim, n_iter=100) * gout.double()).sum().backward()
    return xd.grad, ad.grad


@pytest.mark.parametrize("n,block_n", [(7, None), (1000, None), (3000, 1024)])
def test_gradients_x_and_per_row_alpha(n, block_n):
    alphas = torch.tensor([1.1, 1.4, 1.5, 1.8, 2.0], device=DEVICE)
    x = random_rows(5, n, seed=n + 1)
    gout = random_rows(5, n, scale=1.0, seed=n + 2)
    p, _ = kr.entmax_rows_forward(x, alphas, block_n=block_n)
    dx, da = kr.entmax_rows_backward(p, gout, alphas, True, block_n=block_n)
    rdx, rda = oracle_grads(x, alphas[:, None], gout)
    torch.testing.assert_close(dx.double(), rdx, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(da.double(), rda[:, 0], atol=2e-4, rtol=1e-3)


def closed_form_grads(p, alpha, gout):
    """float64 (dx, dalpha) of the closed forms in entmax_rows_backward's docstring, from probabilities p (R, n)
    and a per-row alpha (R,)."""
    p, gout, a = p.double(), gout.double(), alpha.double()[:, None]
    s = torch.where(p > 0, p.clamp_min(1e-300) ** (2 - a), 0.0)
    s_hat = s / s.sum(-1, keepdim=True)
    plogp = torch.where(p > 0, p * p.clamp_min(1e-300).log(), 0.0)
    ent = plogp.sum(-1, keepdim=True)
    dx = s * (gout - (s * gout).sum(-1, keepdim=True) / s.sum(-1, keepdim=True))
    da = (gout * ((p - s_hat) / (a - 1) ** 2 - (plogp - s_hat * ent) / (a - 1))).sum(-1)
    return dx, da


@pytest.mark.parametrize("block_n", [None, 16])
def test_gradients_at_subnormal_probabilities(block_n):
    """Probabilities below float32's normal range (p = u^r with r = 1/(alpha-1) up to 100 underflows readily) are
    read as 0 by the compiled log2, as the interpreter here reads them too: p log p must stay 0 and p^0 (alpha =
    2) must stay 1 there, never NaN. At 78d7663 dalpha was NaN at alpha = 1.1 on the GPU."""
    alphas = torch.tensor([1.1, 1.5, 2.0, 1.01], device=DEVICE)
    g = torch.Generator().manual_seed(11)
    p = torch.rand(4, 40, generator=g)
    p[:, ::3] = 0.0
    p = p / p.sum(-1, keepdim=True)
    p[:, 1::5] = torch.tensor([1e-39, 3e-42, 1e-45, 5e-40])[:, None]  # subnormal float32, one size per row
    p = p.to(DEVICE)
    assert (p[:, 1::5] > 0).all() and (p[:, 1::5] < 1.1754944e-38).all()
    gout = random_rows(4, 40, scale=1.0, seed=12)
    dx, da = kr.entmax_rows_backward(p, gout, alphas, True, block_n=block_n)
    assert torch.isfinite(dx).all() and torch.isfinite(da).all()
    rdx, rda = closed_form_grads(p, alphas, gout)
    torch.testing.assert_close(dx.double(), rdx, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(da.double(), rda, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("alpha", [1.5, 2.0, 1.25])
def test_gradients_uniform_alpha_autograd(alpha):
    x = random_rows(4, 200, seed=7).reshape(2, 2, 200).requires_grad_(True)
    gout = random_rows(4, 200, scale=1.0, seed=8).reshape(2, 2, 200)
    (kr.fused_entmax(x, alpha, dim=-1) * gout).sum().backward()
    rdx, _ = oracle_grads(x, torch.tensor(alpha, device=DEVICE), gout)
    torch.testing.assert_close(x.grad.double(), rdx, atol=2e-5, rtol=1e-4)


def test_alpha_gradient_reduced_to_alpha_shape_with_dim():
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(3, 20, 4, generator=g) * 2).to(DEVICE).requires_grad_(True)
    alpha = (1.2 + 0.6 * torch.rand(4, generator=g)).to(DEVICE).requires_grad_(True)  # one per last index
    gout = torch.randn(3, 20, 4, generator=g).to(DEVICE)
    (kr.fused_entmax(x, alpha, dim=1) * gout).sum().backward()
    rdx, rda = oracle_grads(x, alpha.expand(3, 1, 4), gout, dim=1)
    assert alpha.grad.shape == alpha.shape
    torch.testing.assert_close(x.grad.double(), rdx, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(alpha.grad.double(), rda.sum(dim=(0, 1)), atol=2e-4, rtol=1e-3)


def test_backward_writes_every_entry(poison_empty):
    x = random_rows(2, 1500, seed=13)
    alphas = torch.tensor([1.3, 1.7], device=DEVICE)
    p, _ = kr.entmax_rows_forward(x, alphas, block_n=512)
    dx, da = kr.entmax_rows_backward(p, torch.randn_like(p), alphas, True, block_n=512)
    assert not torch.isnan(p).any() and not torch.isnan(dx).any() and not torch.isnan(da).any()


def test_rejects_bad_alpha():
    x = random_rows(2, 8)
    with pytest.raises(ValueError, match="alpha"):
        kr.entmax_rows_forward(x, 1.0)
    with pytest.raises(ValueError, match="alpha_rows"):
        kr.entmax_rows_forward(x, torch.full((3,), 1.5, device=DEVICE))


# ----------------------------------------------------------------------------- GPU, vocabulary scale

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("alpha", [1.25, 1.5, 2.0])
def test_gpu_vocabulary_scale_forward(dtype, alpha):
    x = (torch.randn(1024, 131072, device="cuda") * 3).to(dtype)
    p, tau = kr.entmax_rows_forward(x, alpha)
    assert not torch.isnan(p).any()
    sums = p.double().sum(-1)
    assert (sums - 1).abs().max() < (1e-4 if dtype == torch.float32 else 3e-2)
    rows = x[:64]
    ref = oracle(rows, alpha)
    atol = p_tol(alpha) if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(p[:64].double(), ref, atol=atol, rtol=0 if dtype == torch.float32 else 1e-2)


@pytest.mark.gpu
def test_gpu_vocabulary_scale_gradients():
    alphas = torch.linspace(1.1, 2.0, 16, device="cuda")
    x = torch.randn(16, 131072, device="cuda") * 3
    gout = torch.randn_like(x)
    p, _ = kr.entmax_rows_forward(x, alphas)
    dx, da = kr.entmax_rows_backward(p, gout, alphas, True)
    rdx, rda = oracle_grads(x, alphas[:, None], gout)
    torch.testing.assert_close(dx.double(), rdx, atol=5e-5, rtol=1e-3)
    torch.testing.assert_close(da.double(), rda[:, 0], atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
def test_gpu_extreme_and_long_rows():
    x = torch.randn(8, 262144, device="cuda") * 1e4
    x[3] = float("-inf")
    x[5] = 1.0
    p = kr.fused_entmax(x, 1.5)
    assert not torch.isnan(p).any() and (p[3] == 0).all()
    assert torch.allclose(p[5], torch.full_like(p[5], 1 / 262144))
    ok = [0, 1, 2, 4, 6, 7]
    torch.testing.assert_close(p[ok].double(), oracle(x[ok], 1.5), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- fused entmax loss

def oracle_loss(z, target, alpha, eps, ignore_index=-100):
    """float64 Fenchel-Young loss per row: <p - y, z> + H(p) - H(y), H the Tsallis alpha-entropy."""
    z = z.double()
    n = z.shape[-1]
    p = oracle(z, alpha)
    y = torch.full_like(z, eps / n)
    keep = target != ignore_index
    y[torch.arange(len(target)), target.clamp(min=0)] += 1 - eps

    def tsallis(q):
        return (1 - (q ** alpha).sum(-1)) / (alpha * (alpha - 1))

    return torch.where(keep, ((p - y) * z).sum(-1) + tsallis(p) - tsallis(y), 0.0)


@pytest.mark.parametrize("alpha", [1.25, 1.5, 2.0])
@pytest.mark.parametrize("n,eps,chunked", [(7, 0.0, False), (1000, 0.1, False), (3000, 0.2, True)])
def test_loss_and_gradient_match_oracle(n, eps, chunked, alpha, monkeypatch):
    if chunked:
        monkeypatch.setattr(kr, "SINGLE_MAX_COLS", 512)
        monkeypatch.setattr(kr, "CHUNK_COLS", 1024)
    z = random_rows(4, n, seed=n + 5)
    target = torch.randint(0, n, (4,), generator=torch.Generator().manual_seed(n)).to(DEVICE)
    target[1] = -100
    zk = z.clone().requires_grad_(True)
    loss = kr.fused_entmax_loss(zk, target, alpha, label_smoothing=eps, reduction="none")
    gl = torch.rand(4, device=DEVICE) + 0.5
    (loss * gl).sum().backward()
    zr = z.double().requires_grad_(True)
    ref = oracle_loss(zr, target, alpha, eps)
    (ref * gl.double()).sum().backward()
    assert loss.shape == (4,) and loss[1] == 0 and (zk.grad[1] == 0).all()
    torch.testing.assert_close(loss.double(), ref, atol=5e-6, rtol=1e-5)
    torch.testing.assert_close(zk.grad.double(), zr.grad, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_loss_reduced_gradient_is_scaled_once(reduction):
    """The forward writes p - y and the backward only scales it: reduced losses get the oracle's gradient, a
    second backward through the kept graph gives the same one, and a forward without grad writes none."""
    z = random_rows(5, 300, seed=41)
    target = torch.randint(0, 300, (5,), generator=torch.Generator().manual_seed(41)).to(DEVICE)
    target[3] = -100
    zk = z.clone().requires_grad_(True)
    loss = kr.fused_entmax_loss(zk, target, 1.5, label_smoothing=0.05, reduction=reduction)
    assert loss.shape == ()
    (3.0 * loss).backward(retain_graph=True)
    first = zk.grad.clone()
    zk.grad = None
    (3.0 * loss).backward()
    assert torch.equal(zk.grad, first)
    zr = z.double().requires_grad_(True)
    rows = oracle_loss(zr, target, 1.5, 0.05)
    ref = rows.sum() if reduction == "sum" else rows.sum() / (target != -100).sum()
    (3.0 * ref).backward()
    torch.testing.assert_close(loss.double(), ref, atol=5e-6, rtol=1e-5)
    torch.testing.assert_close(first.double(), zr.grad, atol=2e-6, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(kr.fused_entmax_loss(z, target, 1.5, label_smoothing=0.05, reduction=reduction),
                                   loss.detach())


def test_loss_reductions_and_entmax_package():
    from entmax import entmax_bisect_loss, sparsemax_loss

    z = random_rows(6, 50, seed=31).reshape(2, 3, 50)
    target = torch.tensor([[3, 7, -100], [0, 49, 12]], device=DEVICE)
    rows = kr.fused_entmax_loss(z, target, 1.5, reduction="none")
    assert rows.shape == (2, 3)
    keep = target != -100
    torch.testing.assert_close(kr.fused_entmax_loss(z, target, 1.5, reduction="sum"), rows.sum())
    torch.testing.assert_close(kr.fused_entmax_loss(z, target, 1.5), rows.sum() / keep.sum())
    zk, tk = z.reshape(6, 50)[keep.reshape(-1)], target[keep]
    ref15 = entmax_bisect_loss(zk.double(), tk, alpha=1.5, n_iter=100)
    torch.testing.assert_close(rows[keep].double(), ref15, atol=5e-6, rtol=1e-5)
    ref2 = sparsemax_loss(zk.double(), tk)
    torch.testing.assert_close(kr.fused_entmax_loss(zk, tk, 2.0, reduction="none").double(), ref2,
                               atol=5e-6, rtol=1e-5)


@pytest.mark.parametrize("cols", [50, 40000])  # one program per row, and the chunked kernel
def test_loss_out_of_range_target_gives_nan_in_its_row_only(cols):
    """The fused loss checks targets inside the kernel (no host sync): a target outside [0, C) that is not
    ignore_index makes that row's loss and gradient NaN and leaves the other rows as they are."""
    z = random_rows(4, cols, seed=37)
    good = torch.tensor([3, 7, -100, 12], device=DEVICE)
    bad = good.clone()
    bad[1] = cols  # one past the last class
    bad[3] = -5
    z_good, z_bad = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    loss_good = kr.fused_entmax_loss(z_good, good, 1.5, reduction="none")
    loss_bad = kr.fused_entmax_loss(z_bad, bad, 1.5, reduction="none")
    loss_good.sum().backward()
    loss_bad.nan_to_num().sum().backward()
    assert torch.isnan(loss_bad[[1, 3]]).all() and torch.isnan(z_bad.grad[[1, 3]]).all()
    torch.testing.assert_close(loss_bad[[0, 2]], loss_good[[0, 2]])
    torch.testing.assert_close(z_bad.grad[[0, 2]], z_good.grad[[0, 2]])
    assert torch.isnan(kr.fused_entmax_loss(z, bad, 1.5))  # and so does the mean


@pytest.mark.gpu
def test_gpu_loss_vocabulary_scale():
    z = torch.randn(512, 131072, device="cuda", dtype=torch.bfloat16) * 3
    target = torch.randint(0, 131072, (512,), device="cuda")
    zk = z.clone().requires_grad_(True)
    loss = kr.fused_entmax_loss(zk, target, 1.5, label_smoothing=0.1, reduction="none")
    loss.sum().backward()
    zr = z[:32].double().requires_grad_(True)
    ref = oracle_loss(zr, target[:32], 1.5, 0.1)
    ref.sum().backward()
    torch.testing.assert_close(loss[:32].double(), ref, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(zk.grad[:32].double(), zr.grad, atol=4e-3, rtol=1e-2)
