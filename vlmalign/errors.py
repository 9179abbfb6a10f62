"""Error types that the CLI turns into one-line messages.

Every error raised for bad user input derives from `VlmalignError` and names the file, field or
key at fault, so the CLI can print it without a traceback.
"""


class VlmalignError(Exception):
    """Bad input or state that the user can fix; printed as one line by the CLI."""


class ConfigError(VlmalignError):
    """A config file or override is invalid (unknown key, wrong type, missing field)."""


class VideoError(VlmalignError):
    """A video or frame folder is missing, empty, unreadable or has no frames."""


class DataError(VlmalignError):
    """A data file is missing or a record is malformed (names file, line and field)."""


class JudgeError(VlmalignError):
    """A judge backend is misconfigured or cannot be reached."""
