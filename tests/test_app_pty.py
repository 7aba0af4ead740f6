"""The real `neuronscope browse` in a pseudo-terminal: tmux runs the command in a detached 100×30 session, the
test sends keys with `send-keys` and reads the screen with `capture-pane`, as a user at a terminal would see it
(TERM=xterm-256color, colours on, no COLUMNS). Open a neuron, go back, search, quit with status 0; a missing
store is one error line, no traceback.

tmux is required (Debian: apt-get install tmux; .ci/run installs it): the tests fail, never skip, without it.
Each test uses its own tmux server (a unique -L socket, -f /dev/null so no user configuration applies) and
kills it when done. Screens are polled against a deadline; nothing waits a fixed time.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import cli_command, cli_env, copy_store

from neuronscope.core.ids import NeuronId
from neuronscope.core.store import Store
from neuronscope.core.store.browse import BrowseQuery
from neuronscope.core.store.triage import MARKS_LIST

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.usefixtures("neuronscope_env"), pytest.mark.terminal]
WIDTH, HEIGHT = 100, 30
#: Seconds any one screen may take to appear (the app starts in under 2 s; CI machines can be slow).
DEADLINE = 30.0
POLL = 0.05


@pytest.fixture(scope="module")
def tmux() -> str:
    """The tmux executable; a missing tmux fails the tests with what to install."""
    path = shutil.which("tmux")
    if path is None:
        pytest.fail("tmux is not installed, and the pty tests of the app need it: apt-get install tmux", pytrace=False)
    return path


def terminal_env() -> dict[str, str]:
    """`cli_env` as a user's terminal has it: a real TERM, colours allowed, the width left to the terminal."""
    env = cli_env(TERM="xterm-256color")
    for key in ("NO_COLOR", "COLUMNS", "LINES", "TMUX", "TMUX_PANE"):
        env.pop(key, None)
    return env


class Pane:
    """The one pane of a private tmux server, running one command; its exit status goes to `status_file`."""

    def __init__(self, tmux: str, socket: str, status_file: Path) -> None:
        self.base = [tmux, "-L", socket, "-f", "/dev/null"]
        self.status_file = status_file
        self.socket_path: Path | None = None
        """The server's socket file, known once it started (tmux leaves it behind; `close` removes it)."""

    def tmux(self, *args: str, env: dict[str, str] | None = None) -> str:
        """Run a tmux command against this server; its stdout."""
        proc = subprocess.run([*self.base, *args], capture_output=True, text=True, timeout=DEADLINE, env=env)
        assert proc.returncode == 0, f"tmux {' '.join(args)}: exit {proc.returncode}: {proc.stderr}"
        return proc.stdout

    def start(self, argv: Sequence[str], env: dict[str, str]) -> None:
        """Start the server (with `env` as its environment) and the command in a detached WIDTH×HEIGHT session.
        A shell around the command writes its exit status to the status file (tmux 3.3's #{pane_dead_status} is
        sometimes never set when the process exits quickly); the pane stays after the command exits
        (remain-on-exit), so its last screen can be read."""
        wrapper = ["sh", "-c", '"$@"; echo "$?" > "$0.tmp" && mv "$0.tmp" "$0"', str(self.status_file), *argv]
        self.tmux("start-server", ";", "set-option", "-g", "remain-on-exit", "on", ";",
                  "set-option", "-g", "default-terminal", env["TERM"], ";",
                  "new-session", "-d", "-s", "main", "-x", str(WIDTH), "-y", str(HEIGHT), "-c", str(ROOT), *wrapper,
                  env=env)
        self.socket_path = Path(self.tmux("display-message", "-p", "#{socket_path}").strip())

    def close(self) -> None:
        """Kill the server and remove its socket file."""
        subprocess.run([*self.base, "kill-server"], capture_output=True, timeout=DEADLINE)
        if self.socket_path is not None:
            self.socket_path.unlink(missing_ok=True)

    def capture(self) -> str:
        """The text on screen (no colours), history included, wrapped lines joined, trailing blanks cut."""
        text = self.tmux("capture-pane", "-p", "-J", "-S", "-", "-t", "main")
        return "\n".join(line.rstrip() for line in text.splitlines()).strip("\n")

    def send(self, *keys: str, literal: bool = False) -> None:
        """Type keys (tmux key names such as Enter and Escape, or literal text)."""
        self.tmux("send-keys", "-t", "main", *(["-l"] if literal else []), *keys)

    def exit_status(self) -> int | None:
        """The command's exit status once it has exited and tmux has read all its output, else None."""
        if not self.status_file.exists():
            return None
        dead = self.tmux("display-message", "-p", "-t", "main", "#{pane_dead}").strip()
        return int(self.status_file.read_text()) if dead == "1" else None

    def wait_for(self, check: Callable[[str], bool], what: str) -> str:
        """Poll the screen until `check` accepts it; fail after DEADLINE seconds, showing the last screen."""
        end = time.monotonic() + DEADLINE
        while True:
            screen = self.capture()
            if check(screen):
                return screen
            if time.monotonic() > end:
                pytest.fail(f"no {what} after {DEADLINE:.0f} s; the screen:\n{screen}", pytrace=False)
            time.sleep(POLL)

    def wait_exit(self) -> tuple[int, str]:
        """Wait until the command exits; its exit status and last screen."""
        end = time.monotonic() + DEADLINE
        while (status := self.exit_status()) is None:
            if time.monotonic() > end:
                pytest.fail(f"the app did not exit in {DEADLINE:.0f} s; the screen:\n{self.capture()}", pytrace=False)
            time.sleep(POLL)
        return status, self.capture()


