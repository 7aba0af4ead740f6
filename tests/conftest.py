"""Shared fixtures: a tiny random-weight Llama model folder, small corpora, and helpers to collect.

Nothing here touches the network: the tokenizer is a byte-level BPE trained in-process on the corpus
text, the model is built from a config with seeded random weights. Everything lives in a session
temp dir; the `neuronscope_env` fixture points NEURONSCOPE_CACHE there too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from neuronscope.core.store import Store

#: Flags that keep a collection over the tiny model fast (dtype fixed: exact comparisons need fp32).
FAST = ["--length", "16", "--top-k", "5", "--bottom-k", "5", "--random-k", "4", "--quantile-k", "2",
        "--dtype", "float32", "--device", "cpu"]

PROSE = [
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He wound the clockwork, "
    "trimmed the wick and polished the great lens until the beam swept cleanly across the bay.",
    "In the spring the river rose over its banks and the meadows became a shallow lake. Herons stood in "
    "the water like grey statues, and children floated paper boats between the fence posts.",
    "To compile the program, run make in the top-level folder. If the build fails, check that the "
    "compiler is on your path and that the header files of the library are installed.",
    "She counted the coins twice: seven silver pieces, three copper ones and a brass token she did not "
    "recognise. The merchant shrugged and said it had come from a ship in the northern harbour.",
    "Bread rises because yeast turns sugar into carbon dioxide. The gas is trapped by the gluten, which "
    "stretches like a balloon; baking sets the structure before the bubbles can escape.",
    "The committee met on Tuesday and voted to repair the old bridge rather than build a new one. The "
    "work will begin in May and should be finished before the harvest.",
    "Mathematics rewards patience. A proof that looks impossible on Monday may fall apart on Friday "
    "when you notice that two of the terms cancel, and the whole argument becomes one line.",
    "Wolves travel in packs of six to ten animals. They hunt deer and elk in the winter, following the "
    "herds across frozen lakes, and they howl to find each other in the dark forest.",
    "Please remember to water the tomatoes, feed the cat and lock the back door. The spare key is under "
    "the blue flowerpot, and the neighbours have the number of the plumber.",
    "Old maps were drawn by hand from the reports of sailors. Coastlines wandered, islands appeared and "
    "vanished, and the empty interior of a continent was often filled with dragons.",
    "The orchestra tuned to a single note from the oboe. Then the hall went quiet, the conductor raised "
    "her baton, and the violins began the slow melody of the first movement.",
    "When the server restarts, every client reconnects at once. To avoid a thundering herd, each one "
    "waits a random delay before it tries again, doubling the delay after every failure.",
    "Grandfather kept bees behind the barn. In August he lifted the frames heavy with honey, and the "
    "kitchen smelled of wax and clover for a week while the jars cooled on the table.",
    "A good soup starts with onions, carrots and celery cooked slowly in butter. Add the stock, a bay "
    "leaf and a pinch of salt, then let it simmer for an hour before you taste it.",
    "The telescope revealed four moons circling the planet. Night after night the astronomer recorded "
    "their positions, and slowly a pattern emerged that no one had predicted.",
    "Trains from the coast arrive every twenty minutes. Passengers for the airport should change at the "
    "central station and take the express, which does not stop at the suburbs.",
]

#: Markers whose tokens must show literally: rich markup, a chat tag, ANSI CSI and OSC escapes.
MARKERS = ["[bold red]x[/]", "[/INST]", "\x1b[31mRED\x1b[0m", "\x1b]0;title\x07"]
#: Each marker in a run long enough that some 16-token excerpt holds a whole copy, whatever the cut.
HOSTILE = [
    "Markup: " + " ".join([MARKERS[0]] * 6) + " never turns red.",
    "Chat tags: " + " ".join([MARKERS[1]] * 8) + " close nothing here.",
    "Colour: " + " ".join([MARKERS[2]] * 6) + " stays plain text.",
    "Window title: " + " ".join([MARKERS[3]] * 6) + " renames no window.",
]


def _variant(text: str, i: int) -> str:
    """A deterministic variation of a paragraph: sentences rotated, a counter woven in."""
    sentences = [s.strip().rstrip(".") for s in text.replace("? ", ". ").split(". ") if s.strip()]
    k = i % len(sentences)
    return f"Note {i + 1}. " + ". ".join(sentences[k:] + sentences[:k]) + "."


def prose_text(copies: int = 2) -> str:
    """The prose paragraphs and `copies - 1` varied copies, blank-line separated."""
    paras = PROSE + [_variant(p, c * len(PROSE) + i) for c in range(1, copies) for i, p in enumerate(PROSE)]
    return "\n\n".join(paras) + "\n"


def hostile_text() -> str:
    """Hostile paragraphs, each twice, so they land in several excerpts."""
    return "\n\n".join(HOSTILE + [_variant(p, i) for i, p in enumerate(PROSE[:3])] + HOSTILE) + "\n"


# -- environment -------------------------------------------------------------------------------------

#: Environment of every neuronscope run in these tests (filled by `session_dir`).
TEST_ENV: dict[str, str] = {}


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The session's temp dir; NEURONSCOPE_CACHE goes inside it, torch.compile off, no hub access. The cache (the
    packaged model's unpacked weights and safetensors copy, about 3 GB) is removed when the session ends: pytest keeps
    its last temp dirs, and three of them filled a CI machine's disk."""
    root = tmp_path_factory.mktemp("neuronscope")
    TEST_ENV.update({"NEURONSCOPE_CACHE": str(root / "cache"), "NEURONSCOPE_COMPILE": "0", "HF_HUB_OFFLINE": "1",
                     "TRANSFORMERS_OFFLINE": "1"})
    yield root
    shutil.rmtree(root / "cache", ignore_errors=True)


