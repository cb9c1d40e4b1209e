"""The message a method's worker side sends when an error ends the run."""

from __future__ import annotations


class Failed:
    """A worker hit an error that ends the run (auth, config, a bug): the caller re-raises it."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
