"""The exception types the library raises for user-facing problems.

The CLI catches :class:`PipelineError` and prints its message as a single
``Error: ...`` line with exit code 1 (a :class:`ParameterError` named by the
parameter's flag), and so does it for the operating-system
errors a user fixes outside the program (:func:`environment_message`: a full
disk, a read-only or forbidden directory); anything else is a bug and keeps its
traceback.
"""
import errno


class PipelineError(Exception):
    """A problem with the user's input, files or settings, with a message that says how to fix it."""


_FIXES = {
    errno.ENOSPC: "free space on that disk (or choose another output) and run the same command again",
    errno.EDQUOT: "free space within your quota (or choose another output) and run the same command again",
    errno.EROFS: "the file system is read-only: choose another output",
    errno.EACCES: "you may not write there: fix its permissions or choose another output",
    errno.EPERM: "you may not write there: fix its permissions or choose another output",
}


def environment_message(e: OSError) -> str | None:
    """One line for an ``OSError`` the user fixes outside the program, else None (a bug)."""
    code = e.errno
    if code is None and "No space left on device" in str(e):
        code = errno.ENOSPC  # pyarrow's IO errors carry the text, not the errno
    fix = _FIXES.get(code)
    if fix is None:
        return None
    where = f" {e.filename}" if getattr(e, "filename", None) else ""
    reason = e.strerror or str(e)
    return f"cannot write{where}: {reason}; {fix}"


class ParameterError(PipelineError):
    """A bad value of one parameter. ``param`` names it as a Python caller passes it (``k``,
    ``val_fraction``); the message reads ``"<param> <text>"``. The CLI says the same with the
    parameter's flag instead (``--k``, ``--val-fraction``: cli/main.py maps the names)."""

    def __init__(self, param: str, text: str):
        self.param, self.text = param, text
        super().__init__(f"{param} {text}")
