"""The one exception type for problems a user can fix (bad paths, bad data, bad configs)."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback.

    The CLI catches it at the top level, prints ``error: <message>`` and exits with
    status 2, so every message must name the offending path, key or value.
    """
