"""The one error type for bad user input (files, fields, values), shared by every package."""
from __future__ import annotations


class DataError(ValueError):
    """Bad input from the user: the message names the file, field/line and value.

    The CLI prints it as one line and exits non-zero, without a traceback.
    Defined here, at the bottom of the dependency graph, so `encoders` can raise it
    too; `vqa.errors.DataError` is this class."""
