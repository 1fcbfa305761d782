"""Third-party integrations (imported on demand, so their libraries stay optional).

* `entflash.integrations.transformers`: `attn_implementation="entmax"` for HuggingFace transformers models.
"""