@pytest.fixture(scope="module")
def neuronscope_env(session_dir: Path) -> Iterator[None]:
    """TEST_ENV for in-process calls, for one module (`pytestmark = pytest.mark.usefixtures("neuronscope_env")`);
    module-scoped, so other test files keep the user's cache (packaged models' safetensors copies live there).
    Subprocesses get TEST_ENV from `cli_env` whatever the order fixtures are set up in."""
    mp = pytest.MonkeyPatch()
    for key, value in TEST_ENV.items():
        mp.setenv(key, value)
    mp.delenv("NEURONSCOPE_STORE", raising=False)
    yield
    mp.undo()


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for a `neuronscope` subprocess: TEST_ENV, plain output, wide lines, no colours, stacks on a crash."""
    assert TEST_ENV, "request the session_dir fixture (or neuronscope_env) first"
    env = dict(os.environ)
    for key in ("FORCE_COLOR", "CLICOLOR_FORCE", "NEURONSCOPE_DEBUG", "NEURONSCOPE_STORE", "CI"):
        env.pop(key, None)
    env.update(TEST_ENV)
    # PYTHONFAULTHANDLER: a process that dies of a native fault (SIGABRT, SIGSEGV) prints each thread's stack
    env.update({"NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "400", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"})
    env.update(extra)
    return env


@dataclass(frozen=True)
class Result:
    """A finished `neuronscope` subprocess."""

    code: int
    out: str
    err: str


def cli_command(args: Sequence[str], **engine: float) -> list[str]:
    """The command line of `neuronscope ARGS`; `engine` sets constants of neuronscope.core.jobs.engine first (a
    test's small BLOCK or SETTLE_SECONDS)."""
    if not engine:
        return [sys.executable, "-m", "neuronscope.tui.cli", *[str(a) for a in args]]
    patch = "; ".join(f"engine.{name} = {value!r}" for name, value in engine.items())
    code = (f"import sys; import neuronscope.core.jobs.engine as engine; {patch}; "
            "from neuronscope.tui.cli import main; sys.exit(main(sys.argv[1:]))")
    return [sys.executable, "-c", code, *[str(a) for a in args]]


def run_cli(args: Sequence[str], timeout: float = 120, **env: str) -> Result:
    """Run `neuronscope ARGS` in a subprocess from the repository root."""
    proc = subprocess.run(cli_command(args), capture_output=True, text=True, timeout=timeout, env=cli_env(**env),
                          cwd=Path(__file__).resolve().parent.parent)
    return Result(proc.returncode, proc.stdout, proc.stderr)


#: What a collection stores exactly (any number of shards, any batches), nearly (float sums in another order), and its
#: records in a comparable order.
NEURON_EXACT = ("layer", "neuron", "count", "max_act", "min_act", "min_excerpt_max", "histogram", "cell_counts")
NEURON_CLOSE = ("mean", "variance", "skewness", "kurtosis", "density", "sums")
RECORDS = ("SELECT layer, neuron, kind, rank, bin, excerpt_id, scale, acts, max_act, min_act FROM records "
           "WHERE run_id = ? ORDER BY layer, neuron, kind, rank")


#: Dim progress lines `collect` prints on stderr before it can fail (model load, corpus cut).
STATUS_PREFIXES = ("loading ", "verifying packaged weights", "cutting ", "skipped ", "importing neurons")


def assert_same_collection(whole: Path, store: Path) -> None:
    """The complete runs of two stores hold the same collection: statistics, records and activations."""
    with Store.open(whole, read_only=True) as one, Store.open(store, read_only=True) as two:
        runs = [(s, next(r for r in s.runs() if r.status == "complete")) for s in (one, two)]
        (_, a), (_, b) = runs
        assert (a.corpus, a.settings, a.n_excerpts) == (b.corpus, b.settings, b.n_excerpts)
        exact, close, records = ([s.con.execute(query, [r.run_id]).fetchall() for s, r in runs] for query in (
            f"SELECT {', '.join(NEURON_EXACT)} FROM neurons WHERE run_id = ? ORDER BY layer, neuron",
            f"SELECT {', '.join(NEURON_CLOSE[:-1])} FROM neurons WHERE run_id = ? ORDER BY layer, neuron", RECORDS))
        assert exact[0] == exact[1] and records[0] == records[1]
        np.testing.assert_allclose(np.array(close[0], float), np.array(close[1], float), rtol=1e-6)


def assert_one_line_error(result: Result, *needles: str) -> str:
    """Exit status 2; the failure is one line starting with 'error:' (the last on stderr, after at most the
    status lines of the steps that succeeded); no traceback; the line names the problem."""
    assert result.code == 2, f"exit {result.code}\nstdout: {result.out}\nstderr: {result.err}"
    assert "Traceback" not in result.err and "Traceback" not in result.out
    lines = result.err.strip().splitlines()
    assert lines, "nothing on stderr"
    line = lines[-1]
    assert line.startswith("error:"), f"last stderr line is not the error: {result.err!r}"
    others = [x for x in lines[:-1] if not x.startswith(STATUS_PREFIXES)]
    assert not others, f"stderr holds more than the error line: {result.err!r}"
    for needle in needles:
        assert needle.lower() in line.lower(), f"{needle!r} not in {line!r}"
    return line


# -- model and corpora -------------------------------------------------------------------------------

def build_tiny_model(folder: Path, seed: int = 0, intermediate_size: int = 48) -> Path:
    """A random-weight 3-layer Llama with a byte-level BPE tokenizer, saved as a model folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # Hostile text weighted up, so its markers take few tokens and whole copies fit in 16-token excerpts.
    tok.train_from_iterator([prose_text() + hostile_text() * 20], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    eos = tok.token_to_id("<|endoftext|>")
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=intermediate_size,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      bos_token_id=None, eos_token_id=eos, pad_token_id=None)
    with torch.random.fork_rng(), torch.no_grad():  # seeded, without touching other tests' RNG state
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
        for param in model.parameters():
            if param.dim() > 1:  # matrices and embeddings; norms stay at 1
                param.normal_(0.0, 0.3)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(session_dir: Path) -> Path:
    """Folder of the tiny model: `neuronscope collect --model FOLDER` loads it offline."""
    return build_tiny_model(session_dir / "tiny-llama")


@pytest.fixture(scope="session")
def corpus_dir(session_dir: Path) -> Path:
    """The main corpus: a folder with prose and hostile text (~330 excerpts of 16 tokens)."""
    folder = session_dir / "corpus"
    folder.mkdir()
    (folder / "a-prose.txt").write_text(prose_text(2), encoding="utf-8")
    (folder / "b-hostile.txt").write_text(hostile_text(), encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def other_corpus(session_dir: Path) -> Path:
    """A second, different corpus (one file of prose)."""
    path = session_dir / "other.txt"
    path.write_text(prose_text(3), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def big_corpus(session_dir: Path) -> Path:
    """A corpus large enough that --batch-size 1 collection takes many seconds (~3,500 excerpts: 701 took only 3 s
    on a CI machine, too short to be sure a signal lands inside the loop)."""
    path = session_dir / "big.txt"
    path.write_text(prose_text(25), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def subject(tiny_model: Path):  # type: ignore[no-untyped-def]
    """The tiny model, loaded once in this process (fp32, CPU)."""
    from neuronscope.core.models.loading import load_subject

    return load_subject(str(tiny_model), device="cpu", dtype="float32")


def fast_settings(**changes: object):  # type: ignore[no-untyped-def]
    """CollectSettings equal to what the CLI builds from FAST."""
    from neuronscope.core.records import CollectSettings

    values: dict[str, object] = {"length": 16, "top_k": 5, "bottom_k": 5, "random_k": 4, "quantile_k": 2}
    values.update(changes)
    return CollectSettings(**values)  # type: ignore[arg-type]


def collect_into(store_path: Path, subject, corpus: Path, *, settings=None, shard=(0, 1),  # type: ignore[no-untyped-def]
                 batch_size: int = 32, layers: tuple[int, ...] | None = None, reuse: bool = True):
    """Collect in-process through the core API, as `neuronscope collect` does: into the store at `store_path`, or
    for a shard (i, n) with n > 1 into a shard state folder at `store_path`."""
    from neuronscope.core.collection.collect import collect, collect_shard
    from neuronscope.core.collection.corpus import CorpusSpec
    from neuronscope.core.collection.excerpts import cut_excerpts
    from neuronscope.core.store import Store

    settings = settings or fast_settings()
    excerpts = cut_excerpts(CorpusSpec(str(corpus)), subject.tokenizer, length=settings.length,
                            max_excerpts=settings.max_excerpts, seed=settings.seed, shard=shard)
    options = {"layers": layers or tuple(range(subject.n_layers)), "settings": settings, "batch_size": batch_size,
               "reuse": reuse}
    if shard[1] > 1:
        return collect_shard(store_path, subject, excerpts, shard=shard, **options)
    with Store.open(store_path) as store:
        return collect(store, subject, excerpts, **options)


@pytest.fixture(scope="module")
def job_store(tmp_path_factory: pytest.TempPathFactory, subject, corpus_dir: Path) -> Path:  # type: ignore[no-untyped-def]
    """A collection of the tiny model with records enough for the default splits (tests that write copy it)."""
    path = tmp_path_factory.mktemp("jobs") / "jobs.duckdb"
    collect_into(path, subject, corpus_dir, settings=fast_settings(top_k=12, random_k=8, bottom_k=4))
    return path


def copy_store(source: Path, folder: Path, name: str) -> Path:
    """A copy of a store under another name, for a test that writes to it."""
    path = folder / name
    shutil.copy(source, path)
    return path


@pytest.fixture(scope="session")
def cli_store(session_dir: Path, tiny_model: Path, corpus_dir: Path) -> tuple[Path, Result]:
    """One store filled by a real `neuronscope collect` of the tiny model over the main corpus."""
    path = session_dir / "cli.duckdb"
    result = run_cli(["collect", "--model", tiny_model, "--corpus", corpus_dir, "--store", path, *FAST])
    assert result.code == 0, result.err
    return path, result


@pytest.fixture
def fresh_store(cli_store: tuple[Path, Result], tmp_path: Path) -> Path:
    """A copy of the CLI store with nothing explained yet."""
    path = tmp_path / "jobs.duckdb"
    shutil.copy(cli_store[0], path)
    return path


@pytest.fixture(scope="session")
def scored_store(cli_store: tuple[Path, Result], session_dir: Path) -> Path:
    """A copy of the CLI store in which a baseline explain/score job ran on five neurons (the app's tests only
    read it; those that write copy it first)."""
    path = session_dir / "scored.duckdb"
    shutil.copy(cli_store[0], path)
    result = run_cli(["run", "--explainer", "baseline", "--limit", "5", "--store", str(path)])
    assert result.code == 0, result.err
    return path


def run_rows(store: Store, run_id: int) -> dict[str, list[tuple]]:  # type: ignore[type-arg]
    """Every row a run owns, in a stable order (for before/after comparisons)."""
    orders = {"neurons": "layer, neuron", "records": "layer, neuron, kind, rank", "excerpts": "excerpt_id"}
    return {
        table: store.con.execute(f"SELECT * FROM {table} WHERE run_id = ? ORDER BY {order}", [run_id]).fetchall()
        for table, order in orders.items()
    }


def orphan_records(store: Store) -> int:
    """Records whose excerpt is not stored in the same run (runs must never mix)."""
    return store.con.execute(
        "SELECT count(*) FROM records r LEFT JOIN excerpts e ON e.run_id = r.run_id AND e.excerpt_id = r.excerpt_id "
        "WHERE e.excerpt_id IS NULL"
    ).fetchall()[0][0]


# -- a planted-neuron model: ground truth for explain/score --------------------------------------------

#: Words whose tokens the planted model's layer-0 neurons 0, 1, 2 fire on (each one token in the tiny vocabulary).
PLANTED_WORDS = (" the", " a", ",")


def build_planted_model(folder: Path) -> Path:
    """The tiny model with layer-0 neurons 0..2 wired to fire only on the tokens of PLANTED_WORDS: the token's
    embedding alone carries residual dimension i, attention never writes it, and neuron i's gate and up
    projections read only that dimension, so its activation is silu(4x)*4x there and exactly 0 elsewhere.
    Every other neuron keeps its random weights."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    build_tiny_model(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = []
    for word in PLANTED_WORDS:
        pieces = tok.encode(word, add_special_tokens=False)
        assert len(pieces) == 1, f"{word!r} is {len(pieces)} tokens in the tiny vocabulary"
        ids.append(pieces[0])
    layer = model.model.layers[0]
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        for i, token_id in enumerate(ids):
            embed[:, i] = 0.0
            embed[token_id, i] = 30.0  # dominates the token's RMS norm, so the neuron's input is nearly constant
            layer.self_attn.o_proj.weight[i, :] = 0.0
            layer.mlp.gate_proj.weight[i, :] = 0.0
            layer.mlp.up_proj.weight[i, :] = 0.0
            layer.mlp.gate_proj.weight[i, i] = 4.0
            layer.mlp.up_proj.weight[i, i] = 4.0
            # No other neuron reads a planted dimension, so they stay unrelated to the planted tokens.
            layer.mlp.gate_proj.weight[len(ids):, i] = 0.0
            layer.mlp.up_proj.weight[len(ids):, i] = 0.0
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def planted_model(session_dir: Path) -> Path:
    """Folder of the planted-neuron model."""
    return build_planted_model(session_dir / "planted-llama")


@pytest.fixture(scope="session")
def planted_store(session_dir: Path, planted_model: Path, corpus_dir: Path) -> Path:
    """A store with one collection of the planted model (top/random records large enough for the splits)."""
    path = session_dir / "planted.duckdb"
    result = run_cli(["collect", "--model", planted_model, "--corpus", corpus_dir, "--store", path,
                      "--length", "16", "--top-k", "16", "--bottom-k", "4", "--random-k", "10", "--quantile-k", "1",
                      "--dtype", "float32", "--device", "cpu"])
    assert result.code == 0, result.err
    return path


@pytest.fixture(scope="module")
def sampled() -> tuple[Any, Any]:
    """Awkward random activations [600, 10, 12] and their excerpt ids (tests/sampling_data.py), for the sampler and
    summary tests."""
    from sampling_data import SETTINGS, make_data

    return make_data(600, SETTINGS.length, 12, seed=1)


@pytest.fixture(scope="module")
def sampled_state(sampled: tuple[Any, Any]) -> Any:
    """The state of one LayerAccumulator run over `sampled`, streamed in uneven batches."""
    from sampling_data import SETTINGS, accumulate

    acts, ids = sampled
    return accumulate(acts, ids, SETTINGS)
