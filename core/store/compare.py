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


#: The roles a set takes when it names none: the explanations people and models wrote, not the controls.
DEFAULT_ROLES = ("candidate", "user")
#: The controls scored beside every chosen explanation.
CONTROL_ROLES = ("baseline", "shuffled")


def _set_where(run_id: int, chosen: ExplanationSet, tail: str, roles: tuple[str, ...]) -> tuple[str, list[Any]]:
    """The conditions on `e` (explanations) and `s` (scores) a set's explanations meet, in the given roles: the
    selected ones of candidates and people's, every control; a finite test-split headline score."""
    where = ["e.run_id = ?", "e.tail = ?", "s.split = 'test'", "s.method = 'all'", "s.value IS NOT NULL",
             "isfinite(s.value)", "list_contains(?, e.role)",
             "(e.selected OR NOT list_contains(['candidate', 'user'], e.role))"]
    params: list[Any] = [run_id, tail, list(roles)]
    for column, value in (("e.job_id", chosen.job), ("e.explainer", chosen.explainer),
                          ("s.simulator", chosen.simulator)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    return " AND ".join(where), params


class CompareMixin:
    con: Any

    def set_scores(self, default_run: int, chosen: ExplanationSet,
                   tail: str = "pos") -> dict[NeuronId, tuple[float, str]]:
        """Per neuron of the set: its headline score (test split, Pearson over all excerpts) and the explanation's
        text."""
        roles = (chosen.role,) if chosen.role is not None else DEFAULT_ROLES
        where, params = _set_where(chosen.run if chosen.run is not None else default_run, chosen, tail, roles)
        rows = self.con.execute(
            f"SELECT e.layer, e.neuron, s.value, e.text FROM explanations e JOIN scores s USING (explanation_id) "
            f"WHERE {where} QUALIFY row_number() OVER (PARTITION BY e.layer, e.neuron ORDER BY "
            "e.job_id DESC, e.explanation_id DESC, s.created_at DESC) = 1", params).fetchall()
        return {NeuronId(int(r[0]), int(r[1])): (float(r[2]), str(r[3])) for r in rows}

    def set_names(self, run_id: int, tail: str = "pos",
                  roles: tuple[str, ...] = DEFAULT_ROLES) -> dict[str, list[str]]:
        """The explainers and simulators of a run's scored explanations in these roles (what a set of those roles
        can name)."""
        where, params = _set_where(run_id, ExplanationSet(text=""), tail, roles)
        rows = self.con.execute(f"SELECT list(DISTINCT e.explainer ORDER BY e.explainer), list(DISTINCT s.simulator "
                                f"ORDER BY s.simulator) FROM explanations e JOIN scores s USING (explanation_id) "
                                f"WHERE {where}", params).fetchall()
        return {"explainer": [str(v) for v in rows[0][0] or ()], "simulator": [str(v) for v in rows[0][1] or ()]}

    def missing_set(self, run_id: int, chosen: ExplanationSet, tail: str = "pos") -> str:
        """Why a set that matches nothing matches nothing, in one line: what its roles' explanations can be named by,
        and how to name the controls when the set named an explainer of theirs (the token baseline's is `baseline`)."""
        roles = (chosen.role,) if chosen.role is not None else DEFAULT_ROLES
        names = self.set_names(run_id, tail, roles)
        whose = " and ".join(roles)
        listed = "; ".join(f"{key}s: {', '.join(repr(v) for v in values)}" for key, values in names.items() if values)
        line = (f"{chosen.text!r} matches no scored {tail} explanation in run {run_id}" +
                (f" (its {whose} explanations' {listed})" if listed else f" (it has no scored {whose} explanation)"))
        if chosen.role is None:
            controls = [role for role in CONTROL_ROLES if chosen.explainer in self.set_names(run_id, tail, (role,))[
                "explainer"]]
            if controls:
                other = f"explainer={names['explainer'][0]}" if names["explainer"] else "job=N"
                return (f"{line}: {chosen.explainer!r} explains only its {' and '.join(controls)} controls, compared "
                        f"with role={controls[0]} (e.g. neuronscope compare role={controls[0]} {other})")
        return f"{line}: check it against `neuronscope show` or `info`"
