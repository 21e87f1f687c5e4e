"""User-facing errors: one line that names the problem and the fix; the CLI exits with code 2."""


class PuzzleError(Exception):
    """A problem with the user's input or environment. The message is shown as is, without a traceback."""

    exit_code = 2
