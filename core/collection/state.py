"""A collection's mergeable state on disk: one layer in a compact file (checkpoints and shard states use it), and a
shard's whole state in a folder that `merge` streams into a store.

A layer file holds the layer's statistics and, for each kind of kept records, every slot's excerpt id (-1 empty) and
only the filled slots' exact (max, min) and activations, as the store keeps them: int8 codes and a per-record scale.
That loses nothing the store would keep: dequantising gives each record's extremes back exactly, so quantising again
gives the same codes, and the samplers choose by the exact (max, min) and hashes, never by the codes.

A shard state (`collect --shard`) is a folder: `meta.json` (what was collected: model, corpus, settings, layers, the
part), a layer file per layer, the excerpts that any kept record uses with their token ids, and the text of each
token they contain. It is written whole under a temporary name and then renamed, so a folder of that name is
always complete.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from neuronscope.core.errors import NeuronscopeError
from neuronscope.core.layerdata import LayerResult, Samples
from neuronscope.core.records import CollectSettings
from neuronscope.core.staging import staged as staged_path

KINDS = ("top", "bottom", "random", "cell")
#: Version of the shard state folder's layout.
FORMAT = 1
#: Excerpts merged into the store at a time: memory stays bounded whatever the number of excerpts.
EXCERPT_CHUNK = 32_768
_STATS = ("sums", "max", "min", "min_excerpt_max", "histogram", "cell_counts")


class StateError(NeuronscopeError):
    """A shard state that cannot be read, as one line naming the problem and the fix."""


# -- one layer -----------------------------------------------------------------------------------------

def save_layer(path: Path, result: LayerResult) -> None:
    """Write one layer's mergeable state (an uncompressed .npz: any array of it can be read alone)."""
    arrays: dict[str, np.ndarray] = {name: getattr(result, name) for name in _STATS}
    arrays["count"] = np.int64(result.count)  # type: ignore[assignment]
    for kind in KINDS:
        sample = result.samples[kind]
        filled = sample.ids >= 0
        arrays |= {f"{kind}_ids": sample.ids.astype(np.int32), f"{kind}_maxes": sample.maxes[filled],
                   f"{kind}_mins": sample.mins[filled], f"{kind}_scales": sample.scales[filled],
                   f"{kind}_codes": sample.codes[filled]}
    with open(path, "wb") as file:
        np.savez(file, **arrays)  # type: ignore[arg-type]


#: What reading a damaged or cut-short .npz or .npy raises.
DAMAGED = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error)


def load_layer(path: Path, layer: int) -> LayerResult:
    """Read back what save_layer wrote."""
    with np.load(path) as data:
        samples = {}
        for kind in KINDS:
            ids = data[f"{kind}_ids"].astype(np.int64)
            filled = ids >= 0
            stored = data[f"{kind}_codes"]
            codes = np.zeros((*ids.shape, stored.shape[1]), np.int8)
            scales, maxes, mins = (np.zeros(ids.shape, np.float32) for _ in range(3))
            codes[filled], scales[filled] = stored, data[f"{kind}_scales"]
            maxes[filled], mins[filled] = data[f"{kind}_maxes"], data[f"{kind}_mins"]
            samples[kind] = Samples(ids, scales, codes, maxes, mins)
        stats = {name: data[name] for name in _STATS}
        return LayerResult(layer=layer, count=int(data["count"]), samples=samples, **stats)


def kept_ids(result: LayerResult) -> np.ndarray:
    """The excerpts a layer's kept records use, sorted."""
    ids = np.concatenate([result.samples[kind].ids.ravel() for kind in KINDS])
    return np.unique(ids[ids >= 0]).astype(np.int64)


# -- a shard's state -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardMeta:
    """What a shard state holds: one part of one collection."""

    model: str
    revision: str
    corpus: str
    settings: CollectSettings
    layers: tuple[int, ...]
    neurons_per_layer: int
    dtype: str
    index: int
    count: int
    n_excerpts: int
    identity: str
    """The collection's identity (checkpoint.identity): the same command finds its finished shard by it."""
    units: str = ""
    """'' for MLP neurons, else the sparse coder whose latents these are (collect.units_of)."""

    def differences(self, other: ShardMeta) -> list[str]:
        """What makes another shard's collection not this one's, by name: model, layers, settings, units, corpus (the
        token ids read: paths and modification times may differ by host)."""
        from neuronscope.core.collection.corpus import same_corpus
        from neuronscope.core.ids import layers_text

        differ = [name for name, kept in (("model", ("model", "revision")), ("units", ("neurons_per_layer", "units")))
                  if any(getattr(self, f) != getattr(other, f) for f in kept)]
        if self.layers != other.layers:
            differ.append(f"layers (--layers {layers_text(self.layers)}, not {layers_text(other.layers)})")
        options = [f"--{field.name.replace('_', '-')} {getattr(self.settings, field.name)}, not "
                   f"{getattr(other.settings, field.name)}" for field in fields(self.settings)
                   if getattr(self.settings, field.name) != getattr(other.settings, field.name)]
        differ += [f"settings ({'; '.join(options)})"] if options else []
        return differ + ([] if same_corpus(self.corpus, other.corpus) else ["corpus"])

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **asdict(self)}, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> ShardMeta:
        data = json.loads(text)
        if data.pop("format", None) != FORMAT:
            raise ValueError("format")
        settings = data.pop("settings")
        settings["quantiles"] = tuple(settings["quantiles"])
        return ShardMeta(settings=CollectSettings(**settings), layers=tuple(data.pop("layers")), **data)


