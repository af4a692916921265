"""Typed config values: every check names the key, the value given and what is valid.

A dataclass field declares its check in ``metadata["check"]``; ``check_fields`` runs the checks and
stores the normalised values (an integral number given for an integer becomes an ``int``, any number
given for a float a ``float``). Booleans are never numbers: ``capacity: true`` is refused, not read
as 1.0, and a lone number is not a list.

The same checks guard the Python API's arguments: a value of the wrong kind raises
``ArgumentTypeError``, a ``TypeError`` as Python raises for one, and a ``UserError`` like every other refusal.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

from dlo.errors import UserError


class ConfigValueError(UserError):
    """``key=value: problem``; ``within(section)`` prefixes the section to the key."""

    def __init__(self, key: str, value: Any, problem: str):
        self.key, self.value, self.problem = key, value, problem
        super().__init__(f"{key}={value!r}: {problem}")

    def within(self, section: str) -> ConfigValueError:
        return ConfigValueError(f"{section}.{self.key}" if section else self.key, self.value, self.problem)


class ArgumentTypeError(ConfigValueError, TypeError):
    """``key=value: expected ...``: a value of the wrong kind (a string for a number, an int for a list)."""


def _bound(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


@dataclass(frozen=True)
class Number:
    """A real number (``integer=True``: a whole one) within optional bounds; ``also`` lists extra allowed values."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    also: tuple[float, ...] = ()

    def range_text(self) -> str:
        if self.low is not None and self.high is not None:
            return (f"in {'(' if self.low_open else '['}{_bound(self.low)}, "
                    f"{_bound(self.high)}{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_bound(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {_bound(self.high)}"
        return ""

    def describe(self) -> str:
        text = " ".join(part for part in ("an integer" if self.integer else "a number", self.range_text()) if part)
        return text + "".join(f" or {_bound(v)}" for v in self.also)

    def in_range(self, value: float) -> bool:
        if isinstance(value, float) and math.isnan(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __call__(self, key: str, value: Any):
        is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
        whole = isinstance(value, numbers.Integral) or (is_number and float(value).is_integer())
        if not is_number:
            raise ArgumentTypeError(key, value, f"expected {self.describe()}")
        if self.integer and not whole:
            raise ConfigValueError(key, value, f"expected {self.describe()}")
        if value not in self.also and not self.in_range(value):
            raise ConfigValueError(key, value, f"must be {self.range_text() or 'a number, not nan'}"
                                   + "".join(f" or {_bound(v)}" for v in self.also))
        return int(value) if self.integer else float(value)


class AcceptAsIs:
    """A check that takes a value unchanged or refuses it; subclasses define ``accepts`` and ``describe``."""

    def __call__(self, key: str, value: Any):
        if not self.accepts(value):
            raise (ConfigValueError if self.right_kind(value) else ArgumentTypeError)(
                key, value, f"expected {self.describe()}")
        return value

    def right_kind(self, value: Any) -> bool:
        """A refused value of the right type is a ValueError (a blank string, an unknown choice), else a TypeError."""
        return False


@dataclass(frozen=True)
class Choice(AcceptAsIs):
    options: tuple[str, ...]

    def describe(self) -> str:
        return "one of " + ", ".join(repr(o) for o in self.options)

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str) and value in self.options

    def right_kind(self, value: Any) -> bool:
        return isinstance(value, str)


@dataclass(frozen=True)
class Boolean(AcceptAsIs):
    def describe(self) -> str:
        return "true or false"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, bool)


@dataclass(frozen=True)
class Text(AcceptAsIs):
    """A string; ``allow_empty=False`` (the default) refuses a blank one."""

    allow_empty: bool = False

    def describe(self) -> str:
        return "a string" if self.allow_empty else "a non-empty string"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str) and (self.allow_empty or bool(value.strip()))

    def right_kind(self, value: Any) -> bool:
        return isinstance(value, str)


