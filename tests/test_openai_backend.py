"""The openai backend against a scripted fake server on loopback (tests/fake_openai.py): explanations,
the three simulation routes and the probe choosing between them, retries, failures as one-line errors,
the call log's cache and budget, and the API key staying out of everything saved."""

from __future__ import annotations

import re
import time
from typing import Any

import numpy as np
import pytest
from fake_openai import (
    CHAT,
    COMPLETIONS,
    EchoModel,
    FakeOpenAI,
    Reply,
    chat_answer,
    chat_logprobs_answer,
    error,
    usage,
)

from neuronscope.core.llm.base import BudgetExceeded, CallLog, LLMError, make_backend
from neuronscope.core.llm.openai_api import OpenAIBackend
from neuronscope.core.llm.openai_http import price_of
from neuronscope.core.llm.prompts import ExplainPrompt, simulation_text
from neuronscope.core.records import Call

KEY = "sk-test-SECRET-1234567890"
TOKENS = ["The", " cat", " sat"]
#: Slot distributions (probabilities) and their expected digits, by hand: renormalised over the digits.
SLOT_DISTS = [{"3": 0.5, "7": 0.25, "?": 0.25}, {"0": 0.6, "9": 0.2, "?": 0.2}, {"?": 1.0}]
EXPECTED = [(3 * 0.5 + 7 * 0.25) / 0.75, 9 * 0.2 / 0.8, 0.0]  # 4.333..., 2.25, 0 (no digit in the top)


class RecordingLog(CallLog):
    """A call log that keeps every saved Call, as the store-backed log would persist them."""

    def __init__(self, max_tokens: int | None = None) -> None:
        super().__init__(max_tokens)
        self.saved: list[Call] = []

    def save(self, key: str, call: Call) -> None:
        super().save(key, call)
        self.saved.append(call)


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("NEURONSCOPE_CONCURRENCY", raising=False)


@pytest.fixture
def fake() -> Any:
    with FakeOpenAI() as server:
        yield server


def backend(fake: FakeOpenAI, **options: Any) -> OpenAIBackend:
    options.setdefault("timeout", 5.0)
    options.setdefault("max_retries", 2)
    b = OpenAIBackend("fake-model", spec="openai:fake-model", urls=(fake.url,), **options)
    b.bind(RecordingLog())
    return b


def prompt() -> ExplainPrompt:
    return ExplainPrompt("Explain the neuron.", (), "Excerpt 1:\nThe\t0\n cat\t9\n\nWhat does it respond to?", 1)


def slot_tokens(body: Any) -> list[str]:
    """The tokens of a chat simulation request: its `token<TAB>?` lines."""
    user = body["messages"][-1]["content"]
    return [line[:-2] for line in user.splitlines() if line.endswith("\t?")]


def one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and "Traceback" not in text and KEY not in text
    return text


# -- explanation --------------------------------------------------------------------------------------

def test_explain_greedy(fake: FakeOpenAI) -> None:
    fake.add(CHAT, chat_answer("Explanation: the word cat.", usage_=usage(40, 6)))
    b = backend(fake)
    assert b.explain(prompt()) == ["the word cat."]
    (req,) = fake.hits(CHAT)
    assert req.body["messages"] == prompt().messages()
    assert req.body["temperature"] == 0 and req.body["model"] == "fake-model" and "n" not in req.body
    assert req.headers["authorization"] == f"Bearer {KEY}"  # the key goes to the server, and nowhere else
    assert b.log.used_tokens == 46  # the server's usage, not the estimate


def test_explain_samples_with_n(fake: FakeOpenAI) -> None:
    fake.add(CHAT, chat_answer("cats", "felines", "pets"))
    assert backend(fake).explain(prompt(), n=3, seed=5) == ["cats", "felines", "pets"]
    (req,) = fake.hits(CHAT)
    assert req.body["n"] == 3 and req.body["seed"] == 5 and req.body["temperature"] == pytest.approx(0.8)


