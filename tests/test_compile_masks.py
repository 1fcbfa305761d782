"""torch.compile(fullgraph=True) of padding and causal masks: MultiheadEntmaxAttention's key_padding_mask / bool
attn_mask, and transformers models registered with `register()` given a padding attention_mask.

Eager calls inspect mask values on the host to pick a path; compiled calls read none (unpadded_entmax_attention for
any key padding, torch.cond on the device for the rest, the dense path's entmax as custom ops). Each compiled
function is compiled once per input structure (a CompileCounter checks it) and then fed several mask patterns,
including batch rows without padding, and its outputs and gradients are compared with eager calls of the same
module. CPU, "torch" backend, aot_eager / eager compilers (the fused kernels' compiled path needs a GPU).
"""
import contextlib
import copy
import os
import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import entflash.nn
from entflash.nn import MultiheadEntmaxAttention, dense_entmax_attention, unpadded_entmax_attention
from entflash.reference import rowwise
from helpers import padding_attention_mask, qwen2_sliding_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager references take the dense path on purpose
        yield
    torch._dynamo.reset()


@pytest.fixture
def dense_calls(monkeypatch):
    """Counts runs of the reference row-wise entmax: the dense path's, eager or compiled (the custom op calls it
    at run time); the structured paths never call it."""
    calls = []
    original = rowwise.entmax

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(rowwise, "entmax", counting)
    return calls


def _compile(function, backend="aot_eager"):
    counter = CompileCounterWithBackend(backend)
    return torch.compile(function, fullgraph=True, backend=counter), counter


def _padding(rows, length):
    """bool (B, length), True = padded, from strings such as "..##" ('#' padded)."""
    assert all(len(row) == length for row in rows)
    return torch.tensor([[c == "#" for c in row] for row in rows])