@dataclass(frozen=True)
class Mapping(AcceptAsIs):
    def describe(self) -> str:
        return "a mapping of keys to values"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, dict)


@dataclass(frozen=True)
class ListOf:
    """A non-empty list whose items each pass ``item``; ``unique=True`` refuses repeats."""

    item: Any
    unique: bool = False

    def describe(self) -> str:
        return f"a non-empty list, each item {self.item.describe()}"

    def __call__(self, key: str, value: Any):
        if not isinstance(value, (list, tuple)) or not value:
            raise (ConfigValueError if isinstance(value, (list, tuple)) else ArgumentTypeError)(
                key, value, f"expected {self.describe()}")
        items = [self.item(f"{key}[{i}]", v) for i, v in enumerate(value)]
        if self.unique and len(set(items)) != len(items):
            raise ConfigValueError(key, value, "lists an item twice")
        return items


@dataclass(frozen=True)
class ScalarOrList:
    """One value (``scalar``) or a list (``items``); ``list_text`` says what the list holds."""

    scalar: Any
    items: ListOf
    list_text: str

    def describe(self) -> str:
        return f"{self.scalar.describe()} or {self.list_text}"

    def __call__(self, key: str, value: Any):
        if isinstance(value, (list, tuple)):
            return self.items(key, value)
        try:
            return self.scalar(key, value)
        except ConfigValueError as err:
            if err.problem.startswith("expected"):
                raise type(err)(key, value, f"expected {self.describe()}") from None
            raise


@dataclass(frozen=True)
class Optional:
    """``null`` or a value passing ``check``."""

    check: Any

    def describe(self) -> str:
        return f"{self.check.describe()}, or null"

    def __call__(self, key: str, value: Any):
        if value is None:
            return None
        try:
            return self.check(key, value)
        except ConfigValueError as err:
            if err.key == key and err.problem.startswith("expected"):
                raise type(err)(key, value, f"expected {self.describe()}") from None
            raise


@dataclass(frozen=True)
class AnyOf:
    """A value passing any one of ``checks`` (the first that accepts it normalises it)."""

    checks: tuple[Any, ...]

    def describe(self) -> str:
        return " or ".join(c.describe() for c in self.checks)

    def __call__(self, key: str, value: Any):
        for check in self.checks:
            try:
                return check(key, value)
            except ConfigValueError:
                continue
        raise ConfigValueError(key, value, f"expected {self.describe()}")


def check_fields(obj) -> None:
    """Run each field's ``metadata["check"]`` on ``obj`` (a dataclass) and store the normalised value."""
    for f in dataclasses.fields(obj):
        check = f.metadata.get("check")
        if check is not None:
            setattr(obj, f.name, check(f.name, getattr(obj, f.name)))


# -- the Python API's arguments -----------------------------------------------------------------------------------


def check_instance(name: str, value: Any, kinds: type | tuple[type, ...], expected: str) -> Any:
    """Refuse an argument that is not an instance of ``kinds`` (``expected`` says what is valid)."""
    if not isinstance(value, kinds):
        raise ArgumentTypeError(name, Shown(value), f"expected {expected}")
    return value


def check_model(value: Any, name: str = "model") -> Any:
    """Refuse anything but a transformers model (a ``torch.nn.Module`` with a ``config``)."""
    import torch

    if not isinstance(value, torch.nn.Module) or not hasattr(value, "config"):
        raise ArgumentTypeError(name, Shown(value), "expected a transformers *ForCausalLM model (a torch.nn.Module "
                                                    "with a .config), e.g. from AutoModelForCausalLM.from_pretrained")
    return value


class Shown:
    """A value as a message shows it: its repr, cut short (a whole model or data set would flood the line)."""

    def __init__(self, value: Any):
        text = repr(value)
        self.text = text if len(text) <= 80 else f"{text[:60]}... ({type(value).__name__})"

    def __repr__(self) -> str:
        return self.text
