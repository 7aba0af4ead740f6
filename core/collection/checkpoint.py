"""Checkpoints of a collection in progress, so a run of hours survives a crash, a preemption or `kill -9`.

Now and then (`every` seconds) the collector writes its state: every layer's LayerResult so far and how many of
the run's excerpts it has folded in, into a folder beside the store. Running the same command again finds the
checkpoint of the same collection (model revision, corpus, settings, layers, shard and excerpt list), absorbs
its layers into fresh accumulators and goes on from the next excerpt. The state is a deterministic function of
the excerpts offered, as for shard merges, so the final store is the one an uninterrupted run writes.

Each checkpoint is written whole into a folder of its own, then named in `current` (replaced atomically), then
older ones are deleted: a kill at any moment leaves the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neuronscope.core.collection.state import DAMAGED, load_layer, save_layer
from neuronscope.core.layerdata import LayerResult

FORMAT = 2


@dataclass(frozen=True)
class Resumed:
    """A checkpoint read back: the first `done` excerpts are in `layers`."""

    done: int
    layers: dict[int, LayerResult]


class Checkpoints:
    """The checkpoints of collections into one store: a folder beside it."""

    def __init__(self, store: str | Path, every: float, warn: Callable[[str], None] = print) -> None:
        """`warn` is told, in one line, of a checkpoint the disk refused."""
        store = Path(store)
        self.folder = store.with_name(store.name + ".checkpoint")
        self.every = every
        self.warn = warn
        self.started = self.last = time.monotonic()
        #: The folder holds another collection's checkpoint, which this one has not replaced (yet): clear leaves it.
        self.foreign = False
        #: The excerpts the folder's checkpoint of this collection holds, once one was saved or resumed from.
        self.held = 0
        #: Whether a pass that ends must save its state however short it was (its store is held by another
        #: process, so its write waits: store_write.aside).
        self.keep_finished: Callable[[], bool] = lambda: False

    def due(self, finished: bool = False) -> bool:
        """Whether to write a checkpoint now: `every` seconds after the last one, and once more when a pass that ran
        that long has `finished` (so a store write that fails, on a full disk say, costs no collecting: the same
        command goes straight to the write), or one that must keep its state (`keep_finished`)."""
        now = time.monotonic()
        return now - (self.started if finished else self.last) >= self.every or (finished and self.keep_finished())

    def save(self, identity: str, done: int, layers: Iterable[LayerResult]) -> bool:
        """Write a checkpoint of `identity` after `done` excerpts. False where the disk refused it (full, read-only,
        a file where the folder goes): the collection's state is still in memory, so the run goes on, and the next
        checkpoint is tried `every` seconds later; what was half written goes, the previous checkpoint stays."""
        name = f"{done:012d}-{os.getpid()}"
        staged = self.folder / f".{name}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            staged.mkdir(exist_ok=True)
            for result in layers:
                save_layer(staged / f"layer-{result.layer}.npz", result)
            (staged / "meta.json").write_text(json.dumps({"format": FORMAT, "identity": identity, "done": done}))
            os.rename(staged, self.folder / name)
            pointer = self.folder / f".current.{os.getpid()}"
            pointer.write_text(name)
            os.replace(pointer, self.folder / "current")
            self.foreign, self.held = False, done
        except OSError as err:
            shutil.rmtree(staged, ignore_errors=True)
            self.warn(f"could not write a checkpoint after {done:,} excerpts in {self.folder} ({err.strerror or err}): "
                      f"the collection goes on and tries again in {self.every:g} s")
            return False
        finally:
            self.last = time.monotonic()
        for old in self.folder.iterdir():
            if old.name not in (name, "current") and not old.name.startswith(".current"):
                shutil.rmtree(old, ignore_errors=True)
        return True

    def load(self, identity: str) -> Resumed | None:
        """The latest checkpoint of this collection, if there is one. Another collection's (another command: other
        layers, settings, excerpts or model), or another version's, is left alone, and `warn` is told: this
        collection's first checkpoint will replace it, so a command changed by mistake must not cost hours silently."""
        try:
            folder = self.folder / (self.folder / "current").read_text().strip()
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        if meta.get("format") != FORMAT or meta.get("identity") != identity:
            self.foreign = True
            whose = "another collection" if meta.get("format") == FORMAT else "another version of neuronscope"
            self.warn(f"{self.folder} holds the saved state of {whose} (after {int(meta.get('done', 0)):,} excerpts: "
                      "another model, corpus, layers or settings; with the same command, a corpus file changed "
                      "since): this collection starts from the beginning, and its first checkpoint replaces that "
                      "one; to go on with that one instead, stop this and run the command that started it")
            return None
        layers = {}
        try:
            for path in folder.glob("layer-*.npz"):
                layer = int(path.stem.split("-", 1)[1])
                layers[layer] = load_layer(path, layer)
        except DAMAGED as err:  # a disk error: collect from the start, and say so
            self.warn(f"{folder} cannot be read ({type(err).__name__}): the saved state is damaged, so this collection "
                      "starts from the beginning, and its first checkpoint replaces that one")
            return None
        self.held = int(meta["done"])
        return Resumed(self.held, layers)

    def clear(self) -> None:
        """The collection is in the store: its checkpoints go (another collection's, never replaced, stays)."""
        if not self.foreign:
            shutil.rmtree(self.folder, ignore_errors=True)


@dataclass(frozen=True)
class SavedState:
    """A checkpoint found beside a store."""

    folder: Path
    done: int
    """Excerpts it holds."""
    size: int
    """Its bytes."""


def saved_state(store: str | Path) -> SavedState | None:
    """The checkpoint beside a store, if one is there."""
    store = Path(store)
    folder = store.with_name(store.name + ".checkpoint")
    try:
        meta = json.loads((folder / (folder / "current").read_text().strip() / "meta.json").read_text())
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        return SavedState(folder, int(meta.get("done", 0)), size)
    except (OSError, ValueError):
        return None


def identity(*parts: object, excerpt_ids: np.ndarray) -> str:
    """What makes two collections the same one: the given parts (model revision, corpus, settings, layers, shard)
    and the excerpt list."""
    digest = hashlib.sha256(json.dumps([str(p) for p in parts]).encode())
    digest.update(np.ascontiguousarray(excerpt_ids, dtype="<i8").tobytes())
    return digest.hexdigest()
