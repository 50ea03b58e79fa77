"""The project exception: one sentence naming the input and the fix, printed by the CLI without a traceback."""


class AsrError(Exception):
    """A user-facing error: bad input, missing file or configuration problem."""
