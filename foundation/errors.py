"""The one exception type for user mistakes.

A `UserError` carries a one-paragraph message that names the file, key or value at fault and
what would fix it. The command-line entry points print it without a traceback and exit 2;
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: a config key, a data file, a missing checkpoint."""