def _outputs_and_grads(function, inputs, parameters):
    """function(*inputs) -> out; backpropagate a fixed random projection; return (out, grads of the float inputs
    requiring grad, grads of parameters)."""
    for tensor in [*inputs, *parameters]:
        if isinstance(tensor, torch.Tensor):
            tensor.grad = None
    out = function(*inputs)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * weights).sum().backward()
    grads = [t.grad.clone() for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return out.detach(), grads, [p.grad.clone() for p in parameters]


def _assert_same(compiled, eager, inputs, parameters):
    got, expected = (_outputs_and_grads(f, inputs, parameters) for f in (compiled, eager))
    torch.testing.assert_close(got[0], expected[0], **TOLERANCE)
    for grad, want in zip(got[1] + got[2], expected[1] + expected[2]):
        torch.testing.assert_close(grad, want, **TOLERANCE)


def _module(seed, learn_alpha):
    torch.manual_seed(seed)
    alpha = 1.4 if learn_alpha else [1.25, 1.5, 1.75, 2.0]
    return MultiheadEntmaxAttention(16, 4, batch_first=True, alpha=alpha, learn_alpha=learn_alpha)


def test_unpadded_attention_equals_masked_dense_attention():
    """Any padding pattern: keys masked (non-causal, cross-attention), and causal self-attention whose queries are
    the last Nq key positions (query position >= key position, padded query rows zero)."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(4, 4, 7, 8, generator=generator)
    k, v = torch.randn(4, 2, 9, 8, generator=generator), torch.randn(4, 2, 9, 8, generator=generator)
    key_valid = ~_padding([".........", "......###", "###......", ".#..##.#."], 9)
    alpha = torch.tensor([1.2, 1.5, 1.8, 2.0])
    out = unpadded_entmax_attention(q, k, v, key_valid, alpha=alpha, backend="torch")
    expected, _ = dense_entmax_attention(q, k, v, alpha=alpha, keep=key_valid[:, None, None, :])
    torch.testing.assert_close(out, expected, **TOLERANCE)

    query_valid = key_valid[:, 2:]
    out = unpadded_entmax_attention(q, k, v, key_valid, query_valid, alpha=alpha, causal=True, backend="torch")
    positions = torch.arange(9)
    keep = (positions[None, :] <= positions[2:, None])[None] & key_valid[:, None, :] & query_valid[:, :, None]
    expected, _ = dense_entmax_attention(q, k, v, alpha=alpha, keep=keep[:, None])
    torch.testing.assert_close(out, expected, **TOLERANCE)
    assert not out[3, :, 2].any()  # the query at key position 4 is padding: zeros


def test_unpadded_attention_rejects_bad_masks_by_name():
    q, k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    key_valid = torch.ones(2, 7, dtype=torch.bool)
    for bad in (key_valid.long(), key_valid[:, :6], key_valid[:1], "not a tensor"):
        with pytest.raises(ValueError, match="`key_valid` must be a bool tensor of shape \\(2, 7\\)"):
            unpadded_entmax_attention(q, k, v, bad, backend="torch")
    with pytest.raises(ValueError, match="`query_valid` must be a bool tensor of shape \\(2, 5\\)"):
        unpadded_entmax_attention(q, k, v, key_valid, torch.ones(2, 7, dtype=torch.bool), backend="torch")


@pytest.mark.parametrize("learn_alpha", [False, True])
def test_compiled_key_padding_any_pattern_matches_eager(learn_alpha, dense_calls):
    module = _module(1, learn_alpha)

    def attend(query, memory, key_padding_mask):
        return module(query, memory, memory, key_padding_mask=key_padding_mask, need_weights=False)[0]

    compiled, counter = _compile(attend)
    patterns = (["........", "......##", "##......", ".#.##..#"],  # none, right, left, holes
                ["###.....", "........", "########", "..#....."])  # a row of padding only
    generator = torch.Generator().manual_seed(2)
    for rows in patterns:
        query = torch.randn(4, 5, 16, generator=generator).requires_grad_()
        memory = torch.randn(4, 8, 16, generator=generator).requires_grad_()
        _assert_same(compiled, attend, (query, memory, _padding(rows, 8)), list(module.parameters()))
    assert counter.frame_count == 1
    dense_calls.clear()
    compiled(query, memory, _padding(patterns[0], 8))
    assert not dense_calls  # compiled: no dense path for key padding, whatever the pattern


def test_compiled_bool_attn_mask_is_dispatched_on_the_device(dense_calls):
    """One compiled graph: torch's causal mask runs the structured causal path; any other bool mask the exact
    dense path, as in eager; an all-False mask is no mask."""
    module = _module(3, learn_alpha=True)

    def attend(x, attn_mask):
        return module(x, x, x, attn_mask=attn_mask, need_weights=False)[0]

    compiled, counter = _compile(attend)
    future = torch.ones(6, 6, dtype=torch.bool).triu(1)
    generator = torch.Generator().manual_seed(4)
    other = torch.rand(6, 6, generator=generator) > 0.6
    other.fill_diagonal_(False)
    for attn_mask, dense in ((future, False), (other, True), (torch.zeros(6, 6, dtype=torch.bool), False)):
        x = torch.randn(3, 6, 16, generator=generator).requires_grad_()
        dense_calls.clear()
        compiled(x, attn_mask)
        assert bool(dense_calls) == dense
        _assert_same(compiled, attend, (x, attn_mask), list(module.parameters()))
    assert counter.frame_count == 1


def test_compiled_causal_mask_with_key_padding_matches_eager(dense_calls):
    """Causal mask plus key_padding_mask (bool attn_mask or is_causal): eager runs the dense path when there is
    padding (padded query rows still see the real keys before them) and the causal path when there is none;
    the compiled call makes the same choice on the device."""
    module = _module(5, learn_alpha=True)

    def with_mask(x, attn_mask, key_padding_mask):
        return module(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False)[0]

    def with_flag(x, key_padding_mask):
        return module(x, x, x, is_causal=True, key_padding_mask=key_padding_mask, need_weights=False)[0]

    future = torch.ones(6, 6, dtype=torch.bool).triu(1)
    compiled_mask, mask_counter = _compile(with_mask, "eager")
    compiled_flag, flag_counter = _compile(with_flag, "eager")
    generator = torch.Generator().manual_seed(6)
    for rows, dense in ((["......", "......", "......"], False), (["......", "....##", "##.#.."], True)):
        padding = _padding(rows, 6)
        x = torch.randn(3, 6, 16, generator=generator).requires_grad_()
        dense_calls.clear()
        compiled_flag(x, padding)
        assert bool(dense_calls) == dense
        _assert_same(compiled_mask, with_mask, (x, future, padding), list(module.parameters()))
        _assert_same(compiled_flag, with_flag, (x, padding), list(module.parameters()))
    # an all-False attn_mask is no mask: key padding alone, on the structured path
    x = torch.randn(3, 6, 16, generator=generator).requires_grad_()
    _assert_same(compiled_mask, with_mask, (x, torch.zeros(6, 6, dtype=torch.bool), padding),
                 list(module.parameters()))
    assert mask_counter.frame_count == 1 and flag_counter.frame_count == 1


def test_compiled_weights_float_masks_and_dropout_take_the_dense_path():
    module = _module(7, learn_alpha=True)

    def attend(x, attn_mask, key_padding_mask):
        out, weights = module(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask)
        return torch.cat([out, weights], dim=-1)

    compiled, counter = _compile(attend, "eager")
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(2, 5, 16, generator=generator).requires_grad_()
    attn_mask = torch.randn(5, 5, generator=generator)
    _assert_same(compiled, attend, (x, attn_mask, _padding(["...##", "#...."], 5)), list(module.parameters()))
    assert counter.frame_count == 1

    module.dropout, module.training = 0.5, True
    torch.manual_seed(9)
    out = torch.compile(lambda x: module(x, x, x, need_weights=False)[0], fullgraph=True, backend="eager")(x)
    torch.manual_seed(9)
    torch.testing.assert_close(out, module(x, x, x, need_weights=False)[0], **TOLERANCE)


def test_dense_entmax_ops_pass_opcheck():
    generator = torch.Generator().manual_seed(10)
    rows = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    rows[1, 2:] = float("-inf")
    rows[2] = float("-inf")
    alpha_rows = (1.1 + 0.9 * torch.rand(6, 1, generator=generator, dtype=torch.float64)).requires_grad_()
    torch.library.opcheck(entflash.nn.dense_entmax_forward_op, (rows.requires_grad_(), alpha_rows, 0.0))
    torch.library.opcheck(entflash.nn.dense_entmax_forward_op, (rows, None, 1.5))
    p = entflash.nn.dense_entmax_forward_op(rows.detach(), None, 1.5)
    torch.library.opcheck(entflash.nn.dense_entmax_backward_op, (torch.randn_like(p), p, alpha_rows.detach(), 0.0,
                                                                 True))


# ---------------------------------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------------------------------

VOCAB = 64


@pytest.fixture
def transformers():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("transformers.masking_utils")
    from entflash.integrations.transformers import register
    register("entmax", alpha=1.5)
    return transformers


@contextlib.contextmanager
def _no_host_reading_paths():
    """While compiling, the eager paths that read mask values on the host must not run."""
    import entflash.integrations.transformers as integration

    def refuse(*args, **kwargs):
        raise AssertionError("an eager host-reading path ran while compiling")

    with pytest.MonkeyPatch.context() as patch:
        for name in ("_is_prefix", "_is_contiguous"):
            patch.setattr(integration, name, refuse)
        for name in ("unpadded", "packed"):
            patch.setattr(integration._Call, name, refuse)
        yield


def _compiled_model_call(model, backend="aot_eager"):
    """(call, counter): model compiled with fullgraph=True, run with the host-reading paths refused."""
    compiled, counter = _compile(model, backend)

    def call(*args, **kwargs):
        with _no_host_reading_paths():
            return compiled(*args, **kwargs)

    return call, counter


def _llama(transformers):
    torch.manual_seed(11)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config)
    model.set_attn_implementation("entmax")
    return model


def _grads(model):
    """Parameter gradients, zeros where none arrived (a compiled backward may give zeros instead of None)."""
    return {name: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for name, p in model.named_parameters()}


def test_compiled_llama_with_padding_trains_like_eager(transformers):
    eager = _llama(transformers)
    compiled_model = copy.deepcopy(eager)
    compiled, counter = _compiled_model_call(compiled_model)
    ids = torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(12))
    for left in (False, True):
        mask = padding_attention_mask([10, 7, 3], 10, left)
        labels = ids.masked_fill(mask == 0, -100)
        results = []
        for model, run in ((compiled_model, compiled), (eager, eager)):
            model.zero_grad()
            out = run(input_ids=ids, attention_mask=mask, labels=labels)
            out.loss.backward()
            results.append((out.logits.detach(), _grads(model)))
        (logits, grads), (expected_logits, expected_grads) = results
        torch.testing.assert_close(logits, expected_logits, **TOLERANCE)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    assert counter.frame_count == 1


def test_compiled_llama_without_cache_or_mask_matches_eager(transformers):
    """use_cache=False and no attention_mask: under tracing transformers cannot tell packed from unpacked position_ids,
    so its mask function is always the packed closure, which runs the exact dense path; packed or not, the results
    are eager's."""
    model = _llama(transformers).eval()
    compiled, counter = _compiled_model_call(model, "eager")
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(19))
    with torch.no_grad():
        for position_ids in (None, torch.cat([torch.arange(4), torch.arange(6)])[None].expand(2, -1)):
            inputs = dict(input_ids=ids, use_cache=False, position_ids=position_ids)
            torch.testing.assert_close(compiled(**inputs).logits, model(**inputs).logits, **TOLERANCE)
    assert counter.frame_count == 2  # position_ids None, then a tensor


