"""The openai backend against a real OpenAI-compatible server: llama-cpp-python's, on the packaged SmolLM2.

It checks what a fake cannot: that the echo probe finds llama.cpp's shifted prompt logprobs (without a BOS
token, llama-cpp-python lists at prompt token i the distribution predicting token i+1), that the reading
then lands on the slot's digit distribution (a prompt whose digits are forced by repetition), and that
explanations, echo simulation and chat logprobs round-trip. SmolLM2-135M is too small to fill in the chat
simulation lines, so that route may end in the backend's one-line "value lines" error; both outcomes are
checked for form.

llama-cpp-python is a source build; CI (.ci/run) and `./setup.sh test` install it. Without it this test
fails (it never skips) and says how to install it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from neuronscope.core.llm.base import LLMError
from neuronscope.core.llm.openai_answers import read_echo
from neuronscope.core.llm.openai_api import OpenAIBackend
from neuronscope.core.llm.prompts import ExplainPrompt, fewshot
from neuronscope.core.llm.rating import Item
from neuronscope.core.records import TOP

pytestmark = pytest.mark.slow

INSTALL = ("CMAKE_ARGS='-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF' .venv/bin/pip install 'llama-cpp-python[server]==0.3.36' "
           "(a source build of a few minutes; ./setup.sh test does it)")
SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")
READY_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


def post(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as r:
        return json.load(r)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    missing = [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        pytest.fail(f"llama-cpp-python's server is not installed (missing {', '.join(missing)}): {INSTALL}")
    from neuronscope.core.models.packaged import PACKAGED

    model = PACKAGED["smollm2-135m"].path()
    port = free_port()
    log_path = tmp_path_factory.mktemp("llamacpp") / "server.log"
    # logits_all: echoed prompt logprobs need the logits of every position.
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
               "--port", str(port), "--n_ctx", "2048", "--n_threads", str(os.cpu_count() or 2),
               "--logits_all", "true", "--verbose", "false"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"the llama.cpp server exited with {process.returncode} before it was ready"
                            f"{crash_hint(process.returncode)}:\n{tail(log_path)}")
            try:
                get(f"{base}/models", timeout=2.0)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the llama.cpp server was not ready within {READY_TIMEOUT_S} s:\n{tail(log_path)}")
                time.sleep(0.3)
        yield base
        if process.poll() is not None:
            pytest.fail(f"the llama.cpp server died with {process.returncode}{crash_hint(process.returncode)}:\n"
                        f"{tail(log_path)}")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=15)


def crash_hint(code: int | None) -> str:
    if code == -signal.SIGSEGV:
        return (" (SIGSEGV: a -march=native build of llama.cpp crashes in its AMX kernels on some hosts; "
                f"rebuild it: {INSTALL})")
    return ""


def tail(path: Path) -> str:
    return path.read_text(errors="replace")[-2000:]


def backend(base: str, **options: Any) -> OpenAIBackend:
    return OpenAIBackend("smollm2", spec="openai:smollm2", urls=options.pop("urls", (base,)), timeout=300,
                         max_retries=0, **options)


def in_range(values: np.ndarray, length: int) -> None:
    assert values.shape == (length,) and values.dtype == np.float32
    assert np.all(np.isfinite(values)) and np.all(values >= 0) and np.all(values <= TOP)


def test_echo_route_reads_the_shifted_slot(server: str) -> None:
    b = backend(server)
    assert b.choose_mode() == "echo", b.mode_reason
    # llama-cpp-python 0.3.36, SmolLM2 (no BOS token): entry i holds the distribution predicting token i+1.
    assert b.echo_shift == 1, b.mode_reason

    # A prompt whose digits are forced: three repetitions of word<TAB>digit lines, then the words with slots.
    # The backend's reading at the measured shift must find the forced digits; at the other shift it must not.
    pairs = [("cat", 7), ("dog", 2), ("sun", 5), ("red", 0), ("map", 9), ("box", 3)]
    text = "".join(f"{w}\t{d}\n" for w, d in pairs) * 3
    slots = []
    for w, _ in pairs[:3]:
        text += f"{w}\t"
        slots.append(len(text))
        text += "?\n"
    data = b._post("completions", b._echo_body(text, b.echo_logprobs))
    right = np.array(read_echo(b.spec, data, text, slots, b.echo_shift))
    wrong = np.array(read_echo(b.spec, data, text, slots, 1 - b.echo_shift))
    forced = np.array([d for _, d in pairs[:3]], float)
    assert np.abs(right - forced).max() < 2.5, (right, forced)
    assert np.abs(right - forced).mean() < np.abs(wrong - forced).mean() - 1.0, (right, wrong, forced)

    # The public route: the simulation prompt, two excerpts packed into one echoed prompt.
    shot = fewshot("simulate")
    excerpts = [shot["tokens"][:6], ["The", " cat", " sat"]]
    values = b.simulate(shot["explanation"], excerpts)
    for v, tokens in zip(values, excerpts):
        in_range(v, len(tokens))
    assert b.log.new_calls == 2 and b.log.used_tokens > 0  # the probe and one packed echo
    b.simulate(shot["explanation"], excerpts)
    assert b.log.new_calls == 2 and b.log.cache_hits == 1

    # Ratings on the echo route: one echoed prompt, the slots after `Rating:<TAB>` tokens of their own.
    items = [Item(tuple(t)) for t in excerpts] + [Item(("rain",))]
    for task in ("detect", "token"):
        ((payload, _, _),) = b.requests("rate", task, "words for weather", items)
        assert payload["route"] == "echo"
        in_range(b.rate(task, "words for weather", items), len(items))
        assert b.is_cached("rate", payload)
    assert b.log.new_calls == 4
    b.close()


def test_a_dead_server_beside_a_live_one(server: str) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    b = backend(server, urls=(dead, server), mode="echo", echo_shift=1)
    for i in range(3):
        in_range(b.simulate("the word 'cat'", [["The", " cat", " sat", f" {i}"]])[0], 4)
    assert b.log.new_calls == 3
    b.close()


def test_explain_and_chat_logprobs(server: str) -> None:
    b = backend(server, mode="chat-logprobs")
    prompt = ExplainPrompt("You describe what a neuron responds to, in one short sentence.", (),
                           "Excerpt 1:\nThe\t0\n cat\t9\n sat\t0\n on\t0\n the\t0\n cat\t9\n\n"
                           "What does this neuron respond to?", 1)
    (text,) = b.explain(prompt)  # (n > 1: llama.cpp ignores n; the fake server's tests cover the top-up)
    assert text.strip() and b.log.new_calls == 1

    # Chat logprobs follow OpenAI's convention (no shift): with greedy decoding, each answer token is the
    # most likely entry of its own top_logprobs.
    answer = post(f"{server}/chat/completions", {
        "model": "smollm2", "messages": [{"role": "user", "content": "Count from 1 to 5."}], "max_tokens": 12,
        "temperature": 0, "logprobs": True, "top_logprobs": 5})
    content = answer["choices"][0]["logprobs"]["content"]
    assert content
    for entry in content:
        best = max(entry["top_logprobs"], key=lambda e: e["logprob"])
        assert math.isclose(best["logprob"], entry["logprob"], abs_tol=1e-4), entry

    # SmolLM2-135M rarely writes the token<TAB>digit lines back: either values, or the one-line error.
    try:
        (values,) = b.simulate("the word 'cat'", [["The", " cat", " sat"]])
    except LLMError as err:
        assert "value lines for 3 tokens" in str(err) and "\n" not in str(err)
    else:
        in_range(values, 3)
    b.close()
