"""User-facing errors: one line that says what is wrong and what to do.

The CLI turns a :class:`UserError` into that line on stderr and exit code 2.
Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input (file, name, value), not a bug in ulrl."""
