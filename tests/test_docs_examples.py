"""Execute every ```python block of docs/integrations.md, so the documented examples cannot rot."""
import os
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def _blocks():
    return BLOCK.findall(DOC.read_text(encoding="utf-8"))


def test_the_document_has_examples():
    assert len(_blocks()) >= 3


@pytest.mark.parametrize("index", range(len(_blocks())))
def test_example_runs(index, monkeypatch):
    source = _blocks()[index]
    if "transformers" in source:
        pytest.importorskip("transformers")
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    exec(compile(source, f"{DOC.name}[block {index}]", "exec"), {"__name__": f"docs_example_{index}"})
