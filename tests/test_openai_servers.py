"""The openai backend at scale: several servers (requests spread, failures tried elsewhere, dead servers failing
fast as systematic), cache keys that do not name the server, packed echo prompts (one request for a simulate
call's excerpts, read as each excerpt alone would be), ratings read from echoed prompts, and `requests` giving
the payloads `call` gets, for dry runs. Against the scripted fake (tests/fake_openai.py), several at once."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

import numpy as np
import pytest
from fake_openai import CHAT, COMPLETIONS, EchoModel, FakeOpenAI, Reply, chat_answer, error

from neuronscope.core.llm.base import CallLog, LLMError
from neuronscope.core.llm.openai_api import OpenAIBackend
from neuronscope.core.llm.prompts import ExplainPrompt, packed_simulation_text, simulation_text
from neuronscope.core.llm.rating import Item, packed_rating_text, rating_text
from neuronscope.core.llm.recording import LookupOnlyLog

EXCERPTS = [["The", " cat", " sat"], [" on", " the", " mat", "."], ["Rain", " fell"], [" dogs", " bark", " loud", "ly"],
            [" a"]]


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-servers")
    for name in ("OPENAI_BASE_URL", "NEURONSCOPE_CONCURRENCY", "NEURONSCOPE_OPENAI_PACK_TOKENS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def servers() -> Iterator[list[FakeOpenAI]]:
    """Three fake servers, each on a port of its own."""
    with ExitStack() as stack:
        yield [stack.enter_context(FakeOpenAI()) for _ in range(3)]


def backend(*urls: str, **options: Any) -> OpenAIBackend:
    options.setdefault("timeout", 5.0)
    options.setdefault("max_retries", 2)
    b = OpenAIBackend("fake-model", spec="openai:fake-model", urls=urls, **options)
    b.bind(CallLog())
    return b


def prompt(i: int = 0) -> ExplainPrompt:
    return ExplainPrompt("Explain the neuron.", (), f"Excerpt {i}:\nThe\t0\n cat\t9\n\nWhat does it respond to?", 1)


def explainer(name: str, delay: float = 0.0) -> Any:
    """A chat handler answering with the server's name and the request's last line, after `delay` seconds."""
    return lambda body: Reply(200, chat_answer(f"{name}: {body['messages'][-1]['content'].splitlines()[0]}").body,
                              delay=delay)


def line_of(prompt_text: str, offset: int) -> str:
    """The text of the line a slot is on, before its tab; for a rating slot, the item line above it."""
    start = prompt_text.rfind("\n", 0, offset) + 1
    line = prompt_text[start:offset - 1]
    if line == "Rating:":
        above = prompt_text.rfind("\n", 0, start - 1) + 1
        line = prompt_text[above:start - 1]
    return line


def context_model(prompt_text: str, offset: int) -> dict[str, float]:
    """A slot's digit distribution as a function of its line alone (the same however the excerpts are packed)."""
    d = sum(map(ord, line_of(prompt_text, offset))) % 10
    return {str(d): 0.6, str((d + 3) % 10): 0.3, "?": 0.1}


def expected_of(line: str) -> float:
    d = sum(map(ord, line)) % 10
    return (d * 0.6 + (d + 3) % 10 * 0.3) / 0.9


# -- several servers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("failure", ["503", "dropped", "timeout", "refused"])
def test_a_failing_server_is_passed_over(servers: list[FakeOpenAI], failure: str) -> None:
    """One server of two fails every request (an error, a dropped connection, no answer in time, or nothing
    listening): every request is answered by the other, none fails."""
    bad, good = servers[0], servers[1]
    good.on(CHAT, explainer("good"))
    bad.on(CHAT, explainer("bad"))
    if failure == "503":
        bad.fail(error(503, "overloaded"))
    elif failure == "dropped":
        bad.fail(Reply(drop=True))
    elif failure == "timeout":
        bad.fail(Reply(200, chat_answer("late").body, delay=2.0))
    else:
        bad.refuse()
    b = backend(bad.url, good.url, timeout=0.5)
    start = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: b.explain(prompt(i)), range(24)))
    assert [a for (a,) in answers] == [f"good: Excerpt {i}:" for i in range(24)]
    assert good.count(CHAT) == 24 and b.log.new_calls == 24
    assert time.perf_counter() - start < 6.0
    # The failing server cools down: later requests go straight to the other one.
    before = bad.count()
    for i in range(24, 30):
        b.explain(prompt(i))
    assert bad.count() == before and good.count(CHAT) == 30
    b.close()


