"""LLM backends for explaining and simulating: `local` (in-process Hugging Face model), `openai`
(any OpenAI-compatible server) and `baseline` (token lookup, no LLM). `make_backend(spec)` builds one."""

from core.llm.base import Backend, BudgetExceeded, CallLog, LLMError, make_backend, parse_spec

__all__ = ["Backend", "BudgetExceeded", "CallLog", "LLMError", "make_backend", "parse_spec"]
