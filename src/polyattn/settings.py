"""Typed config sections, usable from every layer (like `errors`): the rules a field's values follow and the one
validator that turns a recipe's or the command line's value into the field's annotated type.

A section is a dataclass whose fields carry their type (the annotation) and their `Rule` (`checked(...)`); each
package declares the sections it reads (a task its `task` section, a job its `data` section, the training loop
its `train` section), and `polyattn.train.config` assembles them into one run config.

Types are converted by pydantic's `TypeAdapter` in lax mode (`'3'` → 3, `2.0` → 2, `'1e-3'` → 0.001, a list →
a tuple), the validator most of the Python ecosystem uses, instead of a converter of our own; it is imported on
first use, so `import polyattn` stays light. A failure becomes one sentence naming the key, the expected type
and the value.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import UserError


@dataclass(frozen=True)
class Rule:
    """The values a config field (or model argument) may take, checked when a config is resolved.

    Bounds apply to numbers and to every item of a tuple; every number must also be finite (NaN and ±inf
    are never a meaningful setting); `pattern` is a regular expression a whole string must match. None
    passes for an optional field.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    pattern: str | None = None
    meaning: str | None = None
    """What the allowed values are, in words, for the error (default: the bounds or the pattern)."""
    fixed: bool = False
    """The field shapes the trajectory of training, so a resumed run may not change it (unless forced)."""

    def check(self, key: str, value: Any) -> None:
        if value is None or isinstance(value, bool):
            return
        if isinstance(value, (tuple, list)):
            for item in value:
                self.check(key, item)
            return
        if isinstance(value, str):
            if self.pattern is not None and not re.fullmatch(self.pattern, value):
                raise UserError(f"{key} must be {self.meaning or 'text matching ' + self.pattern}, got {value!r}.")
            return
        if not isinstance(value, (int, float)):
            return
        if not math.isfinite(value):
            raise UserError(f"{key} must be a finite number, got {value}.")
        bounds = [(b, word, ok) for b, word, ok in (
            (self.gt, "greater than", lambda b: value > b), (self.ge, "at least", lambda b: value >= b),
            (self.lt, "less than", lambda b: value < b), (self.le, "at most", lambda b: value <= b)) if b is not None]
        if not all(ok(b) for b, _, ok in bounds):
            wanted = " and ".join(f"{word} {b:g}" for b, word, _ in bounds)
            raise UserError(f"{key} must be {self.meaning or wanted}, got {value}.")


PROBABILITY = {"ge": 0, "le": 1, "meaning": "a probability, from 0 to 1"}


def checked(default: Any, **rule) -> Any:
    """A dataclass field with `default` and the `Rule` its values must follow (see `Rule`)."""
    return field(default=default, metadata={"rule": Rule(**rule)})


def check_fields(obj: Any, section: str) -> None:
    """Checks every field of a config section against its `Rule`."""
    for f in dataclasses.fields(obj):
        rule = f.metadata.get("rule")
        if rule is not None:
            rule.check(f"{section}.{f.name}", getattr(obj, f.name))


def fixed_on_resume(obj: Any) -> list[str]:
    """Names of the fields of a section that a resumed run may not change (their `Rule` is `fixed`)."""
    return [f.name for f in dataclasses.fields(obj) if getattr(f.metadata.get("rule"), "fixed", False)]


@dataclass
class Section:
    """A config section; subclasses declare fields with `checked` and may add `validate` rules that tie fields
    together (after calling `super().validate(section)`)."""

    def validate(self, section: str) -> None:
        check_fields(self, section)


def parse_scalar(text: str) -> Any:
    """A command-line value as YAML would read it ('3' → 3, 'true' → True, '[1, 2]' → list, 'null' → None)."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """`value` as `annotation` (int, float, bool, str, Literal, enums, Optional/unions, tuples, lists, classes),
    or a UserError that names the key, the expected type and the value.

    Two conveniences of the command line come first: a list written as text (`'[1, 2]'`) is read as YAML, and one
    number for a fixed-length tuple of numbers stands for all of them (`patch_size=4` for an (h, w) pair).
    """
    if annotation is Any or annotation is inspect.Parameter.empty:
        return value
    if isinstance(value, str) and _accepts_sequence(annotation):
        value = parse_scalar(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        pair = _fixed_tuple(annotation)
        if pair is not None and not _accepts_number(annotation):
            value = [value] * pair
    if isinstance(value, (int, float, str)) and not isinstance(value, bool) and bool in _options(annotation) \
            and not _accepts_number(annotation) and str not in _options(annotation):
        # pydantic's lax mode reads 1 or 'yes' as true; a switch is written true or false
        raise UserError(f"{key} expects {describe_type(annotation)}, got {value!r}.")
    from pydantic import ValidationError

    try:
        return _adapter(annotation).validate_python(value)
    except ValidationError as err:
        raise UserError(f"{key} expects {describe_type(annotation)}, got {value!r}.") from err


@functools.cache
def _adapter(annotation: Any):
    from pydantic import ConfigDict, TypeAdapter

    # arbitrary types: model arguments may be classes (a norm layer) checked by isinstance; numbers are accepted
    # where text is expected (a run name `7`), as YAML reads them as numbers
    return TypeAdapter(annotation, config=ConfigDict(arbitrary_types_allowed=True, coerce_numbers_to_str=True))


def _options(ann: Any) -> tuple[Any, ...]:
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        return typing.get_args(ann)
    return (ann,)


def _accepts_sequence(ann: Any) -> bool:
    return any(typing.get_origin(a) in (tuple, list) for a in _options(ann))


def _accepts_number(ann: Any) -> bool:
    return any(a in (int, float) for a in _options(ann))


def _fixed_tuple(ann: Any) -> int | None:
    for a in _options(ann):
        args = typing.get_args(a)
        if typing.get_origin(a) is tuple and args and args[-1] is not Ellipsis:
            return len(args)
    return None


def describe_type(ann: Any) -> str:
    """An annotation in words, for errors: `int | None` → 'an integer or null'."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (tuple, list):
        return f"a list of {len(args)} values" if origin is tuple and Ellipsis not in args else "a list"
    if origin is dict:
        return "a mapping"
    if ann is type(None):
        return "null"
    if isinstance(ann, type) and issubclass(ann, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in ann)
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(ann, str(ann))


def plain(value: Any) -> Any:
    """Tuples, enums and sections as YAML-friendly lists, strings and mappings, recursively."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


__all__ = ["PROBABILITY", "Rule", "Section", "check_fields", "checked", "coerce", "describe_type",
           "fixed_on_resume", "parse_scalar", "plain"]
