"""edm2's own errors: what a caller asked for that cannot be done, and how to fix it.

Every error the library raises on purpose is an `EDM2Error`, with a one-line
message that names the Python argument (as `name=value` or `` `name` ``) or
the file, and the fix. The command line shows these as one line with the
matching flag (`edm2.cli.flag_message`); any other exception is a bug or a
failure of another library and keeps its traceback.

The subclasses also derive from the built-in type a Python caller would
expect (`ValueError`, `FileNotFoundError`, `FileExistsError`), so code that
catches those keeps working.
"""
from __future__ import annotations

__all__ = ["EDM2Error", "MissingFileError", "ExistingFileError"]


class EDM2Error(ValueError):
    """Bad input or a refused action; the message says which argument or file, and the fix."""


class MissingFileError(EDM2Error, FileNotFoundError):
    """A file or folder the caller named does not exist (or lacks what edm2 needs in it)."""

    def __str__(self) -> str:  # OSError would format (errno, strerror); ours is one message
        return str(self.args[0]) if self.args else ""


class ExistingFileError(EDM2Error, FileExistsError):
    """A file or folder edm2 was asked to write already exists, and replacing it would lose data."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""