def test_requests_are_spread_over_the_servers(servers: list[FakeOpenAI]) -> None:
    for i, server in enumerate(servers):
        server.on(CHAT, explainer(f"s{i}", delay=0.2))
    b = backend(*(s.url for s in servers))
    assert b.default_concurrency == 3 * 64
    start = time.perf_counter()
    with ThreadPoolExecutor(30) as pool:
        list(pool.map(lambda i: b.explain(prompt(i)), range(30)))
    assert time.perf_counter() - start < 2.0  # 30 x 0.2 s one at a time would take 6 s
    counts = [s.count(CHAT) for s in servers]
    assert sum(counts) == 30 and min(counts) >= 5, counts  # fewest in flight first: about 10 each
    b.close()


def test_hundreds_of_requests_in_flight(servers: list[FakeOpenAI]) -> None:
    """Many more requests at once than httpx's default keeps alive go through one server's pool."""
    server = servers[0]
    server.on(CHAT, explainer("s", delay=0.3))
    b = backend(server.url, timeout=20.0)
    start = time.perf_counter()
    with ThreadPoolExecutor(200) as pool:
        answers = list(pool.map(lambda i: b.explain(prompt(i)), range(200)))
    assert len(answers) == 200 and server.count(CHAT) == 200
    assert time.perf_counter() - start < 10.0  # 60 s one at a time
    b.close()


def test_dead_servers_fail_fast_as_systematic(servers: list[FakeOpenAI]) -> None:
    urls = [s.url for s in servers[:2]]
    for s in servers[:2]:
        s.refuse()
    b = backend(*urls, max_retries=4)
    start = time.perf_counter()
    with pytest.raises(LLMError) as err:
        b.explain(prompt())
    assert time.perf_counter() - start < 2.0  # refused twice each, not retried with the full backoff
    assert err.value.systematic == "unreachable"
    text = str(err.value)
    assert "\n" not in text and f"nothing answers at {urls[0]}, {urls[1]} (connection refused)" in text


def test_every_server_failing_fails_the_request(servers: list[FakeOpenAI]) -> None:
    for s in servers[:2]:
        s.fail(error(500, "boom"))
    b = backend(servers[0].url, servers[1].url, max_retries=1)
    with pytest.raises(LLMError) as err:
        b.explain(prompt())
    assert err.value.systematic == "" and "HTTP 500" in str(err.value) and "(all 2 servers failed)" in str(err.value)
    assert servers[0].count() == servers[1].count() == 2  # each tried once a round, two rounds


def test_an_unauthorised_server_stops_the_job(servers: list[FakeOpenAI]) -> None:
    servers[0].fail(error(401, "bad key"))
    servers[1].fail(error(401, "bad key"))
    b = backend(servers[0].url, servers[1].url)
    with pytest.raises(LLMError) as err:
        b.explain(prompt())
    assert err.value.systematic == "authentication" and servers[0].count() + servers[1].count() == 1


def test_default_concurrency(monkeypatch: pytest.MonkeyPatch, servers: list[FakeOpenAI]) -> None:
    assert OpenAIBackend("gpt-4o-mini", spec="openai:gpt-4o-mini").default_concurrency == 8  # polite to a paid API
    assert backend(servers[0].url).default_concurrency == 64
    assert backend(servers[0].url, concurrency=5).default_concurrency == 5
    monkeypatch.setenv("NEURONSCOPE_CONCURRENCY", "300")
    assert backend(servers[0].url, servers[1].url).default_concurrency == 300
    monkeypatch.setenv("NEURONSCOPE_CONCURRENCY", "many")
    with pytest.raises(LLMError, match="NEURONSCOPE_CONCURRENCY must be an integer"):
        backend(servers[0].url)


# -- cache keys ---------------------------------------------------------------------------------------

def test_cache_keys_do_not_name_the_server(servers: list[FakeOpenAI]) -> None:
    """The same model served elsewhere answers from the log: the keys hold the model and revision, no URL."""
    first, second = servers[0], servers[1]
    first.on(COMPLETIONS, EchoModel(context_model, shift=1))
    first.on(CHAT, explainer("first"))
    b1 = backend(first.url)
    b1.explain(prompt())
    b1.simulate("cats", EXCERPTS)
    b1.rate("detect", "cats", [Item(tuple(t)) for t in EXCERPTS])
    b2 = backend(second.url)  # nothing scripted: any request would fail
    b2.bind(b1.log)
    assert b2.explain(prompt()) == ["first: Excerpt 0:"]
    for x, y in zip(b1.simulate("cats", EXCERPTS), b2.simulate("cats", EXCERPTS)):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(b2.rate("detect", "cats", [Item(tuple(t)) for t in EXCERPTS]),
                                  b1.rate("detect", "cats", [Item(tuple(t)) for t in EXCERPTS]))
    assert second.count() == 0 and b2.mode == "echo" and b2.echo_shift == 1  # routed by the logged probe
    assert all(first.url not in c for c in (b1.spec, b1.revision))


