"""Downstream recipes for entflash: `python -m recipes.length_generalization` (see recipes/README.md)."""