def write_shard(folder: Path, meta: ShardMeta, results: Iterable[LayerResult], token_ids: np.ndarray,
                excerpt_ids: np.ndarray, token_text: Callable[..., list[str]]) -> None:
    """Write a shard's state: its layers as they finish, then the excerpts (of `excerpt_ids`, sorted, with their
    `token_ids` rows) that the kept records use, with their tokens' text (Subject.token_strings): each token's own
    (`token_text(ids, apart=True)`) once, and where an excerpt's differs (a character its tokens share) that."""
    staged = staged_path(folder, "partial")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    try:
        used = np.zeros(0, np.int64)
        for result in results:
            save_layer(staged / f"layer-{result.layer}.npz", result)
            used = np.union1d(used, kept_ids(result))
        rows = np.searchsorted(excerpt_ids, used)
        kept_tokens = np.ascontiguousarray(token_ids[rows], dtype=np.int32)
        np.save(staged / "excerpt_ids.npy", used.astype(np.int64))
        np.save(staged / "excerpt_tokens.npy", kept_tokens)
        vocab = np.unique(kept_tokens)
        alone = token_text(vocab, apart=True)
        own = dict(zip(vocab.tolist(), alone, strict=True))
        fixed = [(row, at, text) for row, ids in enumerate(kept_tokens.tolist())
                 for at, text in enumerate(token_text(ids)) if text != own[ids[at]]]
        arrays: dict[str, Any] = {"ids": vocab.astype(np.int32), **_packed(alone),
                                  **_packed([f[2] for f in fixed], "fix_"),
                                  "fix_rows": np.array([f[0] for f in fixed], np.int64),
                                  "fix_at": np.array([f[1] for f in fixed], np.int64)}
        np.savez(staged / "vocab.npz", **arrays)
        (staged / "meta.json").write_text(meta.to_json())
        if folder.exists():  # an older state of this part (another collection, or --force): replaced whole
            old = folder.with_name(f".{folder.name}.{os.getpid()}.old")
            os.rename(folder, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(staged, folder)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def read_meta(folder: Path) -> ShardMeta | None:
    """The meta of a complete shard state at `folder`, or None when there is none (or it is unreadable)."""
    try:
        return ShardMeta.from_json((folder / "meta.json").read_text())
    except (OSError, ValueError, TypeError, KeyError):
        return None


class ShardState:
    """A shard state folder opened for merging: its layers and excerpts are read one at a time."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if self.folder.is_file():
            raise StateError(f"{self.folder} is a file, not a shard state: `collect --shard i/n --store S` writes "
                             "the folder S.shard-i-of-n; pass those folders")
        if not self.folder.is_dir():
            raise StateError(f"no shard state at {self.folder}: pass the folders `collect --shard` wrote "
                             "(STORE.shard-i-of-n)")
        meta = read_meta(self.folder)
        if meta is None:
            raise StateError(f"{self.folder} is not a shard state this neuronscope reads (no meta.json of format "
                             f"{FORMAT}): collect that shard again with this version")
        self.meta = meta

    def layer(self, layer: int) -> LayerResult:
        try:
            return load_layer(self.folder / f"layer-{layer}.npz", layer)
        except DAMAGED as err:
            raise StateError(f"{self.folder}: layer {layer} cannot be read ({type(err).__name__}): the shard state "
                             "is damaged; collect that shard again") from None

    def excerpts(self, wanted: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, list[list[str]]]]:
        """(excerpt ids, token ids, token strings) of the wanted excerpts this shard holds, EXCERPT_CHUNK at a time;
        the token rows are read from disk chunk by chunk."""
        try:
            ids = np.load(self.folder / "excerpt_ids.npy")
            tokens = np.load(self.folder / "excerpt_tokens.npy", mmap_mode="r")
            with np.load(self.folder / "vocab.npz") as vocab:
                vocab_ids, offsets, text = vocab["ids"], vocab["offsets"], vocab["text"].tobytes()
                fixes: dict[int, list[tuple[int, str]]] = {}
                if "fix_rows" in vocab:  # (states written before 2026-12-07 have none)
                    fixed = _unpacked(vocab["fix_offsets"], vocab["fix_text"].tobytes())
                    places = zip(vocab["fix_rows"].tolist(), vocab["fix_at"].tolist(), fixed, strict=True)
                    for row, at, string in places:
                        fixes.setdefault(row, []).append((at, string))
        except DAMAGED as err:
            raise StateError(f"{self.folder}: its excerpts cannot be read ({type(err).__name__}): the shard state is "
                             "damaged; collect that shard again") from None
        strings = dict(zip(vocab_ids.tolist(), _unpacked(offsets, text), strict=True))
        rows = np.flatnonzero(np.isin(ids, wanted))
        for start in range(0, len(rows), EXCERPT_CHUNK):
            chunk = rows[start: start + EXCERPT_CHUNK]
            token_ids = np.asarray(tokens[chunk], np.int32)
            texts = [[strings[t] for t in row] for row in token_ids.tolist()]
            for i, row in enumerate(chunk.tolist()):
                for at, string in fixes.get(row, ()):
                    texts[i][at] = string
            yield ids[chunk], token_ids, texts
        del tokens


def _packed(strings: list[str], prefix: str = "") -> dict[str, np.ndarray]:
    """Strings as one UTF-8 byte array and the offsets of each (surrogates kept), for np.savez."""
    encoded = [string.encode("utf-8", "surrogatepass") for string in strings]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    offsets[1:] = np.cumsum([len(b) for b in encoded])
    return {f"{prefix}offsets": offsets, f"{prefix}text": np.frombuffer(b"".join(encoded), np.uint8)}


def _unpacked(offsets: np.ndarray, text: bytes) -> list[str]:
    return [text[offsets[i]: offsets[i + 1]].decode("utf-8", "surrogatepass") for i in range(len(offsets) - 1)]
