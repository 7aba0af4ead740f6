#!/bin/bash
# The GPU checks of issue 16's collection in one command, about 7 minutes on one H200: random models of real shapes,
# the tokenizer carried in .gpu_tokenizer (bench/gpu_local.py --save-tokenizer), no store written, nothing downloaded;
# the longer run reads the machine's own Python standard library as its corpus. Prints JSON lines. On the device
# machine:
#     run(command="bash bench/gpu_checks.sh", carry=[".gpu_tokenizer"], timeout_s=540)
# Here, to check the script itself on a CPU:  SHAPE_SCALE=tiny bash bench/gpu_checks.sh
set -o pipefail
cd "$(dirname "$0")/.." || exit 2
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false NEURONSCOPE_CACHE="${NEURONSCOPE_CACHE:-/tmp/neuronscope-cache}"
PY=${PYTHON:-python3}
if [ "${SHAPE_SCALE:-}" = tiny ]; then
    gpt2=tiny llama=tiny; many=256 few=128 long=1024
else
    gpt2=gpt2-xl llama=llama-3.1-8b; many=4096 few=2048 long=32768
fi
stdlib=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
echo '{"check": "collection, GPT-2 XL shape: fixed-shape against filtered bookkeeping, their results equal, states taken in a second thread as in the store write, and the compiled statistics kernel against eager; where the bookkeeping of one layer spends its time"}'
timeout 170 "$PY" bench/collect.py --random "$gpt2" --excerpts "$many" --check --profile
echo '{"check": "collection, Llama-3.1-8B shape; then a 16x TopK sparse coder against the MLP neurons of one layer"}'
timeout 180 "$PY" bench/collect.py --random "$llama" --excerpts "$few" --sae-width 16
echo '{"check": "collection, GPT-2 XL shape, a longer run (2M tokens of the Python standard library): the fixed path once few excerpts still enter the records (second_half_ratio)"}'
timeout 150 "$PY" bench/collect.py --random "$gpt2" --excerpts "$long" --corpus "$stdlib" --paths fixed
