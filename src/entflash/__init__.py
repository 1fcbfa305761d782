"""entflash: fast, differentiable alpha-entmax attention (public API re-exports only)."""
from entflash._version import __version__
from entflash.api import entmax_attention, entmax_attention_varlen

__all__ = ["__version__", "entmax_attention", "entmax_attention_varlen"]
