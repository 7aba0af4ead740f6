"""A person's tags and notes on neurons (`neuronscope tag`, `tags`, shown by `show`; exports carry them, see
test_import_export.py): kept in the store with author and time, listed and filtered, taken off, and inert text."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import assert_one_line_error, cli_command, cli_env, copy_store, run_cli

from neuronscope.core.ids import NeuronId
from neuronscope.core.store import Store

pytestmark = pytest.mark.usefixtures("neuronscope_env")
HOSTILE = "[bold]loud[/bold] \x1b[31mred"


def test_tags_and_notes_persist_list_and_come_off(cli_store: tuple[Path, object], tmp_path: Path) -> None:
    store = copy_store(cli_store[0], tmp_path, "s.duckdb")
    assert run_cli(["tag", "0/1", "1/2", "wrong", "--note", "fires on dates too", "--author", "ada",
                    "--store", store]).code == 0
    noted = run_cli(["tag", "0/1", "--note", HOSTILE, "--store", store])
    assert noted.code == 0 and "noted 1 neuron" in noted.err, noted.err
    tagged = run_cli(["tag", "L2/N3", "good", "--author", "bo\x1b]0;title\x07", "--store", store])
    assert tagged.code == 0 and tagged.err.strip().endswith("as bo\\x1b]0;title\\x07"), tagged.err  # inert
    assert run_cli(["tag", "0/4", "--note", "a note alone", "--store", store]).code == 0
    with Store.open(store, read_only=True) as opened:
        run_id = opened.run().run_id
        found = opened.tags(run_id)
        assert [(t.layer, t.neuron, t.tag, t.author) for t in found[:2]] == [(0, 1, "wrong", "ada"),
                                                                             (1, 2, "wrong", "ada")]
        assert found[2].tag == "" and found[2].note == HOSTILE and found[2].author  # $USER by default
        assert [t.neuron for t in opened.tags(run_id, tag="wrong")] == [1, 2]
        assert [(t.tag, t.author) for t in opened.tags(run_id, [NeuronId(2, 3)])] == [("good", "bo\x1b]0;title\x07")]
        rows = {(r.layer, r.neuron): r for r in opened.neuron_rows(run_id, limit=1000)}
        assert (rows[(0, 1)].tags, rows[(0, 1)].noted) == (("wrong",), True)  # the table's view of them
        assert (rows[(2, 3)].tags, rows[(2, 3)].noted) == (("good",), False) and not rows[(0, 2)].tags
        assert (rows[(0, 4)].tags, rows[(0, 4)].noted) == ((), True)

    listed = run_cli(["tags", "--tag", "wrong", "--store", store])  # piped: a tab-separated line each
    rows = [line.split("\t") for line in listed.out.splitlines()]
    assert listed.code == 0 and [row[:4] for row in rows] == [["0/1", "wrong", "fires on dates too", "ada"],
                                                              ["1/2", "wrong", "fires on dates too", "ada"]], listed.out
    everything = run_cli(["tags", "--store", store])
    assert "[bold]loud[/bold]" in everything.out and "\x1b[31m" not in everything.out  # shown literally
    assert all(len(line.split("\t")) == 5 for line in everything.out.splitlines()), everything.out  # tabs escaped
    shown = run_cli(["show", "0/1", "--store", store])
    assert shown.code == 0 and "tag wrong  fires on dates too  (ada, " in " ".join(shown.out.split("\n"))
    assert "[bold]loud[/bold]" in shown.out and "\x1b[31m" not in shown.out

    removed = run_cli(["tag", "0/1", "1/2", "wrong", "--remove", "--store", store])
    assert removed.code == 0 and "took 'wrong' off 2 taggings" in removed.err
    assert run_cli(["tags", "--tag", "wrong", "--store", store]).err.startswith("no tags or notes")
    with Store.open(store, read_only=True) as opened:  # the notes written with the tag stay, as notes alone
        assert [(t.neuron, t.tag, t.note) for t in opened.tags(run_id) if t.note == "fires on dates too"] == [
            (1, "", "fires on dates too"), (2, "", "fires on dates too")]


def test_many_neurons_are_tagged_from_stdin_or_a_saved_list(cli_store: tuple[Path, object], tmp_path: Path) -> None:
    """Tens of thousands of neurons pass no command line: `-` reads them from stdin, `--list` takes a saved list's."""
    store = copy_store(cli_store[0], tmp_path, "s.duckdb")
    piped = subprocess.run(cli_command(["tag", "-", "polysemantic", "--store", store]), input="0/1 0/2\nL1/N3\n",
                           capture_output=True, text=True, env=cli_env(), timeout=120)
    assert piped.returncode == 0 and "tagged 'polysemantic' 3 neurons" in piped.stderr, piped.stderr
    empty = subprocess.run(cli_command(["tag", "-", "polysemantic", "--store", store]), input="", capture_output=True,
                           text=True, env=cli_env(), timeout=120)
    assert empty.returncode == 2 and empty.stderr.strip() == "error: there are no neurons to tag: stdin was empty"
    with Store.open(store) as opened:
        run_id = opened.run().run_id
        opened.save_list(run_id, "odd", [NeuronId(0, 5), NeuronId(2, 7)], "ada")
    listed = run_cli(["tag", "--list", "odd", "wrong", "--store", store])
    assert listed.code == 0 and "tagged 'wrong' 2 neurons" in listed.err, listed.err
    with Store.open(store, read_only=True) as opened:
        assert {(t.layer, t.neuron) for t in opened.tags(run_id, tag="polysemantic")} == {(0, 1), (0, 2), (1, 3)}
        assert {(t.layer, t.neuron) for t in opened.tags(run_id, tag="wrong")} == {(0, 5), (2, 7)}
    assert_one_line_error(run_cli(["tag", "--list", "none", "wrong", "--store", store]), "has no list 'none'")