@contextmanager
def browse(tmux: str, store: Path, folder: Path) -> Iterator[Pane]:
    """`neuronscope browse STORE` running in a fresh tmux server, killed afterwards whatever happened; its exit
    status goes to a file in `folder`."""
    pane = Pane(tmux, f"neuronscope-test-{os.getpid()}-{uuid.uuid4().hex[:8]}", folder / "exit-status")
    try:
        pane.start(cli_command(["browse", str(store)]), terminal_env())
        yield pane
    finally:
        pane.close()


def neuron_rows(screen: str) -> list[str]:
    """The neurons the table lists on screen, top to bottom (lines that start with `L<layer>/N<neuron> `)."""
    return [m.group(1) for m in re.finditer(r"^ ?(L\d+/N\d+) ", screen, re.MULTILINE)]


def test_browse_keys_in_a_terminal(tmux: str, scored_store: Path, tmp_path: Path) -> None:
    """j j enter opens the third neuron's screen, escape goes back, / WORD enter lists the neurons whose explanation
    holds WORD, q quits with status 0 and gives the terminal its screen back. The checks read the neurons listed,
    not the wording of headers, so they hold while the layout changes."""
    with Store.open(scored_store, read_only=True) as store:
        run_id = store.run().run_id
        first = [f"L{r.layer}/N{r.neuron}" for r in store.neuron_rows(run_id, BrowseQuery(), limit=3)]
        best = store.summaries(run_id, limit=1)[0]
        word = best.text.split()[1]  # a token of the baseline's explanation, e.g. '"W"'
        found = [f"L{r.layer}/N{r.neuron}" for r in store.neuron_rows(run_id, BrowseQuery(search=word), limit=50)]
        total = store.neuron_count(run_id)
    assert f"L{best.layer}/N{best.neuron}" in found and 1 <= len(found) < min(total, HEIGHT // 2)

    def table_shown(screen: str) -> bool:
        return neuron_rows(screen)[:3] == first and "Top excerpts" not in screen

    with browse(tmux, scored_store, tmp_path) as pane:
        table = pane.wait_for(table_shown, "neuron table")
        assert f"{total:,}" in table and "Traceback" not in table

        pane.send("j", "j", "Enter")
        neuron = pane.wait_for(lambda s: first[2] in s and "Top excerpts" in s, f"screen of {first[2]}")
        assert not {first[0], first[1]} & set(neuron_rows(neuron))  # a screen of its own, not the table

        pane.send("Escape")
        before = pane.wait_for(table_shown, "table again")

        pane.send("/")
        pane.wait_for(lambda s: s != before, "search box")
        pane.send(word, literal=True)
        pane.wait_for(lambda s: word in s, f"{word} typed in the search box")
        pane.send("Enter")
        pane.wait_for(lambda s: neuron_rows(s) == found, f"table searched for {word}: {found}")

        pane.send("q")
        status, last = pane.wait_exit()
        assert status == 0, last
        assert "Traceback" not in last and not neuron_rows(last)  # the terminal's own screen is back


def test_missing_store_is_one_line(tmux: str, tmp_path: Path) -> None:
    missing = tmp_path / "missing.duckdb"
    with browse(tmux, missing, tmp_path) as pane:
        status, last = pane.wait_exit()
    lines = [line for line in last.splitlines() if line.strip() and not line.startswith("Pane is dead")]
    assert status == 2, last
    assert "Traceback" not in last
    assert len(lines) == 1 and lines[0].startswith("error:") and "no store" in lines[0].lower(), last
    assert not missing.exists()


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc: no procps needed)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[-1].split()[1])  # after the name, which may hold anything
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
        if parent == pid:
            found.append(int(stat.parent.name))
    return found


