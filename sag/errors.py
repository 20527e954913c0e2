"""Errors raised for bad user input: one line that names the bad value and what is accepted."""


class SagConfigError(ValueError):
    """A configuration value, path or pattern that cannot be used. Raised before any work starts."""
