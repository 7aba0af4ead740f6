"""The store's SQL for comparing two sets of explanations on the same neurons (`neuronscope compare`): each set is
named by filters (a run, a job, an explainer, a simulator, a role), and gives every neuron it covers one headline
score. Mixed into neuronscope.core.store.Store."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from neuronscope.core.errors import InputError
from neuronscope.core.ids import NeuronId

#: What a set's filters may name, and what each means.
SET_KEYS = {"run": "a run id (default: --run, else the newest complete run)", "job": "a job id",
            "explainer": "an explainer, e.g. openai:gpt-4o-mini, baseline, or user:ada for a person's",
            "simulator": "the simulator that scored it, e.g. local:qwen-1.5b or 'local:qwen-1.5b (tokens)' (default: "
                         "the newest score of each explanation)",
            "role": "candidate (a model's), user (a person's), or a control: baseline (the token lookup), shuffled "
                    "(another neuron's explanation); default candidate and user"}
#: The roles a set may name; a control is scored beside every chosen explanation, so none is 'selected'.
SET_ROLES = ("candidate", "user", "baseline", "shuffled")


@dataclass(frozen=True)
class ExplanationSet:
    """One side of a comparison: per neuron, the newest selected explanation these filters let through that has a
    headline score (by the simulator, when one is named)."""

    text: str
    """The filters as written, e.g. `explainer=baseline,simulator=baseline`."""
    run: int | None = None
    job: int | None = None
    explainer: str | None = None
    simulator: str | None = None
    role: str | None = None

    @classmethod
    def parse(cls, text: str) -> ExplanationSet:
        """`KEY=VALUE[,KEY=VALUE...]` with keys of SET_KEYS; InputError naming the forms otherwise."""
        fields: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            key, value = key.strip().lower(), value.strip()
            if not sep or key not in SET_KEYS or not value:
                raise InputError(f"cannot read {part!r} in {text!r}: name a set of explanations as KEY=VALUE joined "
                                 f"by commas, with KEY one of {', '.join(SET_KEYS)} (e.g. explainer=baseline or job=3)")
            if key in fields:
                raise InputError(f"{key} is given twice in {text!r}")
            if key in ("run", "job"):
                if not value.isdigit():
                    raise InputError(f"{key}={value!r}: a {key} id is a whole number")
                fields[key] = int(value)
            elif key == "role" and value not in SET_ROLES:
                raise InputError(f"role={value!r}: use candidate (a model's explanations), user (a person's), "
                                 "baseline or shuffled (the controls)")
            else:
                fields[key] = value
        if not fields:
            raise InputError(f"{text!r} names no set of explanations: e.g. explainer=baseline, job=3 or run=2")
        return cls(text=text, **fields)


class CompareMixin:
    con: Any

    def set_scores(self, default_run: int, chosen: ExplanationSet, tail: str = "pos") -> dict[NeuronId, tuple[float, str]]:
        """Per neuron of the set: its headline score (test split, Pearson over all excerpts) and the explanation's
        text."""
        where = ["e.run_id = ?", "e.tail = ?", "s.split = 'test'", "s.method = 'all'",
                 "s.value IS NOT NULL", "isfinite(s.value)"]
        params: list[Any] = [chosen.run if chosen.run is not None else default_run, tail]
        for column, value in (("e.job_id", chosen.job), ("e.explainer", chosen.explainer),
                              ("s.simulator", chosen.simulator)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if chosen.role is not None:
            where.append("e.role = ?")
            params.append(chosen.role)
        else:
            where.append("e.role IN ('candidate', 'user')")
        if chosen.role in (None, "candidate", "user"):
            where.append("e.selected")
        rows = self.con.execute(
            f"SELECT e.layer, e.neuron, s.value, e.text FROM explanations e JOIN scores s USING (explanation_id) "
            f"WHERE {' AND '.join(where)} QUALIFY row_number() OVER (PARTITION BY e.layer, e.neuron ORDER BY "
            "e.job_id DESC, e.explanation_id DESC, s.created_at DESC) = 1", params).fetchall()
        return {NeuronId(int(r[0]), int(r[1])): (float(r[2]), str(r[3])) for r in rows}

    def set_names(self, run_id: int, tail: str = "pos") -> dict[str, list[str]]:
        """The explainers and simulators of a run's scored explanations (what a set's filters can name)."""
        names: dict[str, list[str]] = {}
        for column in ("explainer", "simulator"):
            names[column] = [str(r[0]) for r in self.con.execute(
                f"SELECT DISTINCT {'e' if column == 'explainer' else 's'}.{column} FROM explanations e JOIN scores s "
                "USING (explanation_id) WHERE e.run_id = ? AND e.tail = ? AND s.split = 'test' ORDER BY 1",
                [run_id, tail]).fetchall()]
        return names