def test_explain_samples_where_server_ignores_n(fake: FakeOpenAI) -> None:
    fake.add(CHAT, chat_answer("cats"), chat_answer("felines"), chat_answer("pets"))
    b = backend(fake)
    assert b.explain(prompt(), n=3, seed=5) == ["cats", "felines", "pets"]
    assert [(r.body.get("n"), r.body["seed"]) for r in fake.hits(CHAT)] == [(3, 5), (None, 6), (None, 7)]
    fake.add(CHAT, chat_answer("dogs"), chat_answer("birds"))  # remembered: one seed per request from now on
    assert b.explain(prompt(), n=2, seed=9) == ["dogs", "birds"]
    assert [(r.body.get("n"), r.body["seed"]) for r in fake.hits(CHAT)][3:] == [(None, 9), (None, 10)]


def test_an_unusable_greedy_explanation_is_asked_again_as_samples(fake: FakeOpenAI) -> None:
    """A greedy answer with no usable line is asked again as three seeded samples, of which the first usable one
    is kept; when none is usable either, the neuron fails with a one-line error naming the first answer."""
    fake.add(CHAT, chat_answer("u\n"), chat_answer("", "- cats and kittens", "pets"))
    b = backend(fake)
    assert b.explain(prompt(), seed=4) == ["cats and kittens"]
    assert [(r.body["temperature"], r.body.get("n"), r.body["seed"]) for r in fake.hits(CHAT)] == [
        (0, None, 0), (pytest.approx(0.8), 3, 4)]
    fake.add(CHAT, chat_answer("x"), chat_answer("", "y", "\n"))
    with pytest.raises(LLMError) as err:
        b.explain(ExplainPrompt("Explain.", (), "Another neuron.", 1))
    assert one_line(err.value) == "openai:fake-model returned no usable explanation (its answer began 'x')"
    assert fake.count(CHAT) == 4


# -- simulation routes --------------------------------------------------------------------------------

@pytest.mark.parametrize("shift", [0, 1])
def test_echo_reads_the_slot_distribution_at_either_shift(fake: FakeOpenAI, shift: int) -> None:
    """The fake lists the distribution predicting token i at entry i - shift (OpenAI: 0, llama.cpp: 1); the
    probe measures the shift and the values are the hand-computed expectations either way (reading the
    neighbouring entry would give 0: it holds no digits)."""
    model = EchoModel(SLOT_DISTS, shift=shift)
    fake.on(COMPLETIONS, model)
    b = backend(fake)
    (values,) = b.simulate("cats", [TOKENS])
    assert b.mode == "echo" and b.echo_shift == shift
    np.testing.assert_allclose(values, EXPECTED, rtol=1e-5)
    probe, request = fake.hits(COMPLETIONS)
    assert request.body["prompt"] == simulation_text("cats", TOKENS).text
    assert request.body["echo"] is True and request.body["logprobs"] == 20 and request.body["max_tokens"] == 1
    assert fake.hits(CHAT) == []


def test_echo_probe_lowers_logprobs_to_five(fake: FakeOpenAI) -> None:
    fake.on(COMPLETIONS, EchoModel(SLOT_DISTS, top_n=5))  # OpenAI's legacy completions allow 5
    b = backend(fake)
    (values,) = b.simulate("cats", [TOKENS])
    np.testing.assert_allclose(values, EXPECTED, rtol=1e-5)
    assert [r.body["logprobs"] for r in fake.hits(COMPLETIONS)] == [20, 5, 5]


def test_echo_that_does_not_match_the_prompt(fake: FakeOpenAI) -> None:
    fake.on(COMPLETIONS, EchoModel(SLOT_DISTS, misalign=True))  # the server merges "\t?" into one token
    b = backend(fake, mode="echo", echo_shift=0)
    with pytest.raises(LLMError, match="the echo does not match the prompt: no token starts at the slot of token 1"):
        b.simulate("cats", [TOKENS])


def test_probe_passes_over_a_misaligned_echo(fake: FakeOpenAI) -> None:
    fake.on(COMPLETIONS, EchoModel(SLOT_DISTS, misalign=True))
    fake.add(CHAT, chat_answer("7"))  # the chat probe: no logprobs in the answer
    b = backend(fake)
    assert b.choose_mode() == "chat-digits"
    assert "do not start at the digits and slots" in b.mode_reason


