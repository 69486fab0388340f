#!/usr/bin/env bash
# The precompute benchmark on a CUDA machine: one shard of the default teacher at L=128, torch backend in bf16
# (and the vLLM plans, old vs new, where vLLM is installed), with positions/s, tokens/s and MFU.
#
#   bash benchmarks/gpu.sh                 # ROWS=64 (one default shard); extra arguments go to backends.py
#   ROWS=16 bash benchmarks/gpu.sh --no-vllm
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'benchmarks/gpu.sh: no CUDA device')"
"$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}')"
"$PY" benchmarks/backends.py --device cuda --dtype bfloat16 --rows "${ROWS:-64}" "$@"
