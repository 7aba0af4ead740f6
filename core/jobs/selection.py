"""Which neurons a job takes, and the command-line forms it is read from (`12/345`, `density < 0.5 and ...`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from neuronscope.core.choices import DEFAULT_ORDER, Order
from neuronscope.core.errors import NeuronscopeError
from neuronscope.core.ids import NeuronId
from neuronscope.core.store.explanations import FILTER_FIELDS, FILTER_OPS


class JobError(NeuronscopeError):
    """A job that cannot start (here: a neuron or filter that cannot be read), as one line naming the fix."""


@dataclass(frozen=True)
class Selection:
    """Which neurons a job takes."""

    neurons: tuple[NeuronId, ...] = ()
    """Explicit neurons; when given, the other fields are ignored."""
    layers: tuple[int, ...] | None = None
    """Layers to choose from (None: all)."""
    order: Order = DEFAULT_ORDER
    """One of neuronscope.core.choices.ORDERS."""
    where: tuple[tuple[str, str, float], ...] = ()
    """Conditions on the statistics, all of which must hold."""
    limit: int | None = 10
    """How many neurons (None: all that match)."""


def parse_where(text: str) -> tuple[tuple[str, str, float], ...]:
    """`density < 0.5 and kurtosis > 10` -> typed conditions; JobError naming the allowed fields."""
    out = []
    for part in re.split(r"\s+and\s+|,", text.strip(), flags=re.IGNORECASE):
        if not part.strip():
            continue
        ops = "|".join(re.escape(o) for o in FILTER_OPS)
        m = re.fullmatch(rf"\s*([a-z_]+)\s*({ops})\s*(-?(?:\d+\.?\d*|\.\d+)(?:e-?\d+)?)\s*", part, re.IGNORECASE)
        if not m or m.group(1).lower() not in FILTER_FIELDS:
            raise JobError(f"cannot read the filter {part.strip()!r}: write FIELD OP NUMBER joined by 'and', "
                           f"with FIELD one of {', '.join(FILTER_FIELDS)} and OP one of {' '.join(FILTER_OPS)}")
        out.append((m.group(1).lower(), m.group(2), float(m.group(3))))
    return tuple(out)