def chat_simulator(dists: list[dict[str, float]]) -> Any:
    """A chat handler answering a simulation request with logprobs (and the probe with a digit)."""

    def handle(body: Any) -> Reply:
        tokens = slot_tokens(body)
        if not tokens:  # the probe
            return chat_logprobs_answer([("7", "7")], [{"7": 0.9, "8": 0.1}])
        lines = [(t, max(d, key=lambda k: d[k] if k.isdigit() else -1)) for t, d in zip(tokens, dists)]
        return chat_logprobs_answer(lines, dists)

    return handle


def test_probe_chooses_chat_logprobs_without_completions(fake: FakeOpenAI) -> None:
    fake.on(CHAT, chat_simulator([{"2": 0.5, "4": 0.5}, {"9": 0.75, "1": 0.25}, {"0": 0.8, "x": 0.2}]))
    b = backend(fake)  # no completions endpoint: the fake answers 404
    (values,) = b.simulate("cats", [TOKENS])
    assert b.mode == "chat-logprobs"
    np.testing.assert_allclose(values, [3.0, 9 * 0.75 + 0.25, 0.0], rtol=1e-5)
    request = fake.hits(CHAT)[-1]
    assert request.body["logprobs"] is True and request.body["top_logprobs"] == 20
    assert slot_tokens(request.body) == TOKENS


def test_probe_chooses_chat_digits_without_logprobs(fake: FakeOpenAI) -> None:
    fake.add(COMPLETIONS, error(404, "no completions here"))
    fake.add(CHAT, chat_answer("7"), chat_answer("The\t0\n cat\t8\n sat\t1\n"))
    b = backend(fake)
    (values,) = b.simulate("cats", [TOKENS])
    assert b.mode == "chat-digits"
    assert list(values) == [0.0, 8.0, 1.0]
    assert "logprobs" not in fake.hits(CHAT)[-1].body


def test_named_mode_skips_the_probe(fake: FakeOpenAI) -> None:
    fake.add(CHAT, chat_answer("```\nThe\t0\n cat\t8\n sat\t1\n```"))
    (values,) = backend(fake, mode="chat-digits").simulate("cats", [TOKENS])
    assert list(values) == [0.0, 8.0, 1.0] and fake.hits(COMPLETIONS) == [] and len(fake.hits(CHAT)) == 1


def test_short_chat_answer(fake: FakeOpenAI) -> None:
    fake.add(CHAT, chat_answer("The\t0\n cat\t8\n"))
    with pytest.raises(LLMError) as err:
        backend(fake, mode="chat-digits").simulate("cats", [TOKENS])
    assert "the simulation answer has 2 value lines for 3 tokens" in one_line(err.value)


def test_parallel_excerpts_keep_their_order(fake: FakeOpenAI) -> None:
    def handle(body: Any) -> Reply:
        tokens = slot_tokens(body)
        return Reply(200, chat_answer("".join(f"{t}\t{len(tokens) % 10}\n" for t in tokens)).body, delay=0.3)

    fake.on(CHAT, handle)
    excerpts = [["a"] * n for n in range(1, 7)]
    b = backend(fake, mode="chat-digits", concurrency=6)
    start = time.perf_counter()
    values = b.simulate("x", excerpts)
    assert time.perf_counter() - start < 1.2  # 6 x 0.3 s one after the other would take 1.8 s
    assert [list(v) for v in values] == [[float(n)] * n for n in range(1, 7)]


# -- failures -----------------------------------------------------------------------------------------

def test_rate_limit_is_retried(fake: FakeOpenAI) -> None:
    fake.add(CHAT, error(429, "slow down"), chat_answer("cats"))
    assert backend(fake).explain(prompt()) == ["cats"]
    assert len(fake.hits(CHAT)) == 2


def test_server_error_after_retries(fake: FakeOpenAI) -> None:
    fake.on(CHAT, lambda body: error(500, "boom"))
    with pytest.raises(LLMError) as err:
        backend(fake, max_retries=2).explain(prompt())
    assert re.fullmatch(r"openai:fake-model: HTTP 500 from http://127\.0\.0\.1:\d+/v1 after 2 retries \(server error\): "
                        r"boom", one_line(err.value))
    assert len(fake.hits(CHAT)) == 3


