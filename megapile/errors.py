"""Errors every layer raises, in a module that imports nothing of megapile's (so the model families, which
the config reads, can raise them too)."""


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message is one line."""
