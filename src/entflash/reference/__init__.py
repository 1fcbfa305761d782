"""Exact PyTorch references: the ground truth every kernel is tested against."""
