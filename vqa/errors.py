"""The one error type for bad user input; defined in `encoders` (the lowest layer) so every package shares it."""
from __future__ import annotations

from encoders._errors import DataError

__all__ = ["DataError"]
