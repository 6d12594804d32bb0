"""Domain errors. Every user-facing failure is a `PrufedError` whose message is one line naming the problem."""


class PrufedError(Exception):
    """Base class: the CLI prints `error: <message>` and exits with status 2."""


class ConfigError(PrufedError, ValueError):
    """A bad CLI flag or config field. The message starts with the flag or field name."""

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


class ModelError(PrufedError):
    """A model path or architecture that PruFed cannot use."""
