"""Errors raised for bad user input: one line that names the bad value and what is accepted."""


class SagConfigError(ValueError):
    """A configuration value, path or pattern that cannot be used. Raised before any work starts."""


class SagConfigWarning(UserWarning):
    """A configuration that runs but cannot do what its name says (e.g. guidance that is a no-op): one line."""
