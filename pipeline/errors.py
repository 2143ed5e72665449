"""The one exception type the library raises for user-facing problems.

The CLI catches :class:`PipelineError` and prints its message as a single
``Error: ...`` line with exit code 1; anything else is a bug and keeps its
traceback.
"""


class PipelineError(Exception):
    """A problem with the user's input, files or settings, with a message that says how to fix it."""
