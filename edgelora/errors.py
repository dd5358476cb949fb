"""One error hierarchy for the whole SDK.

Library code raises these; only the CLI turns them into exit codes. Every message is one line
that says what is wrong and what to do about it.
"""

from __future__ import annotations


class EdgeloraError(Exception):
    """Base of every error edgelora raises on purpose."""

    exit_code = 2  # a user error: bad input, missing file, unsupported model


class SourceNotFoundError(EdgeloraError):
    """A path or model name that does not exist."""


class UnsupportedFormatError(EdgeloraError):
    """A file or directory in a format edgelora does not read (pickle weights, unknown layout)."""


class CorruptFileError(EdgeloraError):
    """A file that claims a known format but is truncated or malformed."""


class UnsupportedArchitectureError(EdgeloraError):
    """A model outside the Llama family edgelora supports."""


class ModelFetchError(EdgeloraError):
    """The default model could not be fetched or failed its checksum."""

    exit_code = 1  # an environment problem more than a user mistake


class EdgeloraWarning(UserWarning):
    """Something works, more slowly or less well than it could (a fallback was taken): one line."""
