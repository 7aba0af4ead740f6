"""The shards' shared token ids (core/collection/token_cache.py): the corpus tokenized once between the shards of
a collection, each reading its own windows from the file."""

from __future__ import annotations

import pytest
from test_corpus import byte_tokenizer, write

from neuronscope.core.collection.corpus import CorpusSpec
from neuronscope.core.collection.excerpts import cut_excerpts


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return byte_tokenizer(eos_token="<eos>")



class _Counting:
    """A tokenizer that counts how often it is asked to tokenize."""

    def __init__(self, inner):  # type: ignore[no-untyped-def]
        self.inner, self.calls = inner, 0

    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.calls += 1
        return self.inner(*args, **kwargs)

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.inner, name)


def test_shards_tokenize_the_corpus_once_and_read_their_own_windows(tmp_path, tok):
    """With a cache folder (what `collect --shard` passes), the first shard tokenizes and writes the token ids; the
    next reads its windows from there without tokenizing, each equal to its cut without the cache, and hears of the
    files skipped as the first did; a changed file, or another budget, is another cache."""
    folder = tmp_path / "corpus"
    write(folder / "a.txt", "\n\n".join(f"paragraph {i} of plain prose that goes on" for i in range(300)))
    write(folder / "z.bin", bytes(range(256)))
    spec, cache = CorpusSpec(str(folder)), tmp_path / "all.tokens"
    plain = [cut_excerpts(spec, tok, length=8, max_excerpts=50, shard=(i, 2)) for i in range(2)]
    counting, heard = _Counting(tok), []
    shards = []
    for i in range(2):
        shards.append(cut_excerpts(spec, counting, length=8, max_excerpts=50, shard=(i, 2), cache=cache,
                                   skipped=lambda path, why: heard.append((path.name, why))))
        if i == 0:
            tokenized = counting.calls
            assert tokenized > 0
    assert counting.calls == tokenized  # the second shard read the cache
    for a, b in zip(plain, shards):
        assert (a.token_ids.tolist(), a.excerpt_ids.tolist(), a.corpus) == (b.token_ids.tolist(),
                                                                             b.excerpt_ids.tolist(), b.corpus)
    assert len(heard) == 2 and heard[0] == heard[1] and heard[0][0] == "z.bin"
    assert len(list(cache.glob("*.npy"))) == 1 and not list(cache.glob("*.partial"))
    cut_excerpts(spec, counting, length=8, max_tokens=40, cache=cache)
    with open(folder / "a.txt", "a") as more:
        more.write("\n\nanother paragraph")
    changed = cut_excerpts(spec, counting, length=8, cache=cache)
    assert counting.calls > tokenized + 1 and len(list(cache.glob("*.npy"))) == 3
    assert changed.corpus != shards[0].corpus


def test_a_shard_that_waits_for_another_to_tokenize_says_so(tmp_path, tok):
    """While another process holds the cache's lock (tokenizing a budget of 100M tokens takes minutes), a shard is
    told it waits, then goes on once the lock is let go."""
    import fcntl
    import threading

    from neuronscope.core.collection.corpus import describe
    from neuronscope.core.collection.token_cache import cache_key

    folder = tmp_path / "corpus"
    write(folder / "a.txt", "\n\n".join(f"paragraph {i} of plain prose that goes on" for i in range(50)))
    spec, cache = CorpusSpec(str(folder)), tmp_path / "all.tokens"
    cache.mkdir()
    waited, cut = threading.Event(), []
    with open(cache / f"{cache_key(describe(spec), tok, None)}.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another shard, tokenizing
        shard = threading.Thread(target=lambda: cut.append(
            cut_excerpts(spec, tok, length=8, shard=(1, 2), cache=cache, waiting=waited.set)))
        shard.start()
        assert waited.wait(30) and shard.is_alive() and not cut
    shard.join(30)
    assert cut and cut[0].token_ids.tolist() == cut_excerpts(spec, tok, length=8, shard=(1, 2)).token_ids.tolist()
