"""entflash: fast, differentiable alpha-entmax attention."""
from entflash._version import __version__
