"""What the HTTP side of an OpenAI-compatible server means for us: which statuses are worth a retry and which
will hit every request alike (a job stops on those), how long a server asks us to wait, and what OpenAI's models
cost. No requests are made here (neuronscope.core.llm.openai_api makes them)."""

from __future__ import annotations

import re
from typing import Any

from neuronscope.core.llm.base import LLMError

#: Dollars per million (prompt, completion) tokens; dated snapshots match by prefix.
PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.0),
    "gpt-4.1": (2.0, 8.0),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
}


class HTTPError(LLMError):
    """An LLMError for an HTTP status the server answered with."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message, systematic=SYSTEMATIC_STATUSES.get(status, ""))
        self.status = status


#: Statuses that every request of a job would get alike.
SYSTEMATIC_STATUSES = {401: "authentication", 403: "permission", 404: "not found"}
#: Statuses worth retrying: the server may answer next time.
TRANSIENT_STATUSES = (408, 409, 429)
#: Tries of a refused connection (a server restarting may refuse for a moment; a stopped one always does).
REFUSED_TRIES = 2


def refused(err: BaseException) -> bool:
    """Whether a connection error is a refusal: nothing listens at the address."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError) or "connection refused" in str(seen).lower():
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def retry_after(headers: Any) -> float | None:
    """The wait a server asks for (retry-after-ms, or retry-after in seconds), at most a minute."""
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        try:
            return min(60.0, float(headers.get(name)) * scale)
        except (TypeError, ValueError):
            continue
    return None


#: A bearer token as a server might echo it back (from a header it was sent).
BEARER = re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]+")

#: Statuses that mean "this server does not offer that" when probing (not auth or server failures).
REFUSALS = (400, 404, 405, 415, 422, 501)


def price_of(model: str) -> tuple[float, float] | None:
    """Known OpenAI prices for a model name (longest matching prefix), else None."""
    name = model.lower()
    matches = [k for k in PRICES if name == k or name.startswith(k + "-")]
    return PRICES[max(matches, key=len)] if matches else None