def test_a_revision_keeps_weights_apart(servers: list[FakeOpenAI]) -> None:
    server = servers[0]
    server.on(CHAT, explainer("s"))
    b1 = backend(server.url)
    b1.explain(prompt())
    b2 = OpenAIBackend("fake-model", spec="openai:fake-model#v2", urls=(server.url,), revision="v2")
    b2.bind(b1.log)
    b2.explain(prompt())
    assert server.count(CHAT) == 2 and b2.revision == "v2"


# -- packed echo prompts ------------------------------------------------------------------------------

def test_a_packed_prompt_of_one_excerpt_is_the_plain_prompt() -> None:
    (packed,) = packed_simulation_text("cats", [EXCERPTS[0]], 6000, lambda t: max(1, len(t) // 4))
    plain = simulation_text("cats", EXCERPTS[0])
    assert packed.text == plain.text and packed.slots == (plain.slots,)
    prompts = packed_simulation_text("cats", EXCERPTS, 6000, lambda t: max(1, len(t) // 4))
    assert len(prompts) == 1 and [len(s) for s in prompts[0].slots] == [len(t) for t in EXCERPTS]
    assert all(prompts[0].text[o] == "?" and prompts[0].text[o - 1] == "\t" for s in prompts[0].slots for o in s)


@pytest.mark.parametrize("shift", [0, 1])
def test_simulate_packs_the_excerpts_into_one_echo(servers: list[FakeOpenAI], shift: int) -> None:
    server = servers[0]
    server.on(COMPLETIONS, EchoModel(context_model, shift=shift))
    b = backend(server.url)
    values = b.simulate("cats", EXCERPTS)
    assert b.mode == "echo" and server.count(CHAT) == 0
    probe, packed = server.hits(COMPLETIONS)
    assert packed.body["prompt"].count("\t?\n") == sum(map(len, EXCERPTS))
    # The same values as each excerpt alone in a prompt of its own (and as the model's by hand).
    alone = backend(server.url, mode="echo", echo_shift=shift)
    for tokens, v in zip(EXCERPTS, values):
        (one,) = alone.simulate("cats", [tokens])
        np.testing.assert_allclose(v, one, rtol=1e-6)
        np.testing.assert_allclose(v, [expected_of(t) for t in tokens], rtol=1e-5)
    assert server.count(COMPLETIONS) == 2 + len(EXCERPTS)


def test_packing_respects_the_token_budget(servers: list[FakeOpenAI], monkeypatch: pytest.MonkeyPatch) -> None:
    server = servers[0]
    server.on(COMPLETIONS, EchoModel(context_model))
    excerpts = [[f" w{i}{j}" for j in range(20)] for i in range(12)] + [[]]
    head = len(simulation_text("cats", []).text) // 4
    monkeypatch.setenv("NEURONSCOPE_OPENAI_PACK_TOKENS", str(head + 250))  # about three excerpts a prompt
    b = backend(server.url, mode="echo", echo_shift=0)
    values = b.simulate("cats", excerpts)
    prompts = [r.body["prompt"] for r in server.hits(COMPLETIONS)]
    assert b.pack_tokens == head + 250 and len(prompts) == 4
    assert all(p.startswith(simulation_text("cats", []).text) for p in prompts)
    for tokens, v in zip(excerpts, values):
        np.testing.assert_allclose(v, [expected_of(t) for t in tokens], rtol=1e-5)
    assert len(values[-1]) == 0


def test_echo_ratings_make_no_chat_request(servers: list[FakeOpenAI]) -> None:
    server = servers[0]
    server.on(COMPLETIONS, EchoModel(context_model, shift=1))
    items = [Item(tuple(t)) for t in EXCERPTS] + [Item(("a", "b"), (True, False))]
    b = backend(server.url)
    for task in ("detect", "fuzz", "token"):
        values = b.rate(task, "cats", items)
        np.testing.assert_allclose(values, [expected_of(i.line(task)) for i in items], rtol=1e-5)
    assert server.count(CHAT) == 0 and server.count(COMPLETIONS) == 1 + 3  # the probe, one echo per task
    text = server.hits(COMPLETIONS)[-1].body["prompt"]
    assert text.count("Rating:\t?\n") == len(items) and "Rating: ?" not in text
    (packed,) = packed_rating_text("token", "cats", items, 6000, b.count_tokens)
    assert packed.text == text and rating_text("token", "cats", items).count("?") == len(items)


def test_a_context_overflow_names_the_pack_setting(servers: list[FakeOpenAI]) -> None:
    server = servers[0]
    server.on(COMPLETIONS, lambda body: error(400, "prompt is longer than the context"))
    with pytest.raises(LLMError, match="lower NEURONSCOPE_OPENAI_PACK_TOKENS from 6000"):
        backend(server.url, mode="echo", echo_shift=0).simulate("cats", EXCERPTS)


# -- dry runs -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["echo", "chat-digits", "chat-logprobs"])
def test_requests_are_the_payloads_the_calls_log(servers: list[FakeOpenAI], mode: str) -> None:
    server = servers[0]
    server.on(COMPLETIONS, EchoModel(context_model))

    def chat(body: Any) -> Reply:
        user = body["messages"][-1]["content"]
        slots = [line[:-2] for line in user.splitlines() if line.endswith("\t?")]
        ratings = [line for line in user.splitlines() if line == "Rating: ?"]
        if slots:
            return chat_answer("".join(f"{t}\t1\n" for t in slots))
        if ratings:
            return chat_answer("Rating: 2\n" * len(ratings))
        return chat_answer("cats")

    server.on(CHAT, chat)
    b = backend(server.url, mode=mode, echo_shift=0 if mode == "echo" else None)
    items = [Item(tuple(t)) for t in EXCERPTS]
    ops: list[tuple[str, tuple[Any, ...]]] = [("explain", (prompt(), 1, 0)), ("explain", (prompt(), 3, 7)),
                                              ("simulate", ("cats", EXCERPTS + [[]])), ("rate", ("fuzz", "cats", items))]
    if mode == "chat-logprobs":
        ops = ops[:2]  # the chat fake writes no logprobs: requests only
    for kind, args in ops:
        planned = b.requests(kind, *args)
        assert planned and all(payload is not None and not b.is_cached(kind, payload) for payload, _, _ in planned)
        getattr(b, kind)(*args)
        assert all(b.is_cached(kind, payload) for payload, _, _ in planned), kind
        assert b.log.new_calls == sum(len(b.requests(k, *a)) for k, a in ops[:ops.index((kind, args)) + 1])


def test_requests_before_the_probe_make_no_request(servers: list[FakeOpenAI]) -> None:
    server = servers[0]
    server.on(COMPLETIONS, EchoModel(context_model, shift=1))
    b = backend(server.url)
    planned = b.requests("simulate", "cats", EXCERPTS)
    assert [p for p, _, _ in planned] == [None] and planned[0][1] > 0  # one packed prompt, estimated
    assert b.requests("rate", "detect", "cats", [Item(("a",))])[0][0] is None
    assert server.count() == 0 and b.mode is None
    b.simulate("cats", EXCERPTS)
    # A new backend over the same log knows the route from the logged probe, still without a request, as a dry
    # run's does through a lookup-only log.
    sent = server.count()
    b2 = backend(server.url)
    b2.bind(LookupOnlyLog(b.log))
    (payload, _, _), = b2.requests("simulate", "cats", EXCERPTS)
    assert b2.is_cached("simulate", payload) and server.count() == sent and b2.echo_shift == 1


def test_http_clients_stay_bounded_over_many_calls(servers: list[FakeOpenAI]) -> None:
    """Each thread has its own HTTP client; the chat route's fan-out reuses one pool's threads, so a long job opens
    a bounded number of clients, however many calls it makes."""
    server = servers[0]

    def digits(body: Any) -> Reply:
        slots = [line[:-1] for line in body["messages"][-1]["content"].splitlines() if line.endswith("\t?")]
        return chat_answer("".join(f"{line}{len(line) % 10}\n" for line in slots))

    server.on(CHAT, digits)
    b = backend(server.url, mode="chat-digits", concurrency=4)
    try:
        for call in range(30):
            b.simulate(f"call {call}", EXCERPTS)
        assert server.count(CHAT) == 30 * len(EXCERPTS)
        assert len(b._clients) <= 4 + 1  # the pool's threads, and this one's
    finally:
        b.close()