def test_bad_tags_are_one_line(cli_store: tuple[Path, object], tmp_path: Path) -> None:
    store = copy_store(cli_store[0], tmp_path, "s.duckdb")
    assert_one_line_error(run_cli(["tag", "0/1", "not a tag!", "--store", store]), "is not a tag", "good, wrong")
    assert_one_line_error(run_cli(["tag", "0/1", "--store", store]), "pass a tag, --note, or both")
    assert_one_line_error(run_cli(["tag", "good", "--store", store]), "name the neurons to tag")
    assert_one_line_error(run_cli(["tag", "9/0", "good", "--store", store]), "has no neuron L9/N0")


def test_a_store_from_before_the_triage_tables_reads_and_writes_them(cli_store: tuple[Path, object],
                                                                      tmp_path: Path) -> None:
    store = copy_store(cli_store[0], tmp_path, "old.duckdb")
    with Store.open(store) as opened:  # as stores written before tags and lists were
        opened.con.execute("DROP TABLE tags; DROP TABLE lists")
        run_id = opened.run().run_id
    with Store.open(store, read_only=True) as shared:  # the app's open: nothing yet, and it writes beside the store
        assert shared.tags(run_id) == [] and shared.saved_lists(run_id) == [] and shared.list_neurons(run_id, "x") is None
        shared.add_tags(run_id, [NeuronId(0, 1)], "good", "", "ada")
        shared.add_tags(run_id, [NeuronId(0, 3)], "wrong", "a note kept", "ada")
        shared.add_tags(run_id, [NeuronId(0, 5)], "wrong", "", "ada")
        assert shared.remove_tags(run_id, [NeuronId(0, 3), NeuronId(0, 5)], "wrong") == 2
        shared.save_list(run_id, "marked", [NeuronId(0, 2)], "ada")
        kept = [("good", ""), ("", "a note kept")]  # the removal took the tags off, and kept the note
        assert [(t.tag, t.note) for t in shared.tags(run_id)] == kept
        assert shared.list_neurons(run_id, "marked") == [NeuronId(0, 2)]
    listed = run_cli(["tags", "--store", store])
    assert listed.code == 0 and "good" in listed.out
    with Store.open(store) as opened:  # a writable open makes the tables and folds the spool into them
        assert [(t.tag, t.note) for t in opened.tags(run_id)] == kept and opened.list_neurons(run_id, "marked") == [NeuronId(0, 2)]