def test_timeout(fake: FakeOpenAI) -> None:
    fake.on(CHAT, lambda body: Reply(200, chat_answer("late").body, delay=1.5))
    start = time.perf_counter()
    with pytest.raises(LLMError) as err:
        backend(fake, timeout=0.2, max_retries=1).explain(prompt())
    assert f"no answer from {fake.url} within 0.2 s, after 1 retries (timeout)" in one_line(err.value)
    assert time.perf_counter() - start < 2.0


def test_connection_refused() -> None:
    with FakeOpenAI() as gone:
        url = gone.url
    b = OpenAIBackend("m", spec="openai:m", urls=(url,), timeout=1.0, max_retries=4)
    start = time.perf_counter()
    with pytest.raises(LLMError) as err:
        b.explain(prompt())
    assert f"nothing answers at {url} (connection refused): start the server" in one_line(err.value)
    assert err.value.systematic == "unreachable"
    assert time.perf_counter() - start < 2.0  # refused twice, not retried with the full backoff


def test_systematic_and_transient_failures_are_told_apart(fake: FakeOpenAI) -> None:
    """401/403/404 will hit every request alike (a job stops on them); 5xx and timeouts may pass."""
    for status, cause in ((401, "authentication"), (403, "permission"), (404, "not found"), (500, ""), (429, "")):
        fake.on(CHAT, lambda body, status=status: error(status))  # type: ignore[misc]
        with pytest.raises(LLMError) as err:
            backend(fake, max_retries=1).explain(prompt())
        assert err.value.systematic == cause, status


@pytest.mark.parametrize("body, message", [
    (b"{not json", "malformed JSON"),
    ({"id": "x", "choices": []}, "the explanation answer has no choices"),
    ({"choices": [{"message": {"role": "assistant"}}]}, "lacks choices[].message.content"),
    ([1, 2], "not an object"),
])
def test_malformed_answers(fake: FakeOpenAI, body: Any, message: str) -> None:
    fake.add(CHAT, Reply(200, body))
    with pytest.raises(LLMError) as err:
        backend(fake).explain(prompt())
    assert message in one_line(err.value)


def test_client_error_is_not_retried(fake: FakeOpenAI) -> None:
    fake.add(CHAT, error(401, f"bad key {KEY}, {KEY[:9]}*****{KEY[-4:]}"))  # echoed whole or partly: never leaked
    with pytest.raises(LLMError) as err:
        backend(fake).explain(prompt())
    message = one_line(err.value)
    assert f"HTTP 401 from {fake.url} (authentication failed: check OPENAI_API_KEY): bad key ***, ***" in message
    assert KEY[:9] not in message and KEY[3:9] not in message
    assert len(fake.hits(CHAT)) == 1


def test_echo_without_logprobs(fake: FakeOpenAI) -> None:
    fake.add(COMPLETIONS, Reply(200, {"choices": [{"text": "x", "logprobs": None}]}))
    with pytest.raises(LLMError, match="lacks logprobs.text_offset"):
        backend(fake, mode="echo", echo_shift=1).simulate("cats", [TOKENS])


# -- log, budget, key ---------------------------------------------------------------------------------

def test_cache_answers_a_repeated_simulation(fake: FakeOpenAI) -> None:
    fake.on(COMPLETIONS, EchoModel(SLOT_DISTS, shift=1))
    b = backend(fake)
    first = b.simulate("cats", [TOKENS, TOKENS[:2]])
    sent = len(fake.requests)
    again = b.simulate("cats", [TOKENS, TOKENS[:2]])
    assert len(fake.requests) == sent == 2 and b.log.cache_hits == 1  # the probe, then both excerpts in one echo
    for x, y in zip(first, again):
        np.testing.assert_array_equal(x, y)
    # a new backend on the same log routes the same way from the cached probe, without asking the server
    b2 = backend(fake)
    b2.bind(b.log)
    b2.simulate("cats", [TOKENS, TOKENS[:2]])
    assert len(fake.requests) == sent and b2.mode == "echo" and b2.echo_shift == 1


def test_budget_stops_before_any_request(fake: FakeOpenAI) -> None:
    fake.on(COMPLETIONS, EchoModel(SLOT_DISTS))
    for mode in (None, "echo", "chat-digits"):
        b = backend(fake, mode=mode, echo_shift=0 if mode == "echo" else None)
        b.bind(CallLog(max_tokens=10))
        with pytest.raises(BudgetExceeded):
            b.simulate("cats", [TOKENS] * 3)
        with pytest.raises(BudgetExceeded):
            b.explain(prompt())
    assert fake.requests == []


