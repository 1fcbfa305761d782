"""Plain helpers shared by test modules (tests/ is on sys.path under pytest's default import mode)."""
import torch


def padding_attention_mask(lengths, total, left):
    """transformers-style attention_mask (B, total) int64: 1 on each row's `lengths[b]` real tokens, placed at the
    end of the row (left padding) or at its start (right padding), 0 elsewhere."""
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, length in enumerate(lengths):
        if left:
            mask[row, total - length:] = 1
        else:
            mask[row, :length] = 1
    return mask


def qwen2_sliding_model(transformers, vocab_size, sliding_window):
    """A tiny Qwen2ForCausalLM (eval mode) whose first layer uses sliding-window attention and second full
    attention, set to attn_implementation="entmax" (register it first). `transformers` is the imported module;
    the caller seeds torch for the weights."""
    config = transformers.Qwen2Config(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_sliding_window=True, sliding_window=sliding_window,
        max_window_layers=0, layer_types=["sliding_attention", "full_attention"])
    model = transformers.Qwen2ForCausalLM(config).eval()
    model.set_attn_implementation("entmax")
    return model
