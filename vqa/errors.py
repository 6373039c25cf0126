"""The one error type for bad user input (files, fields, values)."""
from __future__ import annotations


class DataError(ValueError):
    """Bad input from the user: the message names the file, field/line and value.

    The CLI prints it as one line and exits non-zero, without a traceback.
    """
