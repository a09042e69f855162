#!/usr/bin/env bash
# GPU readiness in one script, under 8 minutes on one GPU:
#   1. the tests marked `gpu`: a bf16 step with fused AdamW, packed masks on CUDA (BERT, ModernBERT), sdpa vs eager
#      on CUDA, MFU from a measured step;
#   2. berth's pretraining step against the Hugging Face recipe (run_mlm) at BERT-base, seq 128, bf16: real tokens/s,
#      MFU and the ratio (targets: MFU >= 35%, >= 2x the recipe);
#   3. packed rows under FlexAttention's document mask (BERT and ModernBERT, mini) and unpadded with torch's varlen
#      FlashAttention (ModernBERT, mini), each against sdpa's dense mask.
# It needs a CUDA build of torch in the venv (the Makefile installs the CPU build: pip install torch --index-url
# https://download.pytorch.org/whl/cu128 or the build matching the machine). Without CUDA it runs the CPU-side
# checks only: the gpu tests collect (and skip), and the benchmark runs at a tiny size in fp32. Where nvidia-smi
# sees a GPU but torch has no CUDA, it stops with exit code 3 and the install command.
#
#   bench/gpu_check.sh            # from the repository root; PY=path/to/python to use another interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export TOKENIZERS_PARALLELISM=false

if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    "$PY" -c 'import torch; print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__)'
    "$PY" -m pytest -q -m gpu tests/test_gpu.py
    "$PY" bench/pretrain_bench.py --size base --seq-len 128 --batch-size 128 --precision bf16 --steps 30
    "$PY" bench/attention_bench.py --architecture bert --against flex_attention --batch-size 128 --steps 30
    "$PY" bench/attention_bench.py --architecture modernbert --against flex_attention --batch-size 128 --steps 30
    "$PY" bench/attention_bench.py --architecture modernbert --against unpadded --batch-size 128 --steps 30
elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    # a GPU is here but this torch cannot use it: the checks would pass without testing anything
    echo "gpu_check: nvidia-smi sees a GPU but torch $("$PY" -c 'import torch; print(torch.__version__)') has no CUDA;" \
        "install a CUDA build: $PY -m pip install torch --index-url https://download.pytorch.org/whl/cu128" >&2
    exit 3
else
    echo "no CUDA device: CPU-side checks only (the gpu tests are skipped, the benchmark runs tiny in fp32)"
    "$PY" -m pytest -q -m gpu tests/test_gpu.py -rs
    "$PY" bench/pretrain_bench.py --size tiny --seq-len 64 --batch-size 8 --precision fp32 --steps 3
fi