def test_compiled_decoding_step_with_left_padded_cache_matches_eager(transformers):
    """generate()-style: an eager prefill, then one compiled single-query step against the (dynamic) KV cache."""
    model = _llama(transformers).eval()
    ids = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(13))
    mask = padding_attention_mask([9, 6, 2], 9, left=True)

    def step(token, attention_mask, cache):
        return model(input_ids=token, attention_mask=attention_mask, past_key_values=cache).logits

    compiled, counter = _compiled_model_call(step, "eager")
    with torch.no_grad():
        cache = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True).past_key_values
        _check_last_step(model, step, compiled, ids, mask, cache)
    assert counter.frame_count == 1


def _check_last_step(model, step, compiled, ids, mask, cache):
    """The compiled step(last token, mask, cache) equals the eager step on a copy of the prefilled cache and the
    last position of a full recomputation; returns (cache, eager_cache) after the step."""
    eager_cache = copy.deepcopy(cache)
    got = compiled(ids[:, -1:], mask, cache)
    expected = step(ids[:, -1:], mask, eager_cache)
    full = model(input_ids=ids, attention_mask=mask).logits[:, -1:]
    torch.testing.assert_close(got, expected, **TOLERANCE)
    torch.testing.assert_close(got, full, **TOLERANCE)
    return cache, eager_cache


