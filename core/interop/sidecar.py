"""Our own files beside the release layout, written by `export --format openai` and read by `import-openai`; readers
of the release ignore them (they look only in its four folders):

- `neuronscope/run.json`: the run the export came from (model, revision, dtype, units, layers and width, the
  collection's settings with its quantile levels), so importing the export makes a run of that model, not of
  GPT-2 XL, whose excerpt-max quantiles keep their levels.
- `neuronscope/explainers/L/N.json`: who wrote each of the neuron's exported explanations (explainer, role, sample,
  selected, simulator), in the order of `explanations/L/N.jsonl`. The release's ScoredExplanation has no field for
  it, and the release's own loader refuses fields it does not know, so this does not go into that file.

Anything that does not have this shape raises ReleaseError naming the field.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from neuronscope.core.interop.release import ReleaseError, read_json
from neuronscope.core.records import CollectSettings, RunInfo

#: The folder of our files in an exported release.
FOLDER = "neuronscope"
#: The run an export came from.
RUN_FILE = f"{FOLDER}/run.json"
#: Per neuron, who wrote its exported explanations (a part, like the release's: L/N.json under it).
EXPLAINERS = f"{FOLDER}/explainers"
#: What run.json says it is, and the version of its shape.
FORMAT = "neuronscope-export"
VERSION = 1


@dataclass(frozen=True)
class ExportedRun:
    """The run an exported release came from."""

    model: str
    """The model the run was collected from (what the user named)."""
    revision: str
    """Its weights' revision."""
    dtype: str
    """Compute dtype of the collection."""
    units: str
    """'' for MLP neurons, else the sparse coder whose latents the run holds."""
    layers: tuple[int, ...]
    """The run's layers (the export may hold some of them)."""
    neurons_per_layer: int
    """Its width."""
    settings: CollectSettings
    """The collection's settings: record counts, excerpt length, quantile levels."""
    corpus: str
    """Its corpus, as the run describes it."""


@dataclass(frozen=True)
class Authorship:
    """Who wrote one exported explanation, and how it stood among the neuron's."""

    explainer: str
    """The explainer ('user:NAME' for a person's sentence)."""
    role: str
    """candidate or user."""
    sample: int
    """Index among the candidates."""
    selected: bool
    """Whether it was the neuron's selected explanation."""
    simulator: str
    """The simulator of its test-split scores ('' where unknown)."""


def run_json(run: RunInfo) -> dict[str, Any]:
    """run.json of an export of `run`."""
    return {"format": FORMAT, "version": VERSION, "model": run.model, "revision": run.model_revision,
            "dtype": run.dtype, "units": run.units, "layers": list(run.layers),
            "neurons_per_layer": run.neurons_per_layer, "settings": asdict(run.settings), "corpus": run.corpus}


def _get(obj: dict[str, Any], name: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = obj.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ReleaseError(f"{where} has no valid {name!r}")
    return value


def parse_run(obj: Any, where: str = FORMAT) -> ExportedRun:
    """An ExportedRun from run.json's content."""
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ReleaseError(f"it is not a {FORMAT} file")
    if _get(obj, "version", int, where) > VERSION:
        raise ReleaseError(f"it is version {obj['version']}, newer than this neuronscope reads ({VERSION}): "
                           "upgrade neuronscope")
    layers = _get(obj, "layers", list, where)
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
        raise ReleaseError(f"{where}.layers is not a list of integers")
    given = _get(obj, "settings", dict, where)
    known = {f.name for f in fields(CollectSettings)}
    try:  # settings added after the export keep their defaults; ones this version does not know are left out
        data = {k: v for k, v in given.items() if k in known}
        if "quantiles" in data:
            data["quantiles"] = tuple(float(q) for q in data["quantiles"])
        settings = CollectSettings(**data)
    except (TypeError, ValueError):
        raise ReleaseError(f"{where}.settings is not a collection's settings") from None
    return ExportedRun(model=_get(obj, "model", str, where), revision=_get(obj, "revision", str, where),
                       dtype=_get(obj, "dtype", str, where), units=_get(obj, "units", str, where),
                       layers=tuple(layers), neurons_per_layer=_get(obj, "neurons_per_layer", int, where),
                       settings=settings, corpus=_get(obj, "corpus", str, where))


def read_run(root: Path) -> ExportedRun | None:
    """The run a release folder was exported from (None for a release without run.json, such as OpenAI's);
    ReleaseError when the file is there but unreadable."""
    path = root / RUN_FILE
    if not path.exists():
        return None
    return parse_run(read_json(path))


def authorship_json(authors: list[Authorship]) -> dict[str, Any]:
    """A neuron's explainers file."""
    return {"format": FORMAT, "explanations": [asdict(a) for a in authors]}


def parse_authorship(obj: Any, where: str = "explainers") -> list[Authorship]:
    """The Authorship of each explanation an explainers file lists."""
    if not isinstance(obj, dict) or not isinstance(obj.get("explanations"), list):
        raise ReleaseError(f"{where} has no list of 'explanations'")
    out = []
    for i, item in enumerate(obj["explanations"]):
        at = f"{where}.explanations[{i}]"
        if not isinstance(item, dict):
            raise ReleaseError(f"{at} is not a JSON object")
        out.append(Authorship(explainer=_get(item, "explainer", str, at), role=_get(item, "role", str, at),
                              sample=_get(item, "sample", int, at), selected=_get(item, "selected", bool, at),
                              simulator=_get(item, "simulator", str, at)))
    return out
