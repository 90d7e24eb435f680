"""The project's error classes: one `UserError` for every mistake in a user's input, by area.

A tool ends on a `UserError` with one line naming the file, line, key or flag (exit 2,
internvl_mcore/cli_errors.py; INTERNVL_MCORE_TRACEBACK=1 adds its traceback); anything else, a
ValueError / KeyError / OSError included, is a bug and keeps its traceback (exit 1). Raise the class
of the area whose input is wrong; its message already says what to change. Every such class is
defined here (tests/test_structure.py checks it); an OSError on a path the user named becomes one
where the path is opened (cli_errors.py: user_path, read_json).
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input that the message names (file, line, key or flag)."""


class ConfigError(UserError):
    """A flag, or a combination of flags, that cannot run (names the flag)."""


class DataError(UserError):
    """Input data that cannot be read or does not fit the run (names the file and line or record)."""


class CheckpointError(UserError):
    """A checkpoint that is missing, damaged, untrusted or does not fit the run (names the directory)."""


class ConversionError(UserError):
    """Weights that cannot be converted between formats or layouts (names the file and tensor)."""


class ScheduleMismatch(ConfigError):
    """A resume whose schedule flags differ from the checkpoint's, without a flag saying which wins."""


class TemplateError(DataError):
    """A conversation the template cannot render; `reason` is a Reject reason key (one record's fault:
    the preprocessor rejects the record, the run goes on)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple:
        # pickle rebuilds an exception from its args (the one message): give it the two arguments
        # (a preprocessing worker's error crosses to the parent process pickled)
        return type(self), (self.reason, self.detail)


class SaveDirRefused(CheckpointError):
    """--save is held by another run or holds another run's checkpoints; the message says which."""
