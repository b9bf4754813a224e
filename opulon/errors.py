"""The one exception tree of Opulon.

The CLI turns an :class:`OpulonError` into a one-line message and an exit code; the gateway
turns refusals into the called API's error shape. Messages are written for people and never
contain request content or a full key.
"""


class OpulonError(Exception):
    """Base of every error Opulon raises on purpose."""

    exit_code = 1


class ConfigError(OpulonError):
    """The setup is wrong: paths, master key, settings."""


class MasterKeyError(ConfigError):
    """The master key is missing, malformed, or does not fit the database."""


class InvalidInput(OpulonError):
    """A value given by a person (a CLI option, a spec) is not valid."""

    exit_code = 2


class NotFound(OpulonError):
    """A named thing (key prefix, provider) does not exist."""


class Conflict(OpulonError):
    """The operation clashes with what exists (a duplicate name, say)."""
