"""The one exception type for bad input from a user (a config, a path, a checkpoint, a shape).

Its message is a complete sentence that says what was wrong and what to do; the command line prints it
without a traceback and exits with status 2.
"""

import difflib
from enum import Enum
from typing import TypeVar

E = TypeVar("E", bound=Enum)


class UserError(ValueError):
    """Bad input: the message says what was wrong and what to do about it."""


def nearest(name: str, choices) -> str:
    """' Did you mean 'x'?' for the closest valid choice, or '' when nothing is close."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""


def parse_enum(kind: type[E], value: E | str, name: str) -> E:
    """`kind(value)` for a member or its string value (a recipe's YAML), parsed once where a model or layer is
    built; anything else is a `UserError` naming `name` and listing the valid values."""
    if isinstance(value, kind):
        return value
    try:
        return kind(value)
    except ValueError:
        valid = [m.value for m in kind]
        raise UserError(f"Unknown {name} {value!r}; expected one of {valid}.{nearest(str(value), valid)}") from None


class Interrupted(UserError):
    """Training stopped on a signal (SIGTERM, SIGINT) after writing a checkpoint; the message says where."""

    def __init__(self, message: str, *, signal_name: str):
        super().__init__(message)
        self.exit_code = 130 if signal_name == "SIGINT" else 143  # the shell's 128 + signal number
