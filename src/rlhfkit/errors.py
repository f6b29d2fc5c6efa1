"""The one exception type the CLI turns into a one-line message instead of a traceback."""


class RlhfkitError(Exception):
    """A problem the user can fix (bad input file, bad flag, missing model); the message says how."""
