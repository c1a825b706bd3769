#!/usr/bin/env bash
# On a CUDA machine: the gpu-marked tests (every policy in bf16 under SDPA, FlashAttention 2 when
# flash-attn is installed, the default model on CUDA) and a timing table for docs/benchmarks.md.
# Run from a venv made by the README's commands (plus `pip install -e ".[test]"`).
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__)"
python -m pytest -q -s -p no:cacheprovider -m gpu tests "$@"
python benchmarks/gpu_table.py