def test_compiled_bert_with_padding_matches_eager(transformers):
    torch.manual_seed(14)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64,
                                     attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    model = transformers.BertModel(config).eval()
    model.set_attn_implementation("entmax")
    compiled, counter = _compiled_model_call(model)
    ids = torch.randint(0, VOCAB, (3, 8), generator=torch.Generator().manual_seed(15))
    for left in (False, True):
        mask = padding_attention_mask([8, 5, 2], 8, left)
        results = []
        for run in (compiled, model):
            model.zero_grad()
            hidden = run(input_ids=ids, attention_mask=mask).last_hidden_state
            (hidden * mask[..., None]).square().sum().backward()
            results.append((hidden.detach(), _grads(model)))
        (hidden, grads), (expected_hidden, expected_grads) = results
        torch.testing.assert_close(hidden, expected_hidden, **TOLERANCE)  # padded query rows too
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    assert counter.frame_count == 1


def test_compiled_sliding_window_model_with_padding_matches_eager_at_real_tokens(transformers):
    """Sliding-window layers: their mask function is a closure torch.compile cannot read, so transformers' dense
    mask is materialized and runs the exact dense path (padded query positions then attend to the real keys they
    may see, as in transformers' own dense masks, where eager returns zeros); the full-attention layers take the
    padding path. Left and right padding, and holes."""
    torch.manual_seed(16)
    model = qwen2_sliding_model(transformers, VOCAB, sliding_window=3)
    compiled, counter = _compiled_model_call(model, "eager")
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(17))
    holes = torch.tensor([[1] * 9, [1, 1, 0, 1, 1, 0, 1, 1, 1]])
    with torch.no_grad():
        padded = [padding_attention_mask([9, 5], 9, left=left) for left in (True, False)]
        for mask in (*padded, holes):
            got = compiled(input_ids=ids, attention_mask=mask).logits
            expected = model(input_ids=ids, attention_mask=mask).logits
            real = mask.bool()
            torch.testing.assert_close(got[real], expected[real], **TOLERANCE)
    assert counter.frame_count == 1