def test_key_never_in_saved_calls(fake: FakeOpenAI) -> None:
    fake.on(COMPLETIONS, EchoModel(SLOT_DISTS))
    fake.add(CHAT, chat_answer("cats"), chat_answer("The\t0\n cat\t8\n sat\t1\n"))
    b, b2 = backend(fake), backend(fake, mode="chat-digits")
    b.explain(prompt())
    b.simulate("cats", [TOKENS])
    b2.simulate("cats", [TOKENS])
    saved = [c for x in (b, b2) for c in x.log.saved]  # type: ignore[attr-defined]
    assert [c.kind for c in saved] == ["explain", "simulate", "simulate", "simulate"]  # with the echo probe
    assert all(KEY not in repr(c) for c in saved)
    assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in fake.requests)


def test_key_required_only_for_openai(monkeypatch: pytest.MonkeyPatch, fake: FakeOpenAI) -> None:
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(LLMError) as err:
        OpenAIBackend("gpt-4o-mini", spec="openai:gpt-4o-mini")
    assert "OPENAI_API_KEY" in one_line(err.value)
    monkeypatch.setenv("OPENAI_BASE_URL", fake.url)  # another server: a dummy key is sent
    b = OpenAIBackend("m", spec="openai:m", max_retries=0)
    fake.add(CHAT, chat_answer("cats"))
    assert b.explain(prompt()) == ["cats"]
    assert fake.hits(CHAT)[0].headers["authorization"].startswith("Bearer sk-no-key")


def test_spec_and_prices(fake: FakeOpenAI) -> None:
    b = make_backend(f"openai:gpt-4o-mini@{fake.url}")
    assert isinstance(b, OpenAIBackend) and b.base_url == fake.url and b.model == "gpt-4o-mini"
    assert b.price == (0.15, 0.60) and b.context_tokens() == 6000 and b.count_tokens("x" * 40) == 10
    assert price_of("gpt-4o-2024-08-06") == (2.5, 10.0) and price_of("gpt-4.1-mini") == (0.4, 1.6)
    assert price_of("gpt-4.1-nano-2025-04-14") == (0.1, 0.4) and price_of("llama-3-8b") is None
    assert b.spec == "openai:gpt-4o-mini" and b.revision == "gpt-4o-mini"  # no URL in the cache keys
    assert b.default_concurrency == 64  # a server other than OpenAI's batches
    b2 = make_backend(f"openai:gpt-4o-mini#ft-2@{fake.url},{fake.url}/,http://127.0.0.1:1/v1")
    assert isinstance(b2, OpenAIBackend) and b2.urls == (fake.url, "http://127.0.0.1:1/v1")
    assert (b2.spec, b2.revision, b2.default_concurrency) == ("openai:gpt-4o-mini#ft-2", "ft-2", 128)
    with pytest.raises(LLMError, match="unknown simulation mode"):
        OpenAIBackend("m", spec="openai:m", urls=(fake.url,), mode="magic")


def test_the_expected_digits_of_many_slots_read_as_one_at_a_time() -> None:
    """An echo's slots are read in one numpy pass (expected_all): the same values as each slot alone, for dicts with
    some, all or no digits among other tokens, -inf and NaN logprobs, and chat's lists."""
    import random

    from neuronscope.core.llm.openai_answers import digit_dist, expected, expected_all

    rng = random.Random(0)
    tops: list[object] = []
    for _ in range(300):
        top = {str(d): rng.uniform(-20, 0) for d in rng.sample(range(10), rng.randint(0, 10))}
        top.update({f" w{j}": rng.uniform(-5, 0) for j in range(rng.randint(0, 5))})
        tops.append(top)
    tops += [{"a": -1.0}, {"3": float("-inf"), "4": -2.0}, {"3": float("nan"), "5": -1.0}, {}]
    assert expected_all(tops) == pytest.approx([expected(digit_dist(t)) for t in tops], abs=1e-12)
    assert expected_all([{"3": None, "4": -0.5}]) == [4.0]  # a value that is no number: the slot-by-slot reading
    assert expected_all([[{"token": "7", "logprob": -0.01}]]) == [7.0]
