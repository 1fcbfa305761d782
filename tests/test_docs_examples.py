"""Execute every ```python block of the documents below, so the documented examples cannot rot."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ["README.md", "docs/integrations.md"]
FENCE = "```"


def _blocks(document: str):
    """The python code blocks of `document` (a path relative to the repository root), in order."""
    blocks, current = [], None
    for line in (ROOT / document).read_text(encoding="utf-8").splitlines():
        if current is None and line.strip() == FENCE + "python":
            current = []
        elif current is not None and line.strip() == FENCE:
            blocks.append("\n".join(current) + "\n")
            current = None
        elif current is not None:
            current.append(line)
    return blocks


EXAMPLES = [(document, index) for document in DOCUMENTS for index in range(len(_blocks(document)))]


def test_the_documents_have_examples():
    assert all(len(_blocks(document)) >= 3 for document in DOCUMENTS)


@pytest.mark.parametrize("document, index", EXAMPLES)
def test_example_runs(document, index, monkeypatch):
    source = _blocks(document)[index]
    if "transformers" in source:
        pytest.importorskip("transformers")
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    exec(compile(source, f"{document}[python block {index}]", "exec"), {"__name__": f"docs_example_{index}"})