def test_compiled_sliding_window_padding_dispatch_on_the_device(dense_calls):
    """The attention function given a key-padding mask and a causal sliding window (the layer's) runs the padding
    path when each row's real tokens are contiguous, else the exact dense path; torch.cond decides on the device."""
    from entflash.integrations.transformers import make_attention_function

    layer = torch.nn.Module()
    layer.is_causal, layer.sliding_window = True, 3
    attention = make_attention_function(alpha=1.5, backend="torch")

    def attend(q, k, v, key_valid):
        return attention(layer, q, k, v, key_valid)[0]

    compiled, counter = _compile(attend, "eager")
    generator = torch.Generator().manual_seed(18)
    for rows, dense in ((["........", "###....."], False), (["........", ".....###"], False),
                        (["........", ".#..#..."], True)):
        q = torch.randn(2, 4, 8, 8, generator=generator).requires_grad_()
        k, v = (torch.randn(2, 2, 8, 8, generator=generator).requires_grad_() for _ in range(2))
        key_valid = ~_padding(rows, 8)
        dense_calls.clear()
        with _no_host_reading_paths():
            compiled(q, k, v, key_valid)
        assert bool(dense_calls) == dense
        _assert_same(lambda *a: _no_host(compiled, *a), attend, (q, k, v, key_valid), [])
    assert counter.frame_count == 1


def _no_host(function, *args):
    with _no_host_reading_paths():
        return function(*args)


def _static_cache(transformers, model, max_cache_len):
    return transformers.StaticCache(config=model.config, max_cache_len=max_cache_len)


def test_compiled_static_cache_decoding_step_matches_eager(transformers):
    """A static cache gives a tensor query offset; the compiled mask keeps the cache's full length (a fixed shape)
    and marks on the device which slots are written and which hold the queries. One compiled single-query step
    against a static cache, without and with left padding (one graph), against the eager step and the full
    recomputation."""
    model = _llama(transformers).eval()
    ids = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(20))

    def step(token, attention_mask, cache):
        return model(input_ids=token, attention_mask=attention_mask, past_key_values=cache).logits

    compiled, counter = _compiled_model_call(step, "aot_eager")
    with torch.no_grad():
        for mask in (padding_attention_mask([9, 9, 9], 9, left=True), padding_attention_mask([9, 6, 2], 9, left=True)):
            cache = _static_cache(transformers, model, 16)
            model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], past_key_values=cache)
            cache, eager_cache = _check_last_step(model, step, compiled, ids, mask, cache)
            torch.testing.assert_close(cache.layers[0].keys, eager_cache.layers[0].keys, **TOLERANCE)
    assert counter.frame_count == 1


def test_compiled_static_cache_chunked_prefill_matches_eager(transformers, dense_calls):
    """Several queries into a partly filled static cache: query slots q_offset.. are neither the first nor the last
    slots. Left padding that reaches into the chunk, right padding (padded queries) and holes: outputs equal eager's
    at every position (padded query rows are zeros in both), on the structured path (no dense entmax), one graph."""
    model = _llama(transformers).eval()
    ids = torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(21))

    def chunk(tokens, attention_mask, cache):
        return model(input_ids=tokens, attention_mask=attention_mask, past_key_values=cache).logits

    compiled, counter = _compiled_model_call(chunk, "eager")
    holes = torch.tensor([[1] * 10, [1, 0, 1, 1, 0, 1, 1, 0, 1, 1], [0, 1, 1, 0, 1, 1, 1, 1, 0, 1]])
    with torch.no_grad():
        padded = [padding_attention_mask([10, 7, 4], 10, left=left) for left in (True, False)]
        for mask in (*padded, holes):
            cache = _static_cache(transformers, model, 16)
            model(input_ids=ids[:, :5], attention_mask=mask[:, :5], past_key_values=cache)
            eager_cache = copy.deepcopy(cache)
            dense_calls.clear()
            got = compiled(ids[:, 5:], mask, cache)
            assert not dense_calls
            expected = chunk(ids[:, 5:], mask, eager_cache)
            full = model(input_ids=ids, attention_mask=mask).logits[:, 5:]
            torch.testing.assert_close(got, expected, **TOLERANCE)
            real = mask[:, 5:].bool()
            torch.testing.assert_close(got[real], full[real], **TOLERANCE)
    assert counter.frame_count == 1


def test_compiled_generate_with_static_cache_matches_eager(transformers):
    """model.generate(cache_implementation="static") with transformers' own compilation of the decoding steps
    (CompileConfig, fullgraph=True; forced on the CPU): the tokens of eager generate, left padding included."""
    model = _llama(transformers).eval()
    compiled_graphs = []

    def backend(graph_module, example_inputs):  # a function: CompileConfig deep-copies its backend
        compiled_graphs.append(graph_module)
        return graph_module.forward

    compile_config = transformers.CompileConfig(fullgraph=True, backend=backend, mode=None)
    compile_config._compile_all_devices = True  # transformers' switch for compiling generate() off the GPU
    prompt = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(22))
    options = dict(attention_mask=padding_attention_mask([6, 3], 6, left=True), max_new_tokens=4, do_sample=False,
                   pad_token_id=0, eos_token_id=None, cache_implementation="static")
    with torch.no_grad():
        eager = model.generate(prompt, disable_compile=True, **options)
        compiled = model.generate(prompt, compile_config=compile_config, **options)  # (the prefill runs eagerly)
    assert compiled_graphs  # the decoding steps did run compiled
    assert compiled.tolist() == eager.tolist()


