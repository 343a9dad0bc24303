"""The one exception type for bad input from a user (a config, a path, a checkpoint, a shape).

Its message is a complete sentence that says what was wrong and what to do; the command line prints it
without a traceback and exits with status 2.
"""

import difflib


class UserError(ValueError):
    """Bad input: the message says what was wrong and what to do about it."""


def nearest(name: str, choices) -> str:
    """' Did you mean 'x'?' for the closest valid choice, or '' when nothing is close."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""
