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