def test_compiled_static_cache_mask_with_window_and_asentmax_matches_eager(dense_calls):
    """entmax_mask and the attention function on their own: a tensor q_offset under compile gives the (B, 2, Nk)
    static-cache form, eager calls the keys cut to the written length. A causal layer with a sliding window runs the
    padding path when the real tokens are contiguous and the dense path otherwise (torch.cond); ASEntmax positions
    without position_ids are the query slots. Outputs and gradients (q, k, v, alpha, ASEntmax) against eager."""
    pytest.importorskip("transformers.masking_utils")
    from entflash.integrations.transformers import entmax_mask, make_attention_function

    layer = torch.nn.Module()
    layer.is_causal, layer.sliding_window = True, 3
    layer.entflash = entflash.nn.EntmaxAttention(4, [1.3, 1.5, 1.7, 1.9], asentmax="head", asentmax_init=(1.0, 1.5))
    attention = make_attention_function(alpha=1.5, backend="torch")
    num_keys, num_queries = 12, 3

    def attend(q, k, v, padding, q_offset):
        mask = entmax_mask(batch_size=2, q_length=num_queries, kv_length=num_keys, q_offset=q_offset,
                           attention_mask=padding)
        return attention(layer, q, k, v, mask)[0]

    compiled, counter = _compile(attend, "eager")
    generator = torch.Generator().manual_seed(23)
    for rows, offset, dense in ((["........", "###....."], 5, False), (["........", ".....#.."], 3, False),
                                (["........", ".#..#..."], 5, True)):
        padding = ~_padding(rows, len(rows[0]))
        q = torch.randn(2, 4, num_queries, 8, generator=generator).requires_grad_()
        k, v = (torch.randn(2, 2, num_keys, 8, generator=generator).requires_grad_() for _ in range(2))
        q_offset = torch.tensor(offset)
        dense_calls.clear()
        _no_host(compiled, q, k, v, padding, q_offset)
        assert bool(dense_calls) == dense
        _assert_same(lambda *a: _no_host(compiled, *a), attend, (q, k, v, padding, q_offset),
                     list(layer.entflash.parameters()))
    assert counter.frame_count == 1
    with pytest.raises(Exception, match="`kv_offset` must be a python int under torch.compile"):
        torch.compile(lambda offset: entmax_mask(batch_size=1, q_length=1, kv_length=8, kv_offset=offset),
                      fullgraph=True, backend="eager")(torch.tensor(0))


@pytest.mark.gpu
def test_gpu_inductor_compiles_key_padding_on_the_fused_path():
    """On CUDA the compiled key-padding path runs the fused kernels (backend "auto"); inductor, fullgraph, outputs
    and gradients against eager calls of the same module, for several padding patterns."""
    torch.manual_seed(31)
    module = MultiheadEntmaxAttention(64, 4, batch_first=True, alpha=1.5).cuda()

    def attend(query, memory, key_padding_mask):
        return module(query, memory, memory, key_padding_mask=key_padding_mask, need_weights=False)[0]

    compiled = torch.compile(attend, fullgraph=True)
    length = 200
    for pad_right, pad_left in ((0, 0), (37, 0), (0, 90)):
        padding = torch.zeros(3, length, dtype=torch.bool, device="cuda")
        padding[1, length - pad_right:] = True
        padding[2, :pad_left] = True
        padding[0, 5:17] = True  # holes
        query = torch.randn(3, 150, 64, device="cuda", requires_grad=True)
        memory = torch.randn(3, length, 64, device="cuda", requires_grad=True)
        weights = torch.randn(3, 150, 64, device="cuda")
        results = []
        for function in (compiled, attend):
            query.grad = memory.grad = None
            out = function(query, memory, padding)
            (out * weights).sum().backward()
            assert torch.isfinite(out).all()
            results.append((out.detach(), query.grad.clone(), memory.grad.clone()))
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
