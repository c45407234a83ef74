"""Errors abnexp reports to the user as one clear message (the CLI prints them without a traceback)."""


class AbnexpError(Exception):
    """Base class of errors whose message alone tells the user what is wrong and how to fix it."""


class ConfigError(AbnexpError):
    """A configuration value is invalid (raised before any work starts)."""


class DatasetError(AbnexpError):
    """A dataset root is missing or malformed, or a file in it cannot be read."""
