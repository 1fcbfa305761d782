"""torch.compile(fullgraph=True) through entflash: custom ops with fake and autograd registrations, no graph breaks.

CPU runs the "torch" backend (and the fused "triton" backend under TRITON_INTERPRET=1) with the aot_eager compiler
(fast), plus one small case with the default inductor compiler when a C++ compiler is present; the GPU variant
compiles the fused path with inductor.
"""
import copy

import pytest
import torch

import entflash
import entflash.nn
from entflash import entmax_attention
from entflash.reference.attention import torch_attention_backward_op, torch_attention_forward_op

AOT_EAGER = "aot_eager"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch and leaves no compiled code behind for other test files."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _qkv(seed, batch, q_heads, kv_heads, num_queries, num_keys, head_dim, device="cpu", dtype=torch.float32):
    """Fresh random q (B, Hq, Nq, D), k, v (B, Hkv, Nk, D) leaves requiring grad."""
    generator = torch.Generator().manual_seed(seed)
    shapes = ((batch, q_heads, num_queries, head_dim), (batch, kv_heads, num_keys, head_dim),
              (batch, kv_heads, num_keys, head_dim))
    return [torch.randn(shape, generator=generator).mul(1.5).to(device=device, dtype=dtype).requires_grad_()
            for shape in shapes]


def _random_alpha(seed, heads, device="cpu"):
    """A (heads,) float32 alpha in (1.1, 1.9) requiring grad."""
    generator = torch.Generator().manual_seed(seed)
    return (1.1 + 0.8 * torch.rand(heads, generator=generator)).to(device).requires_grad_()


def _forward_and_grads(function, leaves, *extra):
    """Run function(*leaves, *extra), backpropagate a random projection of its output; return (out, grads)."""
    for leaf in leaves:
        leaf.grad = None
    out = function(*leaves, *extra)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(99)).to(out.device, out.dtype)
    (out * weights).sum().backward()
    return out.detach(), [leaf.grad.clone() for leaf in leaves]


def _assert_no_graph_breaks(function, *args):
    explanation = torch._dynamo.explain(function)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def _causal_gqa(q, k, v, alpha):
    return entmax_attention(q, k, v, alpha=alpha, causal=True, backend="torch")


def test_compiled_causal_gqa_learnable_alpha_matches_eager():
    leaves = [*_qkv(1, 2, 4, 2, 20, 20, 8), _random_alpha(2, 4)]
    compiled = torch.compile(_causal_gqa, fullgraph=True, backend=AOT_EAGER)
    out, grads = _forward_and_grads(compiled, leaves)
    expected_out, expected_grads = _forward_and_grads(_causal_gqa, leaves)
    torch.testing.assert_close(out, expected_out, rtol=1e-6, atol=1e-6)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)
    assert grads[3].abs().sum() > 0  # alpha really receives a gradient
    _assert_no_graph_breaks(_causal_gqa, *leaves)


