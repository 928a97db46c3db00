"""The one exception type users can cause.

Anything a user can get wrong (an unknown model, an impossible budget, a malformed
dataset line) raises ``VramplanError`` with a one-line message that names the fix.
The CLI prints that line and exits non-zero; every other exception is a bug and keeps
its traceback.
"""


class VramplanError(Exception):
    """A user-facing error: ``str(err)`` is a single line that says what to do."""

    exit_code = 2
