"""The one exception type that stage CLIs turn into a one-line error message."""


class CxrError(Exception):
    """A problem the user can fix (bad input, missing data, unreachable service); the message
    names the problem and the fix."""