def test_compiled_seqlens_window_and_aux_match_eager():

    def attention(q, k, v, seqlens_q, seqlens_k):
        out, aux = entmax_attention(q, k, v, alpha=1.5, window=(5, 1), seqlens=(seqlens_q, seqlens_k),
                                    return_aux=True, backend="torch")
        return out, aux["tau"], aux["support"]

    q, k, v = _qkv(3, 3, 2, 1, 12, 17, 8)
    seqlens_q, seqlens_k = torch.tensor([12, 4, 0]), torch.tensor([17, 9, 5])
    compiled = torch.compile(attention, fullgraph=True, backend=AOT_EAGER)
    results = compiled(q, k, v, seqlens_q, seqlens_k)
    expected = attention(q, k, v, seqlens_q, seqlens_k)
    for got, want in zip(results, expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not results[1].requires_grad and torch.isinf(results[1][2]).all()  # padded rows: tau = +inf
    _assert_no_graph_breaks(attention, q, k, v, seqlens_q, seqlens_k)

    # one (B,) tensor for queries and keys alike, and gradients through the compiled call
    def shared_lengths(q, k, v, lengths):
        return entmax_attention(q, k, v, alpha=1.7, causal=True, seqlens=lengths, backend="torch")

    q, k, v = _qkv(4, 2, 2, 2, 10, 10, 8)
    lengths = torch.tensor([10, 6])
    compiled_shared = torch.compile(shared_lengths, fullgraph=True, backend=AOT_EAGER)
    out, grads = _forward_and_grads(compiled_shared, [q, k, v], lengths)
    expected_out, expected_grads = _forward_and_grads(shared_lengths, [q, k, v], lengths)
    torch.testing.assert_close(out, expected_out, rtol=1e-6, atol=1e-6)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


class _TinyAttentionBlock(torch.nn.Module):
    """Projections around entflash.nn.EntmaxAttention (learnable alpha, ASEntmax per head, GQA)."""

    def __init__(self, width=16, q_heads=4, kv_heads=2, backend="torch"):
        super().__init__()
        self.q_heads, self.kv_heads, self.head_dim = q_heads, kv_heads, width // q_heads
        self.query = torch.nn.Linear(width, q_heads * self.head_dim)
        self.key_value = torch.nn.Linear(width, 2 * kv_heads * self.head_dim)
        self.attention = entflash.nn.EntmaxAttention(q_heads, alpha=[1.3, 1.5, 1.6, 1.8], asentmax="head",
                                                     backend=backend)

    def forward(self, x):
        batch, length, _ = x.shape
        q = self.query(x).view(batch, length, self.q_heads, self.head_dim).transpose(1, 2)
        k, v = self.key_value(x).view(batch, length, 2, self.kv_heads, self.head_dim).unbind(2)
        out = self.attention(q, k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return out.transpose(1, 2).reshape(batch, length, -1)


def _training_step(model, inputs, targets):
    """One SGD step on the mean squared error; returns the loss (detached)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = torch.nn.functional.mse_loss(model(inputs), targets)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


def test_compiled_entmax_attention_module_training_step_matches_eager():
    torch.manual_seed(5)
    eager = _TinyAttentionBlock()
    compiled_model = copy.deepcopy(eager)
    compiled_model.compile(fullgraph=True, backend=AOT_EAGER)
    inputs, targets = torch.randn(2, 12, 16), torch.randn(2, 12, 16)
    for _ in range(2):
        loss = _training_step(compiled_model, inputs, targets)
        expected = _training_step(eager, inputs, targets)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for (name, parameter), (_, expected) in zip(compiled_model.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(parameter, expected, rtol=1e-4, atol=1e-6, msg=name)
    initial_logits = torch.logit(torch.tensor([0.3, 0.5, 0.6, 0.8]))
    assert not torch.allclose(compiled_model.attention.head_alpha.alpha_logit, initial_logits)  # alpha learned
    _assert_no_graph_breaks(eager, inputs)


def test_compiled_varlen_matches_eager():

    def packed_attention(q, k, v, cu_seqlens_q, cu_seqlens_k):
        return entflash.entmax_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, 6, 7, alpha=1.4, causal=True,
                                                backend="torch")

    generator = torch.Generator().manual_seed(17)
    leaves = [torch.randn(total, heads, 8, generator=generator).requires_grad_()
              for total, heads in ((10, 2), (12, 1), (12, 1))]
    cu_seqlens_q, cu_seqlens_k = torch.tensor([0, 4, 10]), torch.tensor([0, 5, 12])
    compiled = torch.compile(packed_attention, fullgraph=True, backend=AOT_EAGER)
    out, grads = _forward_and_grads(compiled, leaves, cu_seqlens_q, cu_seqlens_k)
    expected_out, expected_grads = _forward_and_grads(packed_attention, leaves, cu_seqlens_q, cu_seqlens_k)
    torch.testing.assert_close(out, expected_out, rtol=1e-6, atol=1e-6)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


def test_compiled_transformers_llama_with_entmax_attention_trains_like_eager():
    """torch.compile(model, fullgraph=True) on a tiny Llama switched to attn_implementation="entmax" (padding masks:
    tests/test_compile_masks.py)."""
    transformers = pytest.importorskip("transformers")
    from entflash.integrations.transformers import register

    register("entmax", alpha=1.5)
    torch.manual_seed(18)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    eager = transformers.LlamaForCausalLM(config)
    eager.set_attn_implementation("entmax")
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=AOT_EAGER)
    tokens = torch.randint(0, 64, (2, 12))
    losses = []
    for model in (compiled, eager):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for (name, parameter), (_, expected) in zip(compiled_model.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(parameter.grad, expected.grad, rtol=1e-4, atol=1e-6, msg=name)


def _has_cpp_compiler() -> bool:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        get_cpp_compiler()
    except Exception:  # noqa: BLE001 - any failure means inductor cannot build CPU code here
        return False
    return True


@pytest.mark.skipif(not _has_cpp_compiler(), reason="inductor needs a C++ compiler on CPU")
def test_inductor_compiles_the_torch_backend():
    leaves = [*_qkv(6, 1, 2, 1, 9, 9, 8), _random_alpha(7, 2)]
    compiled = torch.compile(_causal_gqa, fullgraph=True)
    out, grads = _forward_and_grads(compiled, leaves)
    expected_out, expected_grads = _forward_and_grads(_causal_gqa, leaves)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-6)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)


def test_torch_backend_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementations and autograd registration checked by torch.library.opcheck."""
    q, k, v = (t.detach().double().requires_grad_() for t in _qkv(8, 2, 2, 1, 7, 9, 4))
    alpha = _random_alpha(9, 2).detach().double().requires_grad_()
    lengths_q, lengths_k = torch.tensor([7, 3], dtype=torch.int32), torch.tensor([9, 2], dtype=torch.int32)
    forward_args = (q, k, v, alpha, 0.0, True, 0.5, 3, -1, lengths_q, lengths_k, 0)
    torch.library.opcheck(torch_attention_forward_op, forward_args)
    torch.library.opcheck(torch_attention_forward_op, (q, k, v, None, 1.5, False, 0.5, -1, -1, None, None, 4))
    out, tau, _ = torch_attention_forward_op(*forward_args)
    grad_out = torch.randn_like(out)
    backward_args = (grad_out, q.detach(), k.detach(), v.detach(), tau.detach(), alpha.detach(), 0.0, True, 0.5, 3, -1,
                     lengths_q, lengths_k, 0, True, False, True, True)
    torch.library.opcheck(torch_attention_backward_op, backward_args)


def _fused_causal_gqa(q, k, v, alpha):
    return entmax_attention(q, k, v, alpha=alpha, causal=True, backend="triton")


def _check_fused_compiles(device, compiler, shape, tolerance):
    """Compile the fused backend (causal, GQA, learnable per-head alpha, seqlens) and compare with eager."""
    leaves = [*_qkv(10, *shape, device=device), _random_alpha(11, shape[1], device=device)]
    compiled = torch.compile(_fused_causal_gqa, fullgraph=True, backend=compiler)
    out, grads = _forward_and_grads(compiled, leaves)
    expected_out, expected_grads = _forward_and_grads(_fused_causal_gqa, leaves)
    torch.testing.assert_close(out, expected_out, rtol=tolerance, atol=tolerance)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected, rtol=tolerance, atol=tolerance)
    assert grads[3].abs().sum() > 0

    def padded(q, k, v, lengths):
        out, aux = entmax_attention(q, k, v, alpha=1.5, causal=True, seqlens=lengths, return_aux=True,
                                    backend="triton")
        return out, aux["tau"], aux["support"], aux["tile_map"]

    q, k, v = (leaf.detach() for leaf in leaves[:3])
    lengths = torch.tensor([shape[3], shape[3] // 2], device=device)
    compiled_padded = torch.compile(padded, fullgraph=True, backend=compiler)
    for got, want in zip(compiled_padded(q, k, v, lengths), padded(q, k, v, lengths)):
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)


def test_compiled_fused_backend_under_the_interpreter_matches_eager():
    """The fused path's custom ops on CPU through TRITON_INTERPRET=1 (set by conftest without CUDA)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _check_fused_compiles(device, AOT_EAGER, (2, 4, 2, 24, 24, 16), 1e-6)
    _assert_no_graph_breaks(_fused_causal_gqa, *_qkv(12, 1, 2, 1, 8, 8, 16, device=device),
                            _random_alpha(13, 2, device=device))


@pytest.mark.gpu
def test_gpu_inductor_compiles_the_fused_backend():
    _check_fused_compiles("cuda", "inductor", (2, 8, 2, 1024, 1024, 64), 1e-5)


def test_fused_backend_custom_ops_pass_opcheck():
    """opcheck of entflash::triton_attention_forward / _backward (interpreter on CPU)."""
    from entflash.autograd import triton_attention_backward_op, triton_attention_forward_op

    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = _qkv(14, 2, 2, 1, 7, 9, 16, device=device)
    alpha = _random_alpha(15, 2, device=device)
    lengths_q = torch.tensor([7, 3], dtype=torch.int32, device=device)
    lengths_k = torch.tensor([9, 2], dtype=torch.int32, device=device)
    forward_args = (q, k, v, alpha, 0.0, True, 0.5, 3, -1, lengths_q, lengths_k, True)
    torch.library.opcheck(triton_attention_forward_op, forward_args)
    detached = [t.detach() for t in (q, k, v)]
    torch.library.opcheck(triton_attention_forward_op, (*detached, None, 1.5, False, 0.5, -1, -1, None, None, False))
    _, tau, _, tile_map, o2, s = triton_attention_forward_op(*forward_args)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(16)).to(device)
    backward_args = (grad_out, *detached, tau.detach(), tile_map, o2.detach(), s.detach(), alpha.detach(), 0.0,
                     True, 0.5, 3, -1, lengths_q, lengths_k, True, False, True, True)
    torch.library.opcheck(triton_attention_backward_op, backward_args)


def test_eager_autograd_function_matches_the_custom_op():
    """Eager calls take EagerTritonAttention instead of the custom op: same outputs and gradients, bit for bit,
    and only the output is differentiable (no zero-filled O2 / S gradients)."""
    from entflash.autograd import EagerTritonAttention, triton_attention_forward_op

    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = _qkv(17, 2, 4, 2, 70, 90, 16, device=device)
    alpha = _random_alpha(18, 4, device=device)
    lengths_k = torch.tensor([90, 40], dtype=torch.int32, device=device)
    args = (q, k, v, alpha, 0.0, True, 0.3, -1, 20, None, lengths_k, True, True)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(19)).to(device)
    results = []
    for forward in (triton_attention_forward_op, EagerTritonAttention.apply):
        outputs = forward(*args)
        assert [t.requires_grad for t in outputs] == [True] + [False] * 5
        results.append((outputs, torch.autograd.grad(outputs[0], (q, k, v, alpha), grad_out)))
    (op_out, op_grads), (eager_out, eager_grads) = results
    for a, b in zip(op_out + op_grads, eager_out + eager_grads):
        assert torch.equal(a, b)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in eager_grads)
    for forward in (triton_attention_forward_op, EagerTritonAttention.apply):  # no second derivative, loudly
        grad_q, = torch.autograd.grad(forward(*args)[0], q, grad_out, create_graph=True)
        assert grad_q.requires_grad  # part of the graph, not a silent constant ...
        with pytest.raises(RuntimeError):  # ... whose derivative raises
            torch.autograd.grad(grad_q.sum() + alpha.sum(), (q, alpha))


def test_eager_calls_do_not_dispatch_through_the_custom_ops(monkeypatch):
    """Eager forward+backward through entmax_attention(backend="triton") never calls the custom ops (their
    dispatch is the host time EagerTritonAttention removes); torch.compile still does (the tests above)."""
    import entflash.autograd as fused

    def refuse(*args, **kwargs):
        raise AssertionError("an eager call went through a custom op")

    monkeypatch.setattr(fused, "triton_attention_forward_op", refuse)
    monkeypatch.setattr(fused, "triton_attention_backward_op", refuse)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = _qkv(20, 1, 2, 1, 33, 40, 16, device=device)
    out = entmax_attention(q, k, v, alpha=1.5, causal=True, backend="triton")
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert all(torch.isfinite(g).all() for g in grads)


def test_dynamic_compile_with_a_symbolic_scale_matches_eager():
    """torch.compile(dynamic=True) may trace a float `scale` symbolically: its value check is skipped while
    tracing (as for tensor values) and each call still uses its own scale."""
    def attend(q, k, v, scale):
        return entflash.entmax_attention(q, k, v, alpha=1.5, causal=True, scale=scale, backend="torch")

    compiled = torch.compile(attend, fullgraph=True, dynamic=True, backend="aot_eager")
    generator = torch.Generator().manual_seed(41)
    q, k, v = (torch.randn(1, 2, 12, 8, generator=generator) for _ in range(3))
    for scale in (0.3, 0.7):
        torch.testing.assert_close(compiled(q, k, v, scale), attend(q, k, v, scale), rtol=1e-5, atol=1e-6)
