"""Key press to painted screen, where the person is: `neuronscope browse` in a real terminal (a private tmux server,
120 x 40, TERM=xterm-256color), keys sent with `send-keys` and the screen read with `capture-pane` until it shows
what the key asked for. Each time runs from just before the key is sent to the first capture that shows the whole
result, so it includes tmux's own delivery and one capture (a few ms: the resolution of this harness).

Used by `python bench/tui.py --terminal`; `tests/test_app_latency.py` runs it on a small store in CI.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

WIDTH, HEIGHT = 120, 40
#: The longest any one screen may take before the harness gives up (a slow CI machine's first start included).
DEADLINE = 60.0
#: Targets at p95 (ms): opening and stepping; sorts, filters and searches; a page of the table (30 pages/s).
OPEN_MS, SORT_MS, PAGE_MS = 100.0, 150.0, 1000.0 / 30

#: Seconds the harness "reads" a neuron before `]` or `[`: the app reads the neighbours ahead meanwhile, as it does
#: while a person reads (pressing `]` several times at once waits for each read, as at the first opening).
READING = 0.3
#: How long Textual waits after an escape byte for the rest of a key's sequence ($ESCDELAY, default 100 ms): the escape
#: key alone cannot be faster than this in any terminal app, so its target allows for it.
ESCDELAY_MS = float(os.environ.get("ESCDELAY", "100"))
Row = tuple[str, str, list[float], float]  # group, name, seconds, target ms
_TITLE = re.compile(r"^\s*(?:latent )?(L\d+/N\d+)  ·  run \d+", re.MULTILINE)
_ROW = re.compile(r"^ ?[ ●](L\d+/N\d+) ", re.MULTILINE)


class Terminal:
    """One `neuronscope browse STORE` in a detached tmux session of its own server."""

    def __init__(self, store: Path) -> None:
        tmux = shutil.which("tmux")
        if tmux is None:
            raise SystemExit("the terminal benchmark needs tmux: apt-get install tmux")
        self.base = [tmux, "-L", f"neuronscope-bench-{os.getpid()}-{uuid.uuid4().hex[:8]}", "-f", "/dev/null"]
        env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "COLUMNS", "LINES", "TMUX", "TMUX_PANE")}
        env["TERM"] = "xterm-256color"
        command = [sys.executable, "-m", "neuronscope.tui.cli", "browse", str(store)]
        self._tmux("start-server", ";", "set-option", "-g", "default-terminal", "xterm-256color", ";",
                   "new-session", "-d", "-s", "bench", "-x", str(WIDTH), "-y", str(HEIGHT), *command, env=env)

    def _tmux(self, *args: str, env: dict[str, str] | None = None) -> str:
        proc = subprocess.run([*self.base, *args], capture_output=True, text=True, timeout=DEADLINE, env=env)
        if proc.returncode:
            raise SystemExit(f"tmux {args[0]}: {proc.stderr.strip()}")
        return proc.stdout

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "bench")

    def send(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "bench", *keys)

    def timed(self, keys: tuple[str, ...], done: Callable[[str], bool], what: str) -> float:
        """Seconds from sending `keys` to the screen satisfying `done`."""
        started = time.perf_counter()
        self.send(*keys)
        return self.wait(done, what, started)

    def wait(self, done: Callable[[str], bool], what: str, started: float | None = None,
             deadline: float | None = None) -> float:
        """Seconds until the screen satisfies `done`; past `deadline` seconds a TimeoutError, past DEADLINE the end."""
        started = time.perf_counter() if started is None else started
        while True:
            screen = self.screen()
            if done(screen):
                return time.perf_counter() - started
            if deadline is not None and time.perf_counter() - started > deadline:
                raise TimeoutError(what)
            if time.perf_counter() - started > DEADLINE:
                raise SystemExit(f"no {what} within {DEADLINE:.0f} s; the screen:\n{screen}")
            time.sleep(0.001)

    def type_in(self, text: str, shown: Callable[[str], bool], empty: Callable[[str], bool], what: str) -> None:
        """Type into the field a form just opened, until the screen shows `text` there. Keys that arrive before the
        form has focused its field are dropped: they are typed again (after 5 s). A field that shows something else
        (what came late, or in part) is emptied with ctrl+u first, and typed into once the screen shows it empty
        (before the app's fields kept their keys in order, a ctrl+u sent with the letters emptied the field after
        them)."""
        def attempt() -> None:
            if not empty(self.screen()):
                self.empty_field(empty, what)
            self.send("-l", text)

        self._retried(attempt, shown, what, 5.0)  # long enough for slow letters to land before the next try's

    def empty_field(self, empty: Callable[[str], bool], what: str) -> None:
        """ctrl+u in the field a form just opened, until the screen shows it empty (sent again if it came before the
        form focused its field)."""
        self._retried(lambda: self.send("C-u"), empty, what, 1.0)

    def _retried(self, attempt: Callable[[], None], done: Callable[[str], bool], what: str, deadline: float) -> None:
        """`attempt()` until the screen satisfies `done` within `deadline` seconds of one, 20 times at most."""
        for _ in range(20):
            attempt()
            try:
                self.wait(done, what, deadline=deadline)
                return
            except TimeoutError:
                continue
        raise SystemExit(f"no {what}; the screen:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True, timeout=DEADLINE)


def _title(screen: str) -> str | None:
    """The neuron a neuron screen shows, once its content is painted (its statistics below the title)."""
    found = _TITLE.search(screen)
    return found.group(1) if found and "histogram" in screen else None


def _table(screen: str) -> list[str]:
    """The neurons the table shows, once the table is painted (its column names on screen)."""
    return _ROW.findall(screen) if "score [95% CI]" in screen else []


def _status(screen: str) -> str:
    """The table's status line, without the note that a sort or filter is still being read (the rows have not
    changed yet then)."""
    line = next((line for line in screen.splitlines() if " neuron" in line and " · by " in line), "")
    return line.replace(" · reading…", "")


def measure(store: Path, repeat: int, search: str, layers: tuple[int, int]) -> list[Row]:
    """Key to painted screen for each operation of the triage loop, `repeat` times each."""
    rows: dict[str, list[float]] = {name: [] for name in (
        "enter", "escape", "back ⌫", "next ]", "previous [", "sort s", "filter f", "search /", "page down")}
    term = Terminal(store)
    try:
        term.wait(lambda s: bool(_table(s)), "table")
        for _ in range(repeat):
            first = _table(term.screen())[0]
            rows["enter"].append(term.timed(("Enter",), lambda s, n=first: _title(s) == n, "neuron screen"))
            for step, name in (("]", "next ]"), ("[", "previous [")):
                time.sleep(READING)
                before = _title(term.screen())
                rows[name].append(term.timed((step,), lambda s, b=before: _title(s) not in (None, b), name))
            rows["escape"].append(term.timed(("Escape",), lambda s: bool(_table(s)) and _title(s) is None, "table"))
            rows["enter"].append(term.timed(("Enter",), lambda s, n=first: _title(s) == n, "neuron screen"))
            rows["back ⌫"].append(term.timed(("BSpace",), lambda s: bool(_table(s)) and _title(s) is None, "table"))
            before_status = _status(term.screen())
            rows["sort s"].append(term.timed(("s",), lambda s, b=before_status: _status(s) != b and bool(_table(s)),
                                             "sorted table"))
            term.send("f")
            term.wait(lambda s: "Filter neurons" in s, "filter form")
            typed = f"█ {layers[0]}..{layers[1]} "  # in the form's layers field (inside its border), nowhere else
            term.type_in(f"{layers[0]}..{layers[1]}", lambda s, t=typed: t in s, lambda s: "empty: all" in s,
                         "typed layers")
            wanted = f"L{layers[0]}..{layers[1]}" if layers[0] != layers[1] else f"L{layers[0]}"
            rows["filter f"].append(term.timed(("Enter",), lambda s: wanted in _status(s) and bool(_table(s)),
                                               "filtered table"))
            term.send("f")
            term.wait(lambda s: "Filter neurons" in s, "filter form")
            term.empty_field(lambda s: "empty: all" in s, "cleared layers")  # the field's placeholder: it is empty
            term.send("Enter")
            term.wait(lambda s: wanted not in _status(s) and bool(_table(s)), "unfiltered table")
            term.send("/")
            term.wait(lambda s: "▊▔" in s, "search box")
            term.type_in(search, lambda s: any(line.startswith("▊") and search in line for line in s.splitlines()),
                         lambda s: "search explanations (enter" in s, "typed search")
            rows["search /"].append(term.timed(("Enter",), lambda s: f"/{search}" in _status(s), "searched table"))
            term.send("/")
            term.wait(lambda s: "▊▔" in s, "search box")
            term.empty_field(lambda s: "search explanations (enter" in s, "cleared search")
            term.send("Enter")
            term.wait(lambda s: f"/{search}" not in _status(s) and bool(_table(s)), "table without the search")
            term.send("Home", "PageDown")  # the cursor to the last row shown: the next PageDown scrolls a page
            term.wait(lambda s: bool(_table(s)), "table")
            time.sleep(0.2)
            top = _table(term.screen())[0]
            rows["page down"].append(term.timed(("PageDown",), lambda s, t=top: bool(_table(s)) and _table(s)[0] != t,
                                                "next page"))
            term.send("Home")
            term.wait(lambda s, t=top: bool(_table(s)) and _table(s)[0] == t, "first page")
    finally:
        term.close()
    targets = {"enter": OPEN_MS, "escape": OPEN_MS + ESCDELAY_MS, "back ⌫": OPEN_MS, "next ]": OPEN_MS, "previous [": OPEN_MS, "sort s": SORT_MS,
               "filter f": SORT_MS, "search /": SORT_MS, "page down": PAGE_MS}
    return [("terminal", name, times, targets[name]) for name, times in rows.items()]

