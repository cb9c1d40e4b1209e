"""The error codes a row can end with (``llmq_error_code``), and which of them a later try asks
again: one vocabulary that the request reader, the engine, the Spark layer and the summary share."""

from __future__ import annotations

# error codes recorded on rows (QueryResult.error_code)
CONTENT_FILTER = "content_filter"
CONTEXT_LENGTH = "context_length_exceeded"
BAD_REQUEST = "bad_request"
RATE_LIMITED = "rate_limited"
SERVER_ERROR = "server_error"
TIMEOUT = "timeout"
CONNECTION_ERROR = "connection_error"
BAD_RESPONSE = "bad_response"
EMPTY_PROMPT = "empty_prompt"
REFUSAL = "refusal"
TOOL_CALLS = "tool_calls"
LENGTH = "length"
UNEXPECTED_REDIRECT = "unexpected_redirect"
INSUFFICIENT_QUOTA = "insufficient_quota"
KEY_NOT_CHECKABLE = "no_db_connection"  # LiteLLM without a database: a key it cannot check
# a 200 whose text is not JSON following the run's output schema: the model's answer to this
# prompt, so neither retried nor asked again by a later try (the raw text stays on the row)
INVALID_OUTPUT = "invalid_output"
# Batch API: a request its batch never ran, recorded under these only when the run is over
BATCH_EXPIRED = "batch_expired"
BATCH_CANCELLED = "batch_cancelled"
BATCH_FAILED = "batch_failed"
BUDGET_EXCEEDED = "budget_exceeded"  # not sent: the run's token or cost budget was spent
# the answer stopped at the max_tokens llmq set to keep a budget, and the budget left could not pay
# a longer one: a later run with a larger budget asks it again (the cut text stays on the row)
CUT_BY_BUDGET = "cut_by_budget"

# every code above: the summary counts rows by these while the output is written
RECORDED_ERROR_CODES = (
    CONTENT_FILTER,
    CONTEXT_LENGTH,
    BAD_REQUEST,
    RATE_LIMITED,
    SERVER_ERROR,
    TIMEOUT,
    CONNECTION_ERROR,
    BAD_RESPONSE,
    EMPTY_PROMPT,
    REFUSAL,
    TOOL_CALLS,
    LENGTH,
    UNEXPECTED_REDIRECT,
    INSUFFICIENT_QUOTA,
    KEY_NOT_CHECKABLE,
    INVALID_OUTPUT,
    BATCH_EXPIRED,
    BATCH_CANCELLED,
    BATCH_FAILED,
    BUDGET_EXCEEDED,
    CUT_BY_BUDGET,
)

# recorded errors that a later try asks again: the row may well succeed then. Every other code is
# the answer to that exact request (a filter, a refusal, a redirect) and would come back the same.
TRANSIENT_ERROR_CODES = frozenset(
    {RATE_LIMITED, SERVER_ERROR, TIMEOUT, CONNECTION_ERROR, BAD_RESPONSE, BUDGET_EXCEEDED, CUT_BY_BUDGET}
)
