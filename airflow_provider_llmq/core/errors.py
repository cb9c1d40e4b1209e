"""Errors that end a task instead of being recorded on a row."""

from __future__ import annotations


class LLMQueryError(Exception):
    """Base class: a problem no retry of the same request can fix."""


class LLMQueryAuthError(LLMQueryError):
    """The endpoint refused the credentials (401 / 403)."""


class LLMQueryConfigError(LLMQueryError):
    """The endpoint, deployment, TLS set-up or arguments are wrong (404, bad CA, bad option)."""


class LLMQueryQuotaError(LLMQueryError):
    """The account has no quota left (``insufficient_quota``): a billing state, not a rate limit,
    so every further request of the run would fail the same way."""


class LLMQueryUnreachableError(LLMQueryError):
    """The endpoint never answered: every request failed to connect for seconds (a server that is
    down, a wrong host or port, a firewall). A retry of the task may find it up again."""
