"""entflash: fast, differentiable alpha-entmax attention (public API re-exports only)."""
from entflash._version import __version__
from entflash.api import entmax_attention, entmax_attention_varlen
from entflash.decoding import entmax_attention_with_kvcache
from entflash.losses import entmax_loss, sparsemax_loss
from entflash.rowwise import entmax, entmax15, sparsemax

__all__ = ["__version__", "entmax_attention", "entmax_attention_varlen", "entmax_attention_with_kvcache",
           "entmax", "entmax15", "sparsemax",
           "entmax_loss", "sparsemax_loss"]