def test_sigterm_gives_the_terminal_back(tmux: str, scored_store: Path, tmp_path: Path) -> None:
    """SIGTERM to the app (`kill`, a scheduler's cancel): it quits as q does, and the terminal gets its own screen
    back with one line saying why, exit status 130. Dying on the spot left the app's screen, and the terminal's
    modes with it."""
    with browse(tmux, scored_store, tmp_path) as pane:
        pane.wait_for(lambda s: len(neuron_rows(s)) > 3, "neuron table")
        shell = pane.tmux("display-message", "-p", "-t", "main", "#{pane_pid}").strip()
        app = children(int(shell))
        assert len(app) == 1, app
        os.kill(app[0], signal.SIGTERM)
        status, last = pane.wait_exit()
    lines = [line for line in last.splitlines() if line.strip() and not line.startswith("Pane is dead")]
    assert status == 130, last
    assert lines == ["interrupted: SIGTERM closed the app; what its jobs finished is kept, and starting them again "
                     "resumes them"], last


def test_a_closed_terminal_quits_as_q_does(tmux: str, scored_store: Path, tmp_path: Path) -> None:
    """The terminal closes under the app (an SSH connection drops; here tmux kills the session, and the kernel sends
    SIGHUP): it quits as q does, with nothing left to draw on, and keeps what it held. A mark saves a second after
    it changes; one made just before the hangup is in the store, where dying on the spot lost it."""
    store = copy_store(scored_store, tmp_path, "marked.duckdb")
    with browse(tmux, store, tmp_path) as pane:
        screen = pane.wait_for(lambda s: len(neuron_rows(s)) > 3, "neuron table")
        first = neuron_rows(screen)[0]
        app = children(int(pane.tmux("display-message", "-p", "-t", "main", "#{pane_pid}").strip()))
        assert len(app) == 1, app
        pane.send("m")
        pane.wait_for(lambda s: re.search(rf"^●{first} ", s, re.MULTILINE) is not None, f"{first} marked")
        pane.tmux("kill-session", "-t", "main")
        end = time.monotonic() + DEADLINE
        while Path(f"/proc/{app[0]}").exists() and time.monotonic() < end:
            time.sleep(POLL)
        assert not Path(f"/proc/{app[0]}").exists(), "the app did not exit after its terminal closed"
    layer, neuron = (int(part) for part in re.findall(r"\d+", first))
    with Store.open(store, read_only=True) as opened:
        assert opened.list_neurons(opened.run().run_id, MARKS_LIST) == [NeuronId(layer, neuron)]
